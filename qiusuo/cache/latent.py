"""The `latent` layer cache (MLA): per token the normalised latent `c_kv` then the rotated shared key `k_pe`.

Storage: one component of (num_blocks * block_size + 1) slots of C = kv_lora_rank + qk_rope_head_dim values, the
last slot scratch (padding rows and positions write there and read it masked out); position p of a sequence lives
at slot `table[p // bs] * bs + p % bs`. Under FP8 the latent's first kv_lora_rank values are e4m3 with a scale
per 64 and `k_pe` stays bf16 (`qiusuo.cache.precision`): 648 bytes per token and layer at V3's shape, not 1,152.

Per forward (`PagedBatch`): the new latents go to their write slots, and every row's context is gathered from
its slots (rows, S, C), dequantised as gathered, with the batch's mask.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from qiusuo.cache.precision import CacheDtype

if TYPE_CHECKING:
    from qiusuo.cache.pool import BlockPool, PagedBatch
    from qiusuo.cache.spec import LayerCacheSpec


class LatentCache:
    """Kind `latent`: one slot per token in the pool's blocks, no per-sequence state."""

    def __init__(self, spec: "LayerCacheSpec", pool: "BlockPool"):
        self.latent = pool.cache_dtype.key((pool.scratch + 1,), spec.width, spec.rotary, pool.device)

    @staticmethod
    def block_bytes(spec: "LayerCacheSpec", block_size: int, dtype: CacheDtype) -> int:
        return block_size * dtype.key_bytes(spec.width, spec.rotary)

    @staticmethod
    def state_bytes(spec: "LayerCacheSpec", dtype: CacheDtype, slack: int = 0) -> int:
        return 0

    @staticmethod
    def block_multiple(spec: "LayerCacheSpec") -> int:
        return 1

    @staticmethod
    def bytes_per_token(spec: "LayerCacheSpec", dtype: CacheDtype, context: int | None = None) -> float:
        return dtype.key_bytes(spec.width, spec.rotary)

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor of this layer's storage."""
        return self.latent.tensors

    # stateless: nothing to reset, snapshot or restore
    def reset(self, state: int) -> None:
        pass

    def snapshot(self, state: int) -> None:
        return None

    def restore(self, state: int, snap) -> None:
        pass

    def bind(self, batch: "PagedBatch") -> "LatentLayer":
        """This layer's cache for one forward over `batch` (building the batch's slot tensors first)."""
        batch.token_slots()
        return LatentLayer(self, batch)


class LatentLayer:
    """Layer cache of kind `latent` for one forward pass."""

    def __init__(self, store: LatentCache, batch: "PagedBatch"):
        self.store, self.batch = store, batch

    def update(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """latent (rows, T, C) -> every row's context (rows, S, C) and the batch's mask (rows, 1, T, S) | None."""
        b = self.batch
        rows = latent.reshape(-1, latent.shape[-1])
        return self.store.latent.update((b.write.reshape(-1),), rows, (b.slots,)), b.mask
