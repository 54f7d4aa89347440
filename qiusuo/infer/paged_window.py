"""DeepSeek-V4's layer caches in the paged engine: the `window` kind of `qiusuo.model.cache`, paged.

What a V4 layer keeps, and where it lives here:
- the sliding window: the last W keys (= values) of the layer's one head, a ring of W slots per *sequence state*
  (slot = position % W): constant memory whatever the context;
- each compressor's tail: the raw projections (kv and gate) of its last `span` tokens, the windows still open,
  also per sequence state (a ring of `span` slots, position % span);
- each compressor's entries (CSA's main and indexer pools, HCA's pool): one per m tokens, paged in the pool's
  blocks like MLA's latents. The block size is a multiple of every m (`window_block_size`), so a block holds
  exactly block_size / m entries: entry e of a sequence lives in its block table's block (e m) // bs at
  sub-slot ((e m) % bs) / m.
With speculative decoding both rings have K more slots (the pool's `slack`), so the K drafts a step writes past
the window never overwrite a key that is still needed once they are rejected: rollback is moving the length back.
Sequence states come from a fixed set (one per batch row), taken at admission and returned at release
(`BlockPool`); padding rows use the scratch state and the scratch entry slot.

Per forward the layer cache presents the cache protocol V4's attention and compressors call: `update(kv)` returns
each row's window in position order followed by its new keys, so query t's window is keys[t+1 : t+W+1] whatever
the row's length; `pool(name).history / append` (the protocol in `qiusuo.model.compressor`) give each row its own
length and count. Rows at different lengths, adding different counts, share one forward.

Prefix caching: the entries of full blocks are shared like MLA's latents, but a sequence continuing from a
shared prefix also needs the ring and the open windows *at the branching point*, and those cannot be rebuilt
from the blocks: they hold the last W keys of every layer, and recomputing them exactly would mean recomputing
far back (each layer's window reaches W further into the previous layer's). So the pool keeps *snapshots* of
the state at block boundaries: the runner prefills a prompt up to its last full block, snapshots the state there
(`BlockPool.snapshot`), then prefills the rest; a later prompt sharing those blocks restores the snapshot and
starts after them. A prefix shorter than a snapshotted boundary, or whose snapshot was evicted, is recomputed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qiusuo.model.cache import LayerCacheSpec, PoolSpec


def window_block_size(specs: list[LayerCacheSpec], block_size: int) -> int:
    """The smallest multiple of `block_size` that every compressor's ratio divides."""
    return math.lcm(block_size, *[p.ratio for s in specs for p in s.pools])


@dataclass
class PoolStorage:
    spec: PoolSpec
    entries: torch.Tensor  # (num_blocks * bs / m + 1, w), last: scratch
    tail_kv: torch.Tensor  # (states + 1, span + slack, C), position p at slot p % (span + slack)
    tail_gate: torch.Tensor  # (states + 1, span + slack, C)


@dataclass
class WindowStorage:
    ring: torch.Tensor  # (states + 1, W + slack, hd), last: the scratch state; position p at slot p % (W + slack)
    window: int  # W
    pools: dict[str, PoolStorage]

    def reset(self, state: int) -> None:
        """A fresh sequence: its open windows hold no token (the ring needs nothing: positions < 0 are masked)."""
        for p in self.pools.values():
            p.tail_kv[state].zero_()
            p.tail_gate[state].fill_(float("-inf"))

    def snapshot(self, state: int) -> list[torch.Tensor]:
        """A copy of one sequence state (its ring and open windows), for the prefix cache."""
        return [self.ring[state].clone()] + [t[state].clone() for p in self.pools.values()
                                             for t in (p.tail_kv, p.tail_gate)]

    def restore(self, state: int, snap: list[torch.Tensor]) -> None:
        self.ring[state].copy_(snap[0])
        for t, v in zip([t for p in self.pools.values() for t in (p.tail_kv, p.tail_gate)], snap[1:]):
            t[state].copy_(v)

    def poison(self, state: int, value: float) -> None:
        """Fill a state with `value` (tests: a row must never read another's state)."""
        self.ring[state].fill_(value)
        for p in self.pools.values():
            p.tail_kv[state].fill_(value)
            p.tail_gate[state].fill_(value)


