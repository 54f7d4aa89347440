"""Counting without allocating: parameters (total, active per token) from a model built on the meta device,
cache bytes per token from the layers' cache specs, and training FLOPs per token. The one place for each
formula: the engine sizes its pool, `inspect` reports, the trainer computes MFU from these."""

from __future__ import annotations

import torch

from qiusuo.config import ModelConfig
from qiusuo.model.cache import LayerCacheSpec


def count_params(cfg: ModelConfig, include_mtp: bool = False) -> dict[str, int]:
    """Total and active-per-token parameter counts, from a model built on the meta device (nothing allocated).

    Active = everything except the routed experts a token does not visit: embedding, output head, attention,
    dense MLPs, shared experts, routers, and `num_experts_per_tok` routed experts per MoE layer.
    """
    from qiusuo.model.transformer import Transformer

    with torch.device("meta"):
        model = Transformer(cfg if include_mtp else cfg.replace(num_nextn_predict_layers=0))
    total = routed = 0
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if ".experts." in name:
            routed += p.numel()
    active = total - routed
    if cfg.is_moe:
        active += routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    return {"total": total, "active": active, "routed": routed}


def specs_bytes_per_token(specs: list[LayerCacheSpec], itemsize: int) -> int:
    """Bytes a cache built from `specs` (one per layer) keeps per token: the one formula the engine's pool, its
    memory budget and `inspect` all use."""
    return sum(s.bytes_per_token(itemsize) for s in specs)


def cache_bytes_per_token(cfg: ModelConfig, itemsize: int = 2) -> int:
    """Bytes the cache keeps per token over all layers, from each layer's attention kind (MLA: kv_lora_rank +
    qk_rope_head_dim values; DeepSeek-V3 in bf16: 576 x 61 x 2 = 70,272)."""
    from qiusuo.model.block import layer_cache_specs

    return specs_bytes_per_token(layer_cache_specs(cfg), itemsize)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, active_params: int) -> float:
    """6 x active matmul parameters (the embedding lookup is not a matmul) + causal attention:
    6 x layers x heads x T/2 x (qk_head_dim + v_head_dim) per token (forward 2, backward 4)."""
    matmul = active_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (seq_len / 2) * (cfg.qk_head_dim + cfg.v_head_dim)
    return 6 * matmul + attn
