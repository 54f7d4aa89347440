"""One pre-norm transformer block, its parts chosen per layer by the config through small registries:
an attention kind (which brings its cache kind) and an MLP kind. Today every layer's attention is MLA and the
MLP is dense for the first `first_k_dense_replace` layers and DeepSeekMoE after; V3.2's sparse MLA and V4's
compressed attention and mHC residual are new entries here, not `if` chains in the block or the model.

Kinds share one interface each:
    attention(x (B, T, D), rope, cache | None, absorb, mask | None) -> (B, T, D); `cache_spec(cfg)` -> LayerCacheSpec
    mlp(x (B, T, D)) -> ((B, T, D), Routing | None)
"""

from __future__ import annotations

import torch
from torch import nn

from qiusuo.config import ModelConfig
from qiusuo.model.cache import LayerCacheSpec
from qiusuo.model.mla import MLA
from qiusuo.model.moe import DenseMLP, MoE, Routing
from qiusuo.model.rope import RMSNorm

ATTENTION_KINDS: dict[str, type[nn.Module]] = {"mla": MLA}


def attention_kind(cfg: ModelConfig, layer_idx: int) -> str:
    """The attention kind of layer `layer_idx` (MTP blocks, past num_hidden_layers, included)."""
    return "mla"


def mlp_kind(cfg: ModelConfig, layer_idx: int) -> str:
    return "moe" if cfg.is_moe_layer(layer_idx) else "dense"


def make_mlp(cfg: ModelConfig, kind: str) -> nn.Module:
    return MoE(cfg) if kind == "moe" else DenseMLP(cfg.hidden_size, cfg.intermediate_size)


def layer_cache_specs(cfg: ModelConfig) -> list[LayerCacheSpec]:
    """What each main layer caches per token, from its attention kind (the caches and the block accounting read
    this; MTP modules are not cached)."""
    return [ATTENTION_KINDS[attention_kind(cfg, i)].cache_spec(cfg) for i in range(cfg.num_hidden_layers)]


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = ATTENTION_KINDS[attention_kind(cfg, layer_idx)](cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = make_mlp(cfg, mlp_kind(cfg, layer_idx))

    def forward(self, x: torch.Tensor, rope, cache=None, absorb: bool = False,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing | None]:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, absorb, mask)
        y, routing = self.mlp(self.post_attention_layernorm(x))
        return x + y, routing
