"""One pre-norm transformer block, its parts chosen per layer by the config through small registries: an
attention kind (which brings its cache kind), an MLP kind and a residual kind. V2/V3: MLA, dense MLPs for the
first `first_k_dense_replace` layers then DeepSeekMoE, the plain residual. V4: its `layer_types` (sliding window,
CSA, HCA: `CompressedAttention`), its `mlp_layer_types` (hash-routed or score-routed MoE) and mHC.

Kinds share one interface each:
    attention(x (B, T, D), rope (RopeAt), cache | None, absorb, mask | None) -> ((B, T, D), aux loss | None);
        `cache_spec(cfg)` -> LayerCacheSpec (aux: CSA's indexer loss)
    mlp(x (B, T, D), ids (B, T)) -> ((B, T, D), Routing | None)
    residual(state, f) -> (state', aux): plain `x + f(x)` on (B, T, D), or mHC on (B, T, N, D)
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from qiusuo.config import V4_ATTENTION_KINDS, ModelConfig, SLIDING
from qiusuo.cache.spec import LayerCacheSpec
from qiusuo.model.compressed_attention import CompressedAttention
from qiusuo.model.dsa import SharedSparseMLA, SparseMLA
from qiusuo.model.mhc import RESIDUAL_KINDS, residual_kind
from qiusuo.model.mla import MLA
from qiusuo.model.moe import DenseMLP, MoE, Routing
from qiusuo.model.rope import RMSNorm

ATTENTION_KINDS: dict[str, type[nn.Module]] = {
    "mla": MLA, "dsa": SparseMLA, "dsa_shared": SharedSparseMLA,
    **{k: functools.partial(CompressedAttention, kind=k) for k in V4_ATTENTION_KINDS}}
CACHE_SPECS = {"mla": MLA.cache_spec, "dsa": SparseMLA.cache_spec, "dsa_shared": SharedSparseMLA.cache_spec,
               **{k: functools.partial(CompressedAttention.cache_spec, kind=k) for k in V4_ATTENTION_KINDS}}


def attention_kind(cfg: ModelConfig, layer_idx: int) -> str:
    """The attention kind of layer `layer_idx`. V4's MTP blocks (past num_hidden_layers) attend over the
    sliding window only, as DeepSeek's MTP block (it ships no compressor). V3.2: sparse MLA, or GLM-5's "shared"
    layers that reuse the previous full layer's top-k (`indexer_types`)."""
    if not cfg.is_v4:
        return ("dsa_shared" if cfg.shares_topk(layer_idx) else "dsa") if cfg.is_v32 else "mla"
    return cfg.layer_types[layer_idx] if layer_idx < cfg.num_hidden_layers else SLIDING


def mlp_kind(cfg: ModelConfig, layer_idx: int) -> str:
    """`mlp_layer_types` when the config has it (V4 always; V2/V3 with V4's recipe); MTP blocks are score-routed
    MoE then. Otherwise V2/V3's rule: dense for the first `first_k_dense_replace` layers, MoE after."""
    if cfg.mlp_layer_types is not None:
        if layer_idx < cfg.num_hidden_layers:
            return cfg.mlp_layer_types[layer_idx]
        return "moe" if cfg.is_moe else "dense"
    return "moe" if cfg.is_moe_layer(layer_idx) else "dense"


def make_mlp(cfg: ModelConfig, kind: str, layer_idx: int = 0) -> nn.Module:
    if kind == "dense":
        return DenseMLP(cfg.hidden_size, cfg.intermediate_size, cfg.swiglu_limit)
    return MoE(cfg, hashed=kind == "hash_moe", layer_idx=layer_idx)


def layer_cache_specs(cfg: ModelConfig, draft: bool = False) -> list[LayerCacheSpec]:
    """What each main layer caches, from its attention kind (the caches and the block accounting read this).
    `draft`: also the first MTP module's block (layer `num_hidden_layers`), which speculative decoding runs over
    the cache as one more layer."""
    n = cfg.num_hidden_layers + (1 if draft and cfg.num_nextn_predict_layers else 0)
    return [CACHE_SPECS[attention_kind(cfg, i)](cfg) for i in range(n)]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = ATTENTION_KINDS[attention_kind(cfg, layer_idx)](cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = make_mlp(cfg, mlp_kind(cfg, layer_idx), layer_idx)
        residual = RESIDUAL_KINDS[residual_kind(cfg)]
        self.attn_hc, self.ffn_hc = residual(cfg), residual(cfg)  # parameter-free for the plain kind

    def forward(self, x: torch.Tensor, rope, cache=None, absorb: bool = False, mask: torch.Tensor | None = None,
                ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing | None, torch.Tensor | None]:
        """-> (residual state, the MLP's routing, the attention's auxiliary loss)."""
        x, aux = self.attn_hc(x, lambda h: self.self_attn(self.input_layernorm(h), rope, cache, absorb, mask))
        x, routing = self.ffn_hc(x, lambda h: self.mlp(self.post_attention_layernorm(h), ids))
        return x, routing, aux
