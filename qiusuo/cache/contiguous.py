"""The contiguous cache: B sequences advancing together, for `Transformer.generate`, prompt scoring and tests.

It is no second implementation of any kind: a private `BlockPool` whose rows hold consecutive blocks (row b owns
blocks b * n ... b * n + n - 1; nothing shared, no prefix cache), and one `PagedBatch` per forward. So the
reference decoder, the serving engine and every cache kind (V4's included, compiled or not) run the same code;
what tests hold both against is the model's forward without a cache.
"""

from __future__ import annotations

import torch

from qiusuo.cache.pool import BlockPool, PagedBatch
from qiusuo.cache.precision import CacheDtype
from qiusuo.cache.spec import LayerCacheSpec, block_size_for, state_bytes

BLOCK = 16  # tokens per block (a multiple of every compression rate, as `block_size_for` makes it)


class ContiguousCache:
    """The cache protocol (`positions`, `layer`, `advance`) for `batch_size` rows of up to `max_len` tokens.
    `specs`: one `LayerCacheSpec` per layer (`Transformer.cache_specs()`); `dtype`: the cache's precision
    (`CacheDtype.of`). `batch(T)` is the fixed-shape view of a decoding step (the whole `max_len` context
    gathered under a mask: every step has the same shapes, which is what lets `torch.compile` reuse one graph)."""

    def __init__(self, specs: list[LayerCacheSpec], batch_size: int, max_len: int, device=None,
                 dtype: CacheDtype | torch.dtype | str = torch.float32):
        bs = block_size_for(specs, BLOCK)
        per_row = -(-max_len // bs)
        dt = CacheDtype.of(dtype)
        states = batch_size if state_bytes(specs, dt) else 0
        self.max_len = max_len
        self.pool = BlockPool(specs, batch_size * per_row, bs, device=device, dtype=dt, num_states=states)
        self.tables = [self.pool.allocate([], per_row * bs) for _ in range(batch_size)]  # blocks in order
        self._batch: PagedBatch | None = None

    def batch(self, T: int) -> PagedBatch:
        """The view of the next forward of T new tokens per row (decoding, T == 1: the whole `max_len`)."""
        return PagedBatch(self.pool, self.tables, T, length=self.max_len if T == 1 else None)

    def positions(self, T: int) -> torch.Tensor:
        self._batch = self.batch(T)
        return self._batch.positions(T)

    def layer(self, i: int):
        return self._batch.layer(i)

    def advance(self, T: int) -> None:
        self._batch.advance(T)

    @property
    def num_bytes_per_token(self) -> float:
        """Bytes per token the pool's blocks keep (what `count.cache_bytes_per_token` predicts for MLA)."""
        return self.pool.bytes_per_token