def ring_read(ring: torch.Tensor, states: torch.Tensor, starts: torch.Tensor,
              n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """From a position-indexed ring (states + 1, R, C) (position p at slot p % R): each row's n positions before
    its start, in order -> (values (rows, n, C), positions (rows, n), -1 before the sequence's start)."""
    pos = starts[:, None] - n + torch.arange(n, device=ring.device)  # (rows, n)
    vals = ring[states].gather(1, (pos % ring.shape[1])[..., None].expand(-1, -1, ring.shape[-1]))
    return vals, torch.where(pos >= 0, pos, -1)


def ring_write(ring: torch.Tensor, states: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor,
               new: torch.Tensor) -> None:
    """Store each row's `counts` real new values (rows, T, C) at their positions' slots; of a chunk longer than
    the ring only its last R (the rest would collide), padding in the scratch state (the last). Nothing older
    than R - n positions is overwritten, which is what lets speculative decoding drop rejected tokens: a ring of
    W + K slots keeps every key a later query can still need while K drafts are written past the window."""
    T, R = new.shape[1], ring.shape[1]
    i = torch.arange(T, device=new.device)[None, :]  # (1, T)
    real = (i < counts[:, None]) & (i >= counts[:, None] - R)
    st = torch.where(real, states[:, None], ring.shape[0] - 1)  # (rows, T)
    ring.index_put_((st, (starts[:, None] + i) % R), new.to(ring.dtype))


class PagedWindow:
    """Layer cache of kind `window` for one forward pass over `batch` (a `PagedBatch`)."""

    @staticmethod
    def storage(spec: LayerCacheSpec, pool) -> WindowStorage:
        """Rings of `pool.slack` extra slots (speculative decoding's drafts: see `ring_write`)."""
        S, dev, dt, k = pool.num_states + 1, pool.device, pool.dtype, pool.slack
        pools = {}
        for p in spec.pools:
            n = pool.num_blocks * (pool.block_size // p.ratio) + 1
            pools[p.name] = PoolStorage(p, torch.zeros(n, p.width, device=dev, dtype=dt),
                                        torch.zeros(S, p.span + k, p.raw, device=dev, dtype=dt),
                                        torch.full((S, p.span + k, p.raw), float("-inf"), device=dev, dtype=dt))
        return WindowStorage(torch.zeros(S, spec.window + k, spec.width, device=dev, dtype=dt), spec.window, pools)

    @staticmethod
    def block_values(spec: LayerCacheSpec, block_size: int) -> int:
        """Values one block holds for this layer (its entries), for the pool's memory budget."""
        return sum(block_size // p.ratio * p.width for p in spec.pools)

    @staticmethod
    def state_values(spec: LayerCacheSpec, slack: int = 0) -> int:
        """Values one sequence state holds for this layer (ring and tails, each `slack` slots longer)."""
        return (spec.window + slack) * spec.width + sum(2 * (p.span + slack) * p.raw for p in spec.pools)

    def __init__(self, batch, data: WindowStorage):
        self.batch, self.data = batch, data

    def update(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv (rows, T, hd) -> keys (rows, W + T, hd) and their positions (rows, W + T): each row's last W
        positions before its new tokens (-1 before its start), then the new ones; the ring keeps the new ones."""
        b, ring = self.batch, self.data.ring
        old, pos = ring_read(ring, b.states, b.starts, self.data.window)  # (rows, W, hd), (rows, W)
        ring_write(ring, b.states, b.starts, b.counts_t, kv)
        return torch.cat([old, kv.to(ring.dtype)], 1), torch.cat([pos, b.positions(kv.shape[1])], 1)

    def pool(self, name: str) -> "PagedPool":
        return PagedPool(self.batch, self.data.pools[name])


class PagedPool:
    """One compressor's pool for one forward pass (the protocol in `qiusuo.model.compressor`)."""

    def __init__(self, batch, data: PoolStorage):
        self.batch, self.data = batch, data

    def history(self, kv: torch.Tensor, gate: torch.Tensor):
        b, d = self.batch, self.data
        span = d.spec.span
        old_kv, pos = ring_read(d.tail_kv, b.states, b.starts, span)  # (rows, span, C): the windows still open
        old_gate = ring_read(d.tail_gate, b.states, b.starts, span)[0]
        old_gate = old_gate.masked_fill((pos < 0)[..., None], float("-inf"))  # no token there: weight 0
        old_kv = old_kv.masked_fill((pos < 0)[..., None], 0.0)
        ring_write(d.tail_kv, b.states, b.starts, b.counts_t, kv)
        ring_write(d.tail_gate, b.states, b.starts, b.counts_t, gate)
        return b.starts, b.counts_t, torch.cat([old_kv, kv.to(old_kv.dtype)], 1), torch.cat(
            [old_gate, gate.to(old_gate.dtype)], 1)

    def append(self, entries: torch.Tensor, valid: torch.Tensor, first: torch.Tensor,
               select: torch.Tensor | None = None) -> torch.Tensor:
        b, d = self.batch, self.data
        m = d.spec.ratio
        if entries.shape[1]:
            k = torch.arange(entries.shape[1], device=entries.device)
            slots = b.entry_slots(m, first[:, None] + k)  # (rows, n)
            slots = torch.where(valid, slots, d.entries.shape[0] - 1)  # invalid: the scratch slot
            d.entries.index_put_((slots.reshape(-1),), entries.reshape(-1, entries.shape[-1]).to(d.entries.dtype))
        w = d.entries.shape[-1]
        if select is not None:  # only the chosen entries, per query: (rows, T, k, w)
            return d.entries.index_select(0, b.entry_slots(m, select).reshape(-1)).view(*select.shape, w)
        total = b.S // m  # every entry the gathered context can hold: a bound from shapes, not from the data
        slots = b.entry_slots(m, torch.arange(total, device=entries.device).expand(len(first), -1))
        return d.entries.index_select(0, slots.reshape(-1)).view(len(first), total, w)  # (rows, n_all, w)
