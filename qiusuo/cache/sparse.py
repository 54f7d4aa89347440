"""The `sparse_latent` layer cache (DeepSeek-V3.2's DSA): the MLA latent and the lightning indexer's key per token.

Storage: two components addressed by the same slots as `latent` (`table[p // bs] * bs + p % bs`, the last slot
scratch): the latents (C) and the indexer keys (Dk). A block is a range of slots, so it holds both, and prefix
sharing, eviction and the memory budget work as for `latent`. Under FP8 the latent is stored as `latent`'s, and
the indexer key all in e4m3 with its scales, as DeepSeek caches it (128 + 2 bytes at V3.2's shape).

Why two components: a decoding step's indexer must score every context token's key, but its attention reads only
the k latents it picks. With one (C + Dk)-wide tensor the step gathered every row's whole context (rows, S, C+Dk)
before selecting: 32% of a V3.2 decoding step at 32k context, and V3.2 decoded at 0.61x V3 in the engine although
the model's step alone was 1.48x faster. Here `update` gathers the S keys (Dk values each) and returns a
`PagedContext`; the attention then asks it for the k chosen latents (rows, k, C) only. Prefill and verification
(T > 1) ask for all S latents (each query keeps its own k).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from qiusuo.cache.latent import LatentCache
from qiusuo.cache.precision import CacheDtype, Fp8Tiles, Plain

if TYPE_CHECKING:
    from qiusuo.cache.pool import BlockPool, PagedBatch
    from qiusuo.cache.spec import LayerCacheSpec


class SparseContext:
    """What a `sparse_latent` layer cache takes and returns: every token's indexer key (B, S, Dk), and its
    latents on demand (`latents`), so the attention reads all S keys but only the latents it picked. This form
    holds both as tensors (the new tokens, or a forward without a cache); `PagedContext` reads the pool."""

    def __init__(self, latent: torch.Tensor, keys: torch.Tensor):
        self.latent, self.keys = latent, keys  # (B, S, C), (B, S, Dk)

    def latents(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, C) the latents at positions idx (B, n) of each row; None: all S."""
        if idx is None:
            return self.latent
        return self.latent[torch.arange(idx.shape[0], device=idx.device)[:, None], idx]


class PagedContext(SparseContext):
    """A `SparseContext` over the pool: the S keys gathered already, latents read from the blocks on demand."""

    def __init__(self, component: Plain | Fp8Tiles, slots: torch.Tensor, keys: torch.Tensor):
        self.component, self.slots, self.keys = component, slots, keys  # slots (rows, S), keys (rows, S, Dk)

    def latents(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """(rows, n, C) the latents at context positions idx (rows, n); None: all S."""
        return self.component.read((self.slots if idx is None else self.slots.gather(1, idx),))


class SparseLatentCache(LatentCache):
    """Kind `sparse_latent`: `latent`'s slots with a second component, the indexer keys (`key_width`; 0 for
    GLM-5's shared layers, which reuse another layer's selection)."""

    def __init__(self, spec: "LayerCacheSpec", pool: "BlockPool"):
        dt, slots, kw = pool.cache_dtype, (pool.scratch + 1,), spec.key_width
        self.latent = dt.key(slots, spec.width - kw, spec.rotary, pool.device)
        self.keys = dt.key(slots, kw, 0, pool.device)

    @staticmethod
    def block_bytes(spec: "LayerCacheSpec", block_size: int, dtype: CacheDtype) -> int:
        return block_size * SparseLatentCache.bytes_per_token(spec, dtype)

    @staticmethod
    def bytes_per_token(spec: "LayerCacheSpec", dtype: CacheDtype, context: int | None = None) -> float:
        kw = spec.key_width
        return dtype.key_bytes(spec.width - kw, spec.rotary) + dtype.key_bytes(kw, 0)

    @property
    def tensors(self) -> list[torch.Tensor]:
        return self.latent.tensors + self.keys.tensors

    def bind(self, batch: "PagedBatch") -> "SparseLatentLayer":
        batch.token_slots()
        return SparseLatentLayer(self, batch)


class SparseLatentLayer:
    """Layer cache of kind `sparse_latent` for one forward pass: writes the new latents and keys to their slots
    and returns every row's keys with a `PagedContext` for its latents, and the batch's mask."""

    def __init__(self, store: SparseLatentCache, batch: "PagedBatch"):
        self.store, self.batch = store, batch

    def update(self, new: SparseContext) -> tuple[PagedContext, torch.Tensor | None]:
        b, st = self.batch, self.store
        where = (b.write.reshape(-1),)  # (rows * T,)
        st.latent.write(where, new.latent.reshape(where[0].shape[0], -1))
        Dk = st.keys.width  # 0 for GLM-5's shared layers (no indexer key): explicit, as -1 cannot infer it
        keys = st.keys.update(where, new.keys.reshape(where[0].shape[0], Dk), (b.slots,))
        return PagedContext(st.latent, b.slots, keys), b.mask
