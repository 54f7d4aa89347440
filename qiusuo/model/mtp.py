"""Multi-token prediction (DeepSeek-V3 section 2.2).

Module k (1-based) predicts token t+1+k at position t from the previous depth's hidden state h^{k-1}_t and the
embedding of token t+k: `h'_t = eh_proj([enorm(emb(x_{t+k})) ; hnorm(h^{k-1}_t)])`, then one transformer block,
then the shared output head after its own norm. The embedding and head are the main model's (shared).
The concatenation order (embedding first) is the one DeepSeek's checkpoints were trained with (vLLM, SGLang).
"""

from __future__ import annotations

import torch
from torch import nn

from qiusuo.config import ModelConfig
from qiusuo.model.block import Block
from qiusuo.model.moe import Routing
from qiusuo.model.rope import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = Block(cfg, layer_idx)
        self.norm = RMSNorm(D, cfg.rms_norm_eps)  # `shared_head.norm` in checkpoints

    def forward(self, h: torch.Tensor, emb: torch.Tensor, rope) -> tuple[torch.Tensor, Routing | None]:
        """h (B, T', D) previous depth's states, emb (B, T', D) embeddings of the tokens k ahead -> (B, T', D)
        and the block's routing (None for a dense block)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.block(x, rope)
