"""DeepSeek-V3.2's layer cache in the paged engine: the `sparse_latent` kind of `qiusuo.model.cache`, paged.

Per layer two flat tensors indexed by the same slots (`table[p // bs] * bs + p % bs`, the last slot scratch): the
MLA latents (slots + 1, C) and the indexer keys (slots + 1, Dk). A block is a range of slots, so it holds both,
and prefix sharing, eviction and the memory budget (`block_values`: C + Dk per token) work as for `latent`.

Why two tensors: a decoding step's indexer must score every context token's key, but its attention reads only
the k latents it picks. With one (C + Dk)-wide tensor the step gathered every row's whole context (rows, S, C+Dk)
before selecting: 32% of a V3.2 decoding step at 32k context, and V3.2 decoded at 0.61x V3 in the engine although
the model's step alone was 1.48x faster. Here `update` gathers the S keys (Dk values each) and returns a
`PagedContext`; the attention then asks it for the k chosen latents (rows, k, C) only. Prefill and verification
(T > 1) ask for all S latents (each query keeps its own k).

The per-token slots, write positions and mask are `PagedBatch`'s, built once per batch before the forward, as
for `latent` layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qiusuo.model.cache import LayerCacheSpec, SparseContext


@dataclass
class SparseStorage:
    latent: torch.Tensor  # (num_blocks * block_size + 1, C), last: scratch
    keys: torch.Tensor  # (num_blocks * block_size + 1, Dk)


class PagedContext(SparseContext):
    """A `SparseContext` over the pool: the S keys gathered already, latents read from the blocks on demand."""

    def __init__(self, storage: SparseStorage, slots: torch.Tensor, keys: torch.Tensor):
        self.storage, self.slots, self.keys = storage, slots, keys  # slots (rows, S), keys (rows, S, Dk)

    def latents(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """(rows, n, C) the latents at context positions idx (rows, n); None: all S."""
        at = self.slots if idx is None else self.slots.gather(1, idx)  # (rows, n) slots
        return self.storage.latent.index_select(0, at.reshape(-1)).view(*at.shape, -1)


class PagedSparseLatent:
    """Layer cache of kind `sparse_latent` for one forward pass: writes the new latents and keys to their slots
    and returns every row's keys with a `PagedContext` for its latents, and the batch's mask (None: one new
    token per row at equal lengths, every gathered slot visible)."""

    @staticmethod
    def storage(spec: LayerCacheSpec, pool) -> SparseStorage:
        slots, kw = pool.scratch + 1, spec.key_width
        return SparseStorage(torch.zeros(slots, spec.width - kw, device=pool.device, dtype=pool.dtype),
                             torch.zeros(slots, kw, device=pool.device, dtype=pool.dtype))

    @staticmethod
    def block_values(spec: LayerCacheSpec, block_size: int) -> int:
        return block_size * spec.width  # latent + key

    @staticmethod
    def state_values(spec: LayerCacheSpec, slack: int = 0) -> int:
        return 0

    def __init__(self, batch, data: SparseStorage):
        self.data, self.batch = data, batch

    def update(self, new: SparseContext) -> tuple[PagedContext, torch.Tensor | None]:
        data, v = self.data, self.batch  # v.slots (rows, S), v.write (rows, T), v.mask: as for `latent` layers
        where = v.write.reshape(-1)  # (rows * T,)
        # index_put_: inductor lowers it to an in-place store (see `layers` in paged.BlockPool)
        data.latent.index_put_((where,), new.latent.reshape(where.shape[0], -1).to(data.latent.dtype))
        Dk = data.keys.shape[1]  # 0 for GLM-5's shared layers (no indexer key): explicit, as -1 cannot infer it
        data.keys.index_put_((where,), new.keys.reshape(where.shape[0], Dk).to(data.keys.dtype))
        rows, S = v.slots.shape
        keys = data.keys.index_select(0, v.slots.reshape(-1)).view(rows, S, Dk)  # (rows, S, Dk)
        return PagedContext(data, v.slots, keys), v.mask
