"""One pre-norm transformer block: MLA then a dense MLP (first `first_k_dense_replace` layers) or DeepSeekMoE."""

from __future__ import annotations

import torch
from torch import nn

from qiusuo.config import ModelConfig
from qiusuo.model.mla import MLA
from qiusuo.model.moe import MLP, MoE
from qiusuo.model.rope import RMSNorm


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, rope, cache=None, absorb: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, absorb)
        return x + self.mlp(self.post_attention_layernorm(x))
