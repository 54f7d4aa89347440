"""RMSNorm and rotary position embedding with YaRN.

Legend: B batch, T new tokens, H heads, P rotary head dim (`qk_rope_head_dim`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from qiusuo.config import ModelConfig, yarn_get_mscale


class RMSNorm(nn.Module):
    """Normalised in fp32, scaled in the input dtype: the order transformers and DeepSeek use, so bf16 outputs
    match theirs bit for bit."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (P/2,) and the cos/sin attention factor.

    With YaRN, low frequencies (long wavelengths) are interpolated by `factor`, high ones kept, with a linear ramp
    between the correction dims given by `beta_fast`/`beta_slow` (DeepSeek-V3 `precompute_freqs_cis`). The cos/sin
    factor is 1 for DeepSeek's own configs (mscale == mscale_all_dim); it follows transformers otherwise.
    """
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos
    rs = cfg.yarn
    if rs is None:
        return inv_freq, 1.0
    factor = float(rs["factor"])
    orig = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
    af = rs.get("attention_factor")
    if af is None:
        m, m_all = rs.get("mscale"), rs.get("mscale_all_dim")
        af = yarn_get_mscale(factor, m) / yarn_get_mscale(factor, m_all) if m and m_all else yarn_get_mscale(factor)
    return inv_freq, float(af)


class Rotary(nn.Module):
    """Precomputed cos/sin tables indexed by position; applied to interleaved pairs (DeepSeek's checkpoint layout)
    or to halves (`rope_interleave=False`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.interleave = cfg.rope_interleave
        self.max_positions = cfg.max_position_embeddings
        inv_freq, self.attention_factor = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,) or (B, T) -> cos, sin (..., T, P/2) in fp32."""
        freqs = positions.to(torch.float32)[..., None] * self.inv_freq  # (..., T, P/2)
        return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor


def rotaries(cfg: ModelConfig) -> dict[str, Rotary]:
    """The rotary tables a model needs, by name. V2/V3: one, "main". V4: "main" (`rope_theta`, no scaling) for
    sliding-window layers and "compress" (`compress_rope_theta`, with `rope_scaling`'s YaRN and cos/sin factor 1,
    as transformers and DeepSeek's V4 code have it) for CSA/HCA layers, their compressors and the indexer."""
    if not cfg.is_v4:
        return {"main": Rotary(cfg)}
    yarn = {**cfg.yarn, "attention_factor": 1.0} if cfg.yarn else None
    return {"main": Rotary(cfg.replace(rope_scaling=None)),
            "compress": Rotary(cfg.replace(rope_theta=cfg.compress_rope_theta, rope_scaling=yarn))}


class RopeAt:
    """The cos/sin of one forward's positions for each rotary kind, computed once and shared by every layer;
    `at(kind, positions)` gives other positions (V4's compressed entries sit at their window's first token).
    `positions`: (T,) or (B, T) long. `shared`: what a layer hands to later layers of the same forward (GLM-5's
    top-k, which its "shared" layers reuse: `qiusuo.model.dsa`); it lives and dies with the forward."""

    def __init__(self, tables: dict[str, Rotary], positions: torch.Tensor):
        self.tables, self.positions = tables, positions
        self._done: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.shared: dict[str, object] = {}

    def __getitem__(self, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        if kind not in self._done:
            self._done[kind] = self.tables[kind](self.positions)
        return self._done[kind]

    def at(self, kind: str, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tables[kind](positions)

    def narrow(self, T: int) -> "RopeAt":
        """The first T positions (MTP depth k sees T - k of them)."""
        return RopeAt(self.tables, self.positions[..., :T])


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x (B, T, H, P); cos/sin (T, P/2) or (B, T, P/2). Computed in fp32, returned in x's dtype.
    (Inverse rotation: pass -sin.)"""
    if cos.dim() == 2:
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]
    else:
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    xf = x.float()
    if interleave:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xf.chunk(2, dim=-1)
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype)
