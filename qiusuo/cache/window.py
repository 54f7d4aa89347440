"""DeepSeek-V4's layer cache, the `window` kind: a sliding window of keys and the compressors' pools.

What a V4 layer keeps, and where it lives:
- the sliding window: the last W keys (= values) of the layer's one head, a ring of W slots per *sequence state*
  (slot = position % W): constant memory whatever the context;
- each compressor's tail: the raw projections (kv and gate) of its last `span` tokens, the windows still open,
  also per sequence state (a ring of `span` slots, position % span);
- each compressor's entries (CSA's main and indexer pools, HCA's pool): one per m tokens, paged in the pool's
  blocks like MLA's latents. The block size is a multiple of every m (`block_multiple`), so a block holds
  exactly block_size / m entries: entry e of a sequence lives in its block table's block (e m) // bs at
  sub-slot ((e m) % bs) / m.
Under FP8 the ring's keys and the entries are stored as MLA's latent is (e4m3 with their rotary tail in bf16;
the indexer's entries all e4m3), the tails in bf16 (`qiusuo.cache.precision`).
With speculative decoding both rings have K more slots (the pool's `slack`), so the K drafts a step writes past
the window never overwrite a key that is still needed once they are rejected: rollback is moving the length back.
Sequence states come from a fixed set (one per batch row), taken at admission and returned at release
(`BlockPool`); padding rows use the scratch state (the last) and the scratch entry slot.

Per forward the layer cache presents the protocol V4's attention and compressors call: `update(kv)` returns each
row's window in position order followed by its new keys (as the cache will return them), so query t's window is
keys[t+1 : t+W+1] whatever the row's length; `pool(name).history / append` (the protocol in
`qiusuo.model.compressor`) give each row its own length and count. Rows at different lengths, adding different
counts, share one forward.

Prefix caching: the entries of full blocks are shared like MLA's latents, but a sequence continuing from a
shared prefix also needs the ring and the open windows *at the branching point*, and those cannot be rebuilt
from the blocks: they hold the last W keys of every layer, and recomputing them exactly would mean recomputing
far back (each layer's window reaches W further into the previous layer's). So the pool keeps *snapshots* of
the state at block boundaries (`snapshot` / `restore` here, kept by `BlockPool.snapshot`): the runner prefills a
prompt up to its last full block, snapshots the state there, then prefills the rest; a later prompt sharing
those blocks restores the snapshot and starts after them. A prefix shorter than a snapshotted boundary, or whose
snapshot was evicted, is recomputed.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from qiusuo.cache.precision import CacheDtype, Fp8Tiles, Plain

if TYPE_CHECKING:
    from qiusuo.cache.pool import BlockPool, PagedBatch
    from qiusuo.cache.spec import LayerCacheSpec, PoolSpec


def ring_reads(ring: Plain | Fp8Tiles, states: torch.Tensor, starts: torch.Tensor,
               n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """In a position-indexed ring (states + 1, R, C) (position p at slot p % R): each row's n positions before its
    start -> (their rows of the flattened ring (rows, n), the positions (rows, n), -1 before the sequence's start)."""
    R = ring.tensors[0].shape[1]
    pos = starts[:, None] - n + torch.arange(n, device=starts.device)  # (rows, n)
    return states[:, None] * R + pos % R, torch.where(pos >= 0, pos, -1)


def ring_writes(ring: Plain | Fp8Tiles, states: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
                T: int) -> torch.Tensor:
    """The rows of the flattened ring (rows, T) that each row's `counts` real new values go to, at their
    positions' slots; of a chunk longer than the ring only its last R (the rest would collide), padding in the
    scratch state (the last). Nothing older than R - n positions is overwritten, which is what lets speculative
    decoding drop rejected tokens: a ring of W + K slots keeps every key a later query can still need while K
    drafts are written past the window."""
    first = ring.tensors[0]
    R = first.shape[1]
    i = torch.arange(T, device=starts.device)[None, :]  # (1, T)
    real = (i < counts[:, None]) & (i >= counts[:, None] - R)
    st = torch.where(real, states[:, None], first.shape[0] - 1)  # (rows, T)
    return st * R + (starts[:, None] + i) % R


class PoolStore:
    """One compressor's storage: its entries in the blocks, its open windows per sequence state."""

    def __init__(self, spec: "PoolSpec", pool: "BlockPool", states: int):
        dt, dev, k = pool.cache_dtype, pool.device, pool.slack
        self.spec = spec
        self.scratch = pool.num_blocks * (pool.block_size // spec.ratio)  # the last entry slot
        self.entries = dt.key((self.scratch + 1,), spec.width, spec.rotary, dev)
        self.tail_kv = dt.state((states, spec.span + k), spec.raw, dev)  # position p at slot p % (span + slack)
        self.tail_gate = dt.state((states, spec.span + k), spec.raw, dev, fill=float("-inf"))


class WindowCache:
    """Kind `window`: compressed entries in the blocks, the window ring and the compressors' tails in one
    sequence state per running sequence."""

    def __init__(self, spec: "LayerCacheSpec", pool: "BlockPool"):
        states = pool.num_states + 1  # the last: the scratch state of padding rows
        self.window = spec.window
        self.ring = pool.cache_dtype.key((states, spec.window + pool.slack), spec.width, spec.rotary, pool.device)
        self.pools = {p.name: PoolStore(p, pool, states) for p in spec.pools}

    @staticmethod
    def block_bytes(spec: "LayerCacheSpec", block_size: int, dtype: CacheDtype) -> int:
        """Bytes one block holds for this layer: its compressed entries."""
        return sum(block_size // p.ratio * dtype.key_bytes(p.width, p.rotary) for p in spec.pools)

    @staticmethod
    def state_bytes(spec: "LayerCacheSpec", dtype: CacheDtype, slack: int = 0) -> int:
        """Bytes one sequence state holds for this layer (ring and tails, each `slack` slots longer)."""
        return ((spec.window + slack) * dtype.key_bytes(spec.width, spec.rotary)
                + sum(2 * (p.span + slack) * dtype.state_bytes(p.raw) for p in spec.pools))

    @staticmethod
    def block_multiple(spec: "LayerCacheSpec") -> int:
        return math.lcm(1, *[p.ratio for p in spec.pools])

    @staticmethod
    def bytes_per_token(spec: "LayerCacheSpec", dtype: CacheDtype, context: int | None = None) -> float:
        """A sequence of `context` tokens: its window and tails amortised over it, plus one entry per m tokens."""
        if not context:
            raise ValueError(f"a {spec.kind!r} layer's cache per token depends on the context length: pass context")
        fixed = (min(spec.window, context) * dtype.key_bytes(spec.width, spec.rotary)
                 + sum(2 * p.span * dtype.state_bytes(p.raw) for p in spec.pools))
        entries = sum((context // p.ratio) * dtype.key_bytes(p.width, p.rotary) for p in spec.pools)
        return (fixed + entries) / context

    @property
    def state_tensors(self) -> list[torch.Tensor]:
        """Every tensor indexed by sequence state: the ring's, then each pool's tails."""
        return self.ring.tensors + [t for p in self.pools.values() for t in p.tail_kv.tensors + p.tail_gate.tensors]

    @property
    def tensors(self) -> list[torch.Tensor]:
        return self.state_tensors + [t for p in self.pools.values() for t in p.entries.tensors]

    def reset(self, state: int) -> None:
        """A fresh sequence: its open windows hold no token (the ring needs nothing: positions < 0 are masked)."""
        for p in self.pools.values():
            p.tail_kv.values[state].zero_()
            p.tail_gate.values[state].fill_(float("-inf"))

    def snapshot(self, state: int) -> list[torch.Tensor]:
        """A copy of one sequence state (its ring and open windows), for the prefix cache."""
        return [t[state].clone() for t in self.state_tensors]

    def restore(self, state: int, snap: list[torch.Tensor]) -> None:
        for t, v in zip(self.state_tensors, snap):
            t[state].copy_(v)

    def poison(self, state: int, value: float) -> None:
        """Fill a state's floating-point tensors with `value` (tests: a row must never read another's state)."""
        for t in self.state_tensors:
            if t.is_floating_point():
                t[state].fill_(value)

    def bind(self, batch: "PagedBatch") -> "WindowLayer":
        batch.row_states()
        return WindowLayer(self, batch)


def entry_slots(batch: "PagedBatch", store: PoolStore, entries: torch.Tensor) -> torch.Tensor:
    """(rows, ...) compressed-entry numbers -> their slots in `store`'s entries: entry e lives in block
    (e * m) // bs at sub-slot ((e * m) % bs) // m; past a row's blocks, the scratch slot."""
    bt, ratio = batch.block_ids, store.spec.ratio  # (rows, nb)
    bs = batch.pool.block_size
    pos = entries * ratio
    blk_idx = pos // bs
    blk = bt.gather(1, blk_idx.clamp(max=bt.shape[1] - 1).flatten(1)).view(blk_idx.shape)
    blk = torch.where(blk_idx < bt.shape[1], blk, -1)
    return torch.where(blk >= 0, blk * (bs // ratio) + (pos % bs) // ratio, store.scratch)


class WindowLayer:
    """Layer cache of kind `window` for one forward pass over `batch`."""

    def __init__(self, store: WindowCache, batch: "PagedBatch"):
        self.store, self.batch = store, batch

    def update(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv (rows, T, hd) -> keys (rows, W + T, hd) and their positions (rows, W + T): each row's last W
        positions before its new tokens (-1 before its start), then the new ones; the ring keeps the new ones."""
        b, ring = self.batch, self.store.ring
        old, pos = ring_reads(ring, b.states, b.starts, self.store.window)  # (rows, W), (rows, W)
        new = ring_writes(ring, b.states, b.starts, b.counts_t, kv.shape[1])  # (rows, T)
        # the old keys read before the new ones take their slots; the new ones as later steps will read them
        keys = ring.update((new,), kv, (old,), read_first=True, stored=True)  # (rows, W + T, hd)
        return keys, torch.cat([pos, b.positions(kv.shape[1])], 1)

    def pool(self, name: str) -> "PoolLayer":
        return PoolLayer(self.batch, self.store.pools[name])


class PoolLayer:
    """One compressor's pool for one forward pass (the protocol in `qiusuo.model.compressor`)."""

    def __init__(self, batch: "PagedBatch", store: PoolStore):
        self.batch, self.store = batch, store

    def history(self, kv: torch.Tensor, gate: torch.Tensor):
        b, d = self.batch, self.store
        span = d.spec.span
        old, pos = ring_reads(d.tail_kv, b.states, b.starts, span)  # (rows, span): the windows still open
        new = ring_writes(d.tail_kv, b.states, b.starts, b.counts_t, kv.shape[1])  # (rows, T); the gates' ring alike
        kv = d.tail_kv.update((new,), kv, (old,), read_first=True, stored=True)  # (rows, span + T, C)
        gate = d.tail_gate.update((new,), gate, (old,), read_first=True, stored=True)
        none = (pos < 0)[..., None]  # (rows, span, 1): no token there
        kv[:, :span].masked_fill_(none, 0.0)
        gate[:, :span].masked_fill_(none, float("-inf"))  # weight 0
        return b.starts, b.counts_t, kv, gate

    def append(self, entries: torch.Tensor, valid: torch.Tensor, first: torch.Tensor,
               select: torch.Tensor | None = None) -> torch.Tensor:
        b, d = self.batch, self.store
        if select is None:  # every entry the gathered context can hold: a bound from shapes, not the data
            select = torch.arange(b.S // d.spec.ratio, device=entries.device).expand(len(first), -1)
        read = (entry_slots(b, d, select),)  # only the chosen entries, per query: (rows, T, k); else (rows, total)
        if not entries.shape[1]:
            return d.entries.read(read)
        k = torch.arange(entries.shape[1], device=entries.device)
        slots = torch.where(valid, entry_slots(b, d, first[:, None] + k), d.scratch)  # (rows, n)
        return d.entries.update((slots.reshape(-1),), entries.reshape(-1, entries.shape[-1]), read)
