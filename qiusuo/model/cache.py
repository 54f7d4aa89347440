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
    """Contiguous cache for `B` sequences of up to `max_len` tokens: L x (B, max_len, C), one length per row.

    Decoding steps (T == 1) attend over the whole buffer with a length mask, so every step has the same shapes:
    that is what lets `torch.compile` turn a decoding step into one fused kernel program (2.2x faster than eager
    on the bench config here). Prefill (T > 1) slices to the longest row instead.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        # one tensor per layer (not views of one): compiled steps then update them in place (see infer/paged_cache.py)
        self.layers = [torch.zeros(batch_size, max_len, cfg.latent_dim, device=device, dtype=dtype)
                       for _ in range(cfg.num_hidden_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens cached per row
        self.max_len = max_len
        self._positions: torch.Tensor | None = None

    def positions(self, T: int) -> torch.Tensor:
        self._positions = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)  # (B, T)
        return self._positions

    def update(self, layer: int, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pos = self._positions  # (B, T)
        B, T, C = latent.shape
        data = self.layers[layer]  # (B, max_len, C)
        data.scatter_(1, pos[:, :, None].expand(B, T, C), latent.to(data.dtype))
        S = self.max_len if T == 1 else int(pos.max()) + 1
        mask = torch.arange(S, device=pos.device)[None, None, :] <= pos[:, :, None]  # (B, T, S) causal + length
        return data[:, :S], mask[:, None]

    def advance(self, T: int) -> None:
        self.lengths += T

    @property
    def num_bytes_per_token(self) -> int:
        return len(self.layers) * self.layers[0].shape[-1] * self.layers[0].element_size()
