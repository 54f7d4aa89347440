"""The block pool every layer cache lives in, its prefix cache, and the batch view the model sees per forward.

A sequence owns a block table; token position p lives at slot `table[p // bs] * bs + p % bs` of every layer's
storage. Requests of any length join and leave without copying anybody's cache, and memory is bounded by the
pool. What a layer stores is its kind's business (`qiusuo.cache.spec.LAYER_KINDS`, built from
`model.cache_specs()`): MLA's latents in slots, V4's compressed entries in the blocks and its windows in one
*sequence state* per running sequence, taken at admission like blocks. The pool sees blocks, states and bytes;
it asks every layer alike to reset, snapshot and restore a state (stateless kinds do nothing).

Prefix cache (like vLLM's, with small blocks): a FULL block is named by `hash((parent_hash, its token ids))`,
so two prompts that agree on their first k blocks share them. Blocks have reference counts; a cached block whose
count drops to 0 is not wiped but parked in an LRU list, reused by the next prompt with the same prefix or
evicted (oldest first) when fresh blocks run out. Blocks are only written while their owner is the only
reader: a shared block is full, and writes go to positions past the shared prefix.

`PagedBatch` is the view the model sees for one forward pass (the cache protocol of `qiusuo.cache.spec`): each
layer's kind binds to it (`bind`), asking for the per-batch tensors it reads (`token_slots`: per-token slots,
write slots and mask; `row_states`: each row's sequence state and block table), all built before the forward;
`advance` then moves every row's block table on by the tokens it added.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from qiusuo.cache.precision import CacheDtype
from qiusuo.cache.spec import LayerCacheSpec, block_bytes, block_size_for, kind_of, state_bytes


@dataclass
class BlockTable:
    """One sequence's blocks. `hashes[i]` is set once block i is full and registered in the prefix cache."""

    blocks: list[int] = field(default_factory=list)
    hashes: list[int | None] = field(default_factory=list)
    num_cached: int = 0  # tokens whose latents are in the cache
    num_shared: int = 0  # prompt tokens found in the prefix cache at allocation
    num_hashed: int = 0  # leading blocks already named (registering is incremental)
    root: int | None = None  # where its prefix-hash chain starts: the LoRA adapter that computed its blocks
    state: int | None = None  # the sequence state (V4's windows), for kinds that keep one


