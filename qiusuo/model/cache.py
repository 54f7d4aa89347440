"""The latent cache contract, and its simplest form: one contiguous buffer per layer.

MLA caches, per token per layer, exactly `kv_lora_rank + qk_rope_head_dim` values: the normalised latent `c_kv`
followed by the rotated shared key `k_pe` (DeepSeek-V3: 512 + 64 = 576). Any cache the model accepts implements

    positions(T) -> (B, T) long            positions of the T new tokens of each row
    update(layer, latent (B, T, C)) -> (latent_all (B, S, C), mask (B, 1, T, S) bool | None)
    advance(T)                              the T new tokens are now part of the context

`mask` is True where a query may attend; None means "attend to every cached token" (decoding one token for rows
of equal length). The serving engine implements the same three methods over a paged block pool.
"""

from __future__ import annotations

import torch

from qiusuo.config import ModelConfig


class LatentCache:
    """Contiguous cache for `B` sequences of up to `max_len` tokens: (L, B, max_len, C)."""

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        self.data = torch.zeros(cfg.num_hidden_layers, batch_size, max_len, cfg.latent_dim, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.max_len = max_len
        self._start = 0  # all rows share one length: sequences in a LatentCache advance together

    def positions(self, T: int) -> torch.Tensor:
        if self._start + T > self.max_len:
            raise ValueError(f"LatentCache holds {self.max_len} tokens; {self._start} cached + {T} new do not fit")
        return (self._start + torch.arange(T, device=self.data.device)).expand(self.data.shape[1], T)

    def update(self, layer: int, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        T = latent.shape[1]
        end = self._start + T
        self.data[layer, :, self._start:end] = latent.to(self.data.dtype)
        kv = self.data[layer, :, :end]  # (B, S, C)
        if T == 1:
            return kv, None
        q_pos = torch.arange(self._start, end, device=latent.device)
        mask = torch.arange(end, device=latent.device)[None, :] <= q_pos[:, None]  # (T, S) causal with offset
        return kv, mask[None, None]

    def advance(self, T: int) -> None:
        self._start += T
        self.lengths += T

    @property
    def num_bytes_per_token(self) -> int:
        return self.data.shape[0] * self.data.shape[-1] * self.data.element_size()
