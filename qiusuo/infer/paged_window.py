"""DeepSeek-V4's layer caches in the paged engine: the `window` kind of `qiusuo.model.cache`, paged.

What a V4 layer keeps, and where it lives here:
- the sliding window: the last W keys (= values) of the layer's one head, a ring of W slots per *sequence state*
  (slot = position % W): constant memory whatever the context;
- each compressor's tail: the raw projections (kv and gate) of its last `span` tokens, the windows still open,
  also per sequence state (`span` slots, position % span);
- each compressor's entries (CSA's main and indexer pools, HCA's pool): one per m tokens, paged in the pool's
  blocks like MLA's latents. The block size is a multiple of every m (`window_block_size`), so a block holds
  exactly block_size / m entries: entry e of a sequence lives in its block table's block (e m) // bs at
  sub-slot ((e m) % bs) / m.
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
    tail_kv: torch.Tensor  # (states + 1, span, C)
    tail_gate: torch.Tensor  # (states + 1, span, C), -inf where no token was


@dataclass
class WindowStorage:
    ring: torch.Tensor  # (states + 1, W, hd), last: the scratch state
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


class PagedWindow:
    """Layer cache of kind `window` for one forward pass over `batch` (a `PagedBatch`)."""

    @staticmethod
    def storage(spec: LayerCacheSpec, pool) -> WindowStorage:
        S, dev, dt = pool.num_states + 1, pool.device, pool.dtype
        pools = {}
        for p in spec.pools:
            n = pool.num_blocks * (pool.block_size // p.ratio) + 1
            pools[p.name] = PoolStorage(p, torch.zeros(n, p.width, device=dev, dtype=dt),
                                        torch.zeros(S, p.span, p.raw, device=dev, dtype=dt),
                                        torch.full((S, p.span, p.raw), float("-inf"), device=dev, dtype=dt))
        return WindowStorage(torch.zeros(S, spec.window, spec.width, device=dev, dtype=dt), pools)

    @staticmethod
    def block_values(spec: LayerCacheSpec, block_size: int) -> int:
        """Values one block holds for this layer (its entries), for the pool's memory budget."""
        return sum(block_size // p.ratio * p.width for p in spec.pools)

    @staticmethod
    def state_values(spec: LayerCacheSpec) -> int:
        """Values one sequence state holds for this layer (ring and tails)."""
        return spec.window * spec.width + sum(2 * p.span * p.raw for p in spec.pools)

    def __init__(self, batch, data: WindowStorage):
        self.batch, self.data = batch, data

    def update(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """kv (rows, T, hd) -> keys (rows, W + T, hd) and their positions (rows, W + T): each row's last W
        positions before its new tokens (-1 before its start), then the new ones; the ring keeps the last W."""
        b, ring = self.batch, self.data.ring
        W = ring.shape[1]
        L, counts, st = b.starts, b.counts_t, b.states  # (rows,)
        j = torch.arange(W, device=kv.device)
        old = L[:, None] - W + j  # (rows, W) positions
        rows = ring[st]  # (rows, W, hd)
        ordered = rows.gather(1, (old % W)[..., None].expand(-1, -1, ring.shape[-1]))
        keys = torch.cat([ordered, kv.to(ring.dtype)], 1)
        key_pos = torch.cat([torch.where(old >= 0, old, -1), b.positions(kv.shape[1])], 1)
        keep = keys.gather(1, (counts[:, None] + j)[..., None].expand(-1, -1, ring.shape[-1]))  # the last W real
        ring.index_put_((st[:, None].expand(-1, W), ((L + counts)[:, None] - W + j) % W), keep)
        return keys, key_pos

    def pool(self, name: str) -> "PagedPool":
        return PagedPool(self.batch, self.data.pools[name])


class PagedPool:
    """One compressor's pool for one forward pass (the protocol in `qiusuo.model.compressor`)."""

    def __init__(self, batch, data: PoolStorage):
        self.batch, self.data = batch, data

    def history(self, kv: torch.Tensor, gate: torch.Tensor):
        b, d = self.batch, self.data
        span = d.tail_kv.shape[1]
        st, counts = b.states, b.counts_t
        seq_kv = torch.cat([d.tail_kv[st], kv.to(d.tail_kv.dtype)], 1)  # (rows, span + T, C)
        seq_gate = torch.cat([d.tail_gate[st], gate.to(d.tail_gate.dtype)], 1)
        last = (counts[:, None] + torch.arange(span, device=kv.device))[..., None].expand(-1, -1, kv.shape[-1])
        d.tail_kv[st] = seq_kv.gather(1, last)  # each row's last `span` real tokens
        d.tail_gate[st] = seq_gate.gather(1, last)
        return b.starts, counts, seq_kv, seq_gate

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