class BlockPool:
    """The block pool of all layers: `layers[l]` is layer l's storage, an instance of its kind's class in
    `LAYER_KINDS` built from `specs[l]`. `dtype`: the cache's precision (`CacheDtype.of`: a torch dtype, "bf16",
    "fp8", ...). `num_states`: sequence states for kinds that keep one (V4: one per batch row); 0 when no layer
    needs them.

    Speculative decoding (`infer/speculative.py`): `slack` = the drafts a step may write past a sequence's
    length (V4's rings get that many more slots, so rejected drafts overwrite nothing still needed); `drafter`:
    the last layer is the MTP drafter, whose entry at position p depends on token p + 1 as well, so a block is
    named by its tokens AND the token after it (a prompt continuing differently must not share the block)."""

    def __init__(self, specs: list[LayerCacheSpec], num_blocks: int, block_size: int = 16, device=None,
                 dtype: CacheDtype | torch.dtype | str = torch.float32, num_states: int = 0, slack: int = 0,
                 drafter: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks} and {block_size}")
        self.cache_dtype = CacheDtype.of(dtype)
        stateful = state_bytes(specs, self.cache_dtype) > 0  # an unknown kind fails here, naming the known ones
        if stateful and num_states < 1:
            raise ValueError(f"these layers keep per-sequence state (DeepSeek-V4's windows): need num_states >= 1, "
                             f"got {num_states}")
        if block_size != block_size_for(specs, block_size):
            raise ValueError(f"these layers need a block size every compression rate divides (got {block_size}; "
                             f"use {block_size_for(specs, block_size)})")
        self.specs, self.block_size, self.num_blocks = list(specs), block_size, num_blocks
        self.device = torch.device(device or "cpu")
        self.slack, self.lookahead = slack, int(drafter)  # lookahead: tokens past a block that name it
        self.num_states = num_states if stateful else 0
        self.free_states = list(range(self.num_states - 1, -1, -1))
        # V4's windows are per sequence: sharing a prefix also needs a snapshot of them at its end (cache/window.py)
        self.snapshots: OrderedDict[int, list] = OrderedDict()  # block hash -> per-layer state snapshots, LRU
        self.max_snapshots = 4 * self.num_states
        # one extra slot past the blocks: padding rows and positions write there and read it masked out
        self.scratch = num_blocks * block_size
        # tensors per layer, not views of one (L, slots, C) tensor: a compiled step then writes its new latents
        # in place; through a view, functionalisation copied the whole pool back every step (11 ms of a 12 ms step)
        self.layers = [kind_of(s)(s, self) for s in self.specs]
        self.refcount = [0] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.lru: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, oldest first
        self.by_hash: dict[int, int] = {}  # prefix hash -> block
        self.block_hash: dict[int, int] = {}  # block -> prefix hash
        self.block_tokens: dict[int, tuple[int, ...]] = {}  # block -> its tokens (guards against hash collisions)
        self.hit_tokens = 0  # prompt tokens served from the prefix cache, for /metrics

    @property
    def bytes_per_token(self) -> float:
        """Cache bytes per token in blocks over all layers (MLA: = `qiusuo.model.count.cache_bytes_per_token`;
        V4: its compressed entries; its windows are per sequence state: `state_bytes`)."""
        return block_bytes(self.specs, self.block_size, self.cache_dtype) / self.block_size

    @property
    def state_bytes(self) -> int:
        """Bytes one sequence state holds over all layers (0 when no layer keeps one)."""
        return state_bytes(self.specs, self.cache_dtype, self.slack)

    @property
    def used_blocks(self) -> int:
        """Blocks some running sequence holds (parked prefix-cache blocks are free to reuse)."""
        return self.num_blocks - len(self.free) - len(self.lru)

    @staticmethod
    def chain_hash(parent: int | None, tokens: tuple[int, ...]) -> int:
        return hash((parent, tokens))

    def _match(self, tokens: list[int], num_blocks: int, root: int | None = None) -> list[int]:
        """Cached blocks holding the longest prefix of `tokens` of at most `num_blocks` full blocks (read-only),
        computed under the same adapter (`root`)."""
        bs, out, parent = self.block_size, [], root
        for i in range(num_blocks):
            chunk = tuple(tokens[i * bs:(i + 1) * bs + self.lookahead])
            h = self.chain_hash(parent, chunk)
            b = self.by_hash.get(h)
            if b is None or self.block_tokens[b] != chunk:
                break
            out.append(b)
            parent = h
        if self.num_states:  # V4: only up to the deepest block whose state was snapshotted
            while out and self.block_hash[out[-1]] not in self.snapshots:
                out.pop()
        return out

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate(self, prompt: list[int], total_tokens: int, root: int | None = None) -> BlockTable | None:
        """Blocks for a sequence that will hold up to `total_tokens`, reusing cached blocks of `prompt`'s prefix.
        At least the last prompt token is always recomputed (its logits start decoding). None if the pool
        cannot hold it now (the caller waits for running sequences to finish).

        `root` starts the hash chain: a LoRA adapter on the attention changes every cached latent, so blocks are
        shared only between sequences of the same adapter (None: the base model), never across adapters."""
        shared = self._match(prompt, max(len(prompt) - 1, 0) // self.block_size, root)
        fresh = self.blocks_for(total_tokens) - len(shared)
        revived = sum(1 for b in shared if self.refcount[b] == 0)
        if fresh > len(self.free) + len(self.lru) - revived or (self.num_states and not self.free_states):
            return None
        table = BlockTable(root=root)
        if self.num_states:
            table.state = self.free_states.pop()
            snap = self.snapshots.get(self.block_hash[shared[-1]]) if shared else None
            for i, layer in enumerate(self.layers):
                layer.restore(table.state, snap[i]) if snap else layer.reset(table.state)
            if snap:
                self.snapshots.move_to_end(self.block_hash[shared[-1]])
        for b in shared:
            if self.refcount[b] == 0:
                del self.lru[b]
            self.refcount[b] += 1
            table.blocks.append(b)
            table.hashes.append(self.block_hash[b])
        for _ in range(fresh):
            b = self._take()
            self.refcount[b] = 1
            table.blocks.append(b)
            table.hashes.append(None)
        table.num_cached = table.num_shared = len(shared) * self.block_size
        table.num_hashed = len(shared)
        self.hit_tokens += table.num_shared
        return table

    def _take(self) -> int:
        if self.free:
            return self.free.pop()
        b, _ = self.lru.popitem(last=False)  # evict the least recently used cached block
        self.snapshots.pop(self.block_hash[b], None)
        del self.by_hash[self.block_hash.pop(b)]
        del self.block_tokens[b]
        return b

    def register(self, table: BlockTable, tokens: list[int]) -> None:
        """Name every newly filled block of `table` (tokens = the sequence's tokens, at least num_cached; with a
        drafter, a block waits for the token after it)."""
        bs = self.block_size
        filled = min(table.num_cached, len(tokens) - self.lookahead) // bs
        for i in range(table.num_hashed, filled):
            parent = table.hashes[i - 1] if i else table.root
            chunk = tuple(tokens[i * bs:(i + 1) * bs + self.lookahead])
            h = self.chain_hash(parent, chunk)
            table.hashes[i] = h
            b = table.blocks[i]
            if h not in self.by_hash:  # else an identical block exists already; ours stays private
                self.by_hash[h], self.block_hash[b], self.block_tokens[b] = b, h, chunk
        table.num_hashed = max(table.num_hashed, filled)

    def snapshot_boundary(self, table: BlockTable, prompt_len: int) -> int | None:
        """Where the runner should pause a V4 prefill to snapshot the state: the prompt's last full-block
        boundary short of its last token, if the sequence has not passed it; None for MLA-only pools."""
        if not self.num_states:
            return None
        boundary = (prompt_len - 1) // self.block_size * self.block_size
        return boundary if boundary > table.num_cached else None

    def snapshot(self, table: BlockTable) -> None:
        """Keep a copy of the sequence's state under its last full block's hash (after `register`), so prompts
        sharing the blocks up to here can start here; the oldest snapshots go beyond `max_snapshots`."""
        n = table.num_cached // self.block_size
        if not n or table.hashes[n - 1] is None or table.num_cached % self.block_size:
            return
        h = table.hashes[n - 1]
        if self.by_hash.get(h) != table.blocks[n - 1]:
            return  # an identical block of another sequence holds the name: its snapshot serves
        self.snapshots[h] = [layer.snapshot(table.state) for layer in self.layers]
        self.snapshots.move_to_end(h)
        while len(self.snapshots) > self.max_snapshots:
            self.snapshots.popitem(last=False)

    def release(self, table: BlockTable) -> None:
        """Drop the sequence's references; cached blocks park in the LRU (tail blocks first, so a shared prefix
        outlives its continuations), the rest return to the free list."""
        for b in reversed(table.blocks):
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                if b in self.block_hash:
                    self.lru[b] = None
                else:
                    self.free.append(b)
        table.blocks, table.hashes = [], []
        if table.state is not None:
            self.free_states.append(table.state)
            table.state = None

    def slots(self, tables: list[BlockTable], length: int, rows: int | None = None) -> torch.Tensor:
        """(rows, length) flat slot of each position of each row; positions past a row's blocks, and padding rows
        past len(tables), map to the scratch slot."""
        nb, bs = self.blocks_for(length), self.block_size
        pad = [-1] * nb
        bt = torch.tensor([(t.blocks[:nb] + pad)[:nb] for t in tables] + [pad] * ((rows or len(tables)) - len(tables)),
                          dtype=torch.long)  # (rows, nb), -1 = no block
        pos = torch.arange(length)
        b = bt[:, pos // bs]  # (rows, length)
        return torch.where(b >= 0, b * bs + pos % bs, self.scratch).to(self.device)


class PagedBatch:
    """The `Cache` protocol over `pool` for one forward pass: row i of `tables` adds `counts[i]` new tokens (its
    uncached prompt when prefilling, 1 when decoding), right-padded to the longest. Padding positions write to the
    pool's scratch slot and are masked out, so rows of any lengths prefill together.

    `rows` and `length` pad the batch to fixed shapes (extra rows of scratch slots, context gathered up to
    `length` positions), which is what a compiled decoding step needs to run again without recompiling. Every
    tensor is built here, before the forward pass, and `advance` (called by the model after it, outside any
    compiled graph) only moves the tables' `num_cached` on: the forward itself has no Python side effects."""

    def __init__(self, pool: BlockPool, tables: list[BlockTable], counts: list[int] | int, rows: int | None = None,
                 length: int | None = None, offset: int = 0, width: int = 0):
        device = pool.device
        counts = [counts] * len(tables) if isinstance(counts, int) else list(counts)
        self.tables, self.counts = tables, counts
        rows = rows or len(tables)
        self.T = T = max(max(counts), width)  # width: new tokens per row padded to a fixed count (compiled steps)
        # offset: new tokens start that far past each row's length (speculative drafts, written and not kept)
        starts = [t.num_cached + offset for t in tables] + [0] * (rows - len(tables))
        self.S = max(length or 0, max(st + c for st, c in zip(starts, counts)))
        start = torch.tensor(starts, dtype=torch.long, device=device)  # (rows,)
        n = torch.tensor(counts + [0] * (rows - len(tables)), dtype=torch.long, device=device)  # (rows,)
        self._positions = start[:, None] + torch.arange(T, device=device)  # (rows, T)
        self.pool, self.starts, self.counts_t = pool, start, n  # (rows,): V4's layer caches read these
        self._rows, self._length, self._equal = rows, length, len(set(starts)) == 1 and len(set(counts)) == 1
        self._layers = [layer.bind(self) for layer in pool.layers]  # each asks for the tensors it reads

    def positions(self, T: int) -> torch.Tensor:
        return self._positions

    def token_slots(self) -> None:
        """Build (once) what per-token kinds read: `slots` (rows, S) of every context position, `write`
        (rows, T) of the new ones (padding: the scratch slot) and `mask` (rows, 1, T, S) | None."""
        if hasattr(self, "slots"):
            return
        pool, rows, T, device = self.pool, self._rows, self.T, self.pool.device
        self.slots = pool.slots(self.tables, self.S, rows)  # (rows, S) read
        real = torch.arange(T, device=device)[None, :] < self.counts_t[:, None]  # (rows, T) not padding
        self.write = torch.where(real, self.slots.gather(1, self._positions.clamp_max(self.S - 1)), pool.scratch)
        if T == 1 and self._equal and rows == len(self.tables) and self._length is None:
            self.mask = None  # one new token per row, equal lengths: every gathered slot is attended
        else:
            # causal over each row's own positions; padding rows (start 0) attend their scratch slot: never an empty
            # softmax. Padding queries of a real row read stale slots of its own blocks: finite, and discarded
            s = torch.arange(self.S, device=device)[None, None, :]  # (1, 1, S)
            self.mask = (s <= self._positions[:, :, None])[:, None]  # (rows, 1, T, S)

    def row_states(self) -> None:
        """Build (once) what per-sequence-state kinds read: `states` (rows,) each row's state (padding: the
        scratch state) and `block_ids` (rows, nb) its block table (-1 past its blocks)."""
        if hasattr(self, "states"):
            return
        pool, pad, device = self.pool, self._rows - len(self.tables), self.pool.device
        self.states = torch.tensor([t.state for t in self.tables] + [pool.num_states] * pad, dtype=torch.long,
                                   device=device)
        nb = max([len(t.blocks) for t in self.tables] + [1])
        self.block_ids = torch.tensor([t.blocks + [-1] * (nb - len(t.blocks)) for t in self.tables]
                                      + [[-1] * nb] * pad, dtype=torch.long, device=device)

    def layer(self, i: int):
        return self._layers[i]

    def advance(self, T: int) -> None:
        """Each row's table now holds its own count of new tokens (T is the padded width)."""
        for table, n in zip(self.tables, self.counts):
            table.num_cached += n
