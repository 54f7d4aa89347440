"""The cache protocol the model calls, and its simplest implementation: one contiguous buffer per layer.

A layer's attention kind decides what it caches (its `LayerCacheSpec`); a cache hands each layer a layer cache
of that kind (`cache.layer(i)`), and the attention module calls that object's methods. MLA's kind is `latent`:
per token, exactly `kv_lora_rank + qk_rope_head_dim` values, the normalised latent `c_kv` followed by the
rotated shared key `k_pe` (DeepSeek-V3: 512 + 64 = 576). A new attention kind (V3.2's indexer keys, V4's
sliding ring and compressed pools) brings a new spec kind and a layer-cache class per cache implementation;
the model, the scheduler and the block accounting see only `Cache` and bytes per token.

Contract (`Cache`):
    positions(T) -> (B, T) long     positions of the T new tokens of each row (the cache owns them)
    layer(i) -> layer cache          the cache of layer i, of the kind its attention declared
    advance(T)                        the T new tokens are now part of the context: positions move on

Layer cache of kind `latent` (`LatentLayerCache`):
    update(latent (B, T, C)) -> (latent_all (B, S, C), mask (B, 1, T, S) bool | None)
`mask` is True where a query may attend; None means "attend to every cached token" (decoding one token for rows
of equal length). The serving engine implements the same protocol over a paged block pool (`infer/paged.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class LayerCacheSpec:
    """What one layer keeps per cached token. `kind` names the layer-cache class a cache builds for it;
    `width` is values per token (for `latent`: kv_lora_rank + qk_rope_head_dim)."""

    kind: str
    width: int

    def bytes_per_token(self, itemsize: int) -> int:
        return self.width * itemsize


class LatentLayerCache(Protocol):
    def update(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class Cache(Protocol):
    def positions(self, T: int) -> torch.Tensor: ...

    def layer(self, i: int) -> LatentLayerCache: ...

    def advance(self, T: int) -> None: ...


class _ContiguousLatent:
    """Layer cache of kind `latent` over one (B, max_len, C) buffer, writing at the owner's current positions."""

    def __init__(self, owner: "ContiguousCache", data: torch.Tensor):
        self.owner, self.data = owner, data

    def update(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pos = self.owner.current  # (B, T)
        B, T, C = latent.shape
        self.data.scatter_(1, pos[:, :, None].expand(B, T, C), latent.to(self.data.dtype))
        S = self.owner.max_len if T == 1 else int(pos.max()) + 1
        mask = torch.arange(S, device=pos.device)[None, None, :] <= pos[:, :, None]  # (B, T, S) causal + length
        return self.data[:, :S], mask[:, None]


class ContiguousCache:
    """Contiguous cache for `B` sequences of up to `max_len` tokens: one (B, max_len, width) buffer per layer,
    one length per row. `specs`: one `LayerCacheSpec` per layer (`Transformer.cache_specs()`).

    Decoding steps (T == 1) attend over the whole buffer with a length mask, so every step has the same shapes:
    that is what lets `torch.compile` turn a decoding step into one fused kernel program (2.2x faster than eager
    on the bench config here). Prefill (T > 1) slices to the longest row instead.
    """

    KINDS = {"latent": _ContiguousLatent}

    def __init__(self, specs: list[LayerCacheSpec], batch_size: int, max_len: int, device=None,
                 dtype: torch.dtype = torch.float32):
        # one tensor per layer (not views of one): compiled steps then update them in place (see infer/paged.py)
        self.buffers = [torch.zeros(batch_size, max_len, s.width, device=device, dtype=dtype) for s in specs]
        self._layers = [self.KINDS[s.kind](self, b) for s, b in zip(specs, self.buffers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens cached per row
        self.max_len = max_len
        self.current = self.lengths[:, None]  # (B, T) positions of the tokens being written

    def positions(self, T: int) -> torch.Tensor:
        self.current = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)  # (B, T)
        return self.current

    def layer(self, i: int) -> _ContiguousLatent:
        return self._layers[i]

    def advance(self, T: int) -> None:
        self.lengths += T

    @property
    def num_bytes_per_token(self) -> int:
        return sum(b.shape[-1] * b.element_size() for b in self.buffers)
