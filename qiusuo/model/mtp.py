"""Multi-token prediction (DeepSeek-V3 section 2.2; V4 keeps it).

Module k (1-based) predicts token t+1+k at position t from the previous depth's residual state h^{k-1}_t and the
embedding of token t+k, through one more transformer block and the shared output head. The embedding and head
are the main model's (shared). Two kinds, by the model's residual kind:
- plain (V2/V3): `h'_t = eh_proj([enorm(emb(x_{t+k})) ; hnorm(h^{k-1}_t)])`, embedding first, as DeepSeek's
  checkpoints were trained (vLLM, SGLang); the head reads `norm(h)` (`shared_head.norm` in checkpoints).
- mHC (V4, DeepSeek's `MTPBlock`): the state is the N streams (B, T, N, D); `e_proj(enorm(emb))` is added to
  every stream's `h_proj(hnorm(stream))`, and the head reads `norm(hc_head(h))` with the module's own collapse.
`forward(h, emb, rope, ids, cache, absorb) -> (h', Routing | None, aux loss | None)` (the block's); `head_input(h') -> (B, T', D)` for the output head.
"""

from __future__ import annotations

import torch
from torch import nn

from qiusuo.config import ModelConfig
from qiusuo.model.block import Block
from qiusuo.model.mhc import HyperHead, residual_kind
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

    def forward(self, h: torch.Tensor, emb: torch.Tensor, rope, ids=None, cache=None, absorb: bool = False) -> tuple:
        """h (B, T', D) previous depth's states, emb (B, T', D) embeddings of the tokens k ahead -> (B, T', D)
        and the block's routing (None for a dense block). `cache`: speculative decoding's draft cache (its block
        is that cache's layer `num_hidden_layers`); None in training."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.block(x, rope, cache, absorb, None, ids)

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)


class HCMTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.e_proj = nn.Linear(D, D, bias=False)
        self.h_proj = nn.Linear(D, D, bias=False)
        self.block = Block(cfg, layer_idx)
        self.norm = RMSNorm(D, cfg.rms_norm_eps)
        self.hc_head = HyperHead(cfg)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, rope, ids=None, cache=None, absorb: bool = False) -> tuple:
        """h (B, T', N, D) previous depth's streams, emb (B, T', D) -> (B, T', N, D) and the block's routing."""
        x = self.e_proj(self.enorm(emb))[:, :, None, :] + self.h_proj(self.hnorm(h))
        return self.block(x, rope, cache, absorb, None, ids)

    def head_input(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(self.hc_head(h))


MTP_KINDS: dict[str, type[nn.Module]] = {"plain": MTPModule, "mhc": HCMTPModule}


def make_mtp(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return MTP_KINDS[residual_kind(cfg)](cfg, layer_idx)
