"""Counting without allocating: parameters (total, active per token) from a model built on the meta device,
cache bytes per token from the layers' cache specs, and training FLOPs per token. The one place for each
formula: the engine sizes its pool, `inspect` reports, the trainer computes MFU from these."""

from __future__ import annotations

import torch

from qiusuo.cache.precision import CacheDtype
from qiusuo.cache.spec import LayerCacheSpec
from qiusuo.config import ModelConfig


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


def specs_bytes_per_token(specs: list[LayerCacheSpec], dtype: CacheDtype | torch.dtype | str,
                          context: int | None = None) -> float:
    """Bytes a cache built from `specs` (one per layer) keeps per token in `dtype` (`CacheDtype.of`: "bf16",
    "fp8", a torch dtype): the one formula the engine's pool, its memory budget and `inspect` all use.
    `context`: the sequence length, for kinds whose cost depends on it (V4's window and compressed pools: fixed
    state amortised over the context, plus 1/ratio entries)."""
    dt = CacheDtype.of(dtype)
    return sum(s.bytes_per_token(dt, context) for s in specs)


def cache_bytes_per_token(cfg: ModelConfig, dtype: CacheDtype | torch.dtype | str = "bf16",
                          context: int | None = None) -> float:
    """Bytes the cache keeps per token over all layers, from each layer's attention kind (MLA: kv_lora_rank +
    qk_rope_head_dim values; DeepSeek-V3 in bf16: 576 x 61 x 2 = 70,272; in fp8: 648 x 61 = 39,528)."""
    from qiusuo.model.block import layer_cache_specs

    return specs_bytes_per_token(layer_cache_specs(cfg), dtype, context)


def cache_bytes_by_kind(cfg: ModelConfig, dtype: CacheDtype | torch.dtype | str = "bf16",
                        context: int | None = None) -> dict[str, dict]:
    """Per attention kind: how many layers, and the cache bytes per token of one such layer at `context` in
    `dtype` (what `inspect` and docs/caches.md's tables show)."""
    from qiusuo.model.block import attention_kind, layer_cache_specs

    dt = CacheDtype.of(dtype)
    out: dict[str, dict] = {}
    for i, spec in enumerate(layer_cache_specs(cfg)):
        row = out.setdefault(attention_kind(cfg, i), {"layers": 0, "bytes_per_token": spec.bytes_per_token(dt, context)})
        row["layers"] += 1
    return out


def train_flops_per_token(cfg: ModelConfig, seq_len: int, active_params: int) -> float:
    """6 x active matmul parameters (the embedding lookup is not a matmul) + attention: 6 x heads x (keys a
    query attends to) x (query-key width + value width) per layer per token (forward 2, backward 4). MLA:
    causal, T/2 keys of qk_head_dim and v_head_dim. V4: its window (W, or T/2 when shorter) plus its compressed
    entries (CSA: index_topk chosen; HCA: T/(2m') on average), of head_dim each side."""
    from qiusuo.config import CSA, HCA
    from qiusuo.model.block import attention_kind

    matmul = active_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    if not cfg.is_v4:
        keys_x_width = cfg.num_hidden_layers * (seq_len / 2) * (cfg.qk_head_dim + cfg.v_head_dim)
    else:
        keys = {kind: min(cfg.sliding_window, seq_len / 2) for kind in cfg.layer_types}
        keys[CSA] = keys.get(CSA, 0) + min(cfg.index_topk, seq_len / (2 * cfg.compress_rate(CSA)))
        keys[HCA] = keys.get(HCA, 0) + seq_len / (2 * cfg.compress_rate(HCA))
        keys_x_width = sum(keys[attention_kind(cfg, i)] for i in range(cfg.num_hidden_layers)) * 2 * cfg.head_dim
    return 6 * matmul + 6 * cfg.num_attention_heads * keys_x_width
