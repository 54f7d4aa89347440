"""Which sequences run: the waiting and running queues, admission, prefix-sharing waits, the memory budget.

Admission is fair between requests: when the batch has room (`max_batch`), the next sequence to join is the
oldest waiting one of the request that holds the fewest batch rows (round robin between requests; the n samples
of one request are n sequences of one request), and no request takes more than `share` rows (default: all but a
quarter of the batch), so a request's n samples or a long generation never fill the batch while others wait: a
short request that arrives behind one with `n=64` finds a free row at once instead of waiting for 32 of its
samples to finish (`qiusuo bench serve --scenario hog`). The price is paid only by a request with more samples
than `share` when it is alone: the rest of its samples run in later rounds. It joins only when the pool can hold
its prompt plus `max_tokens`, reserved up front; when it does not fit, it and everyone behind it wait for running
sequences to finish and free their blocks. Reserving up front means a running sequence never runs out of blocks,
so nothing is ever preempted; allocating blocks as sequences grow would admit more at once, and preemption
(recompute or swap out the youngest, as vLLM does) would then go in `admit`, and could give a hog's rows back.

Prefix-sharing waits: a sequence whose first block of prompt tokens equals that of one admitted in the same
step is not allocated until that one is prefilled, so it finds the shared blocks in the prefix cache: the n
samples of a request (and prompts with a common system prompt) compute their prefix once. `admit` therefore
yields groups, and the caller prefills each group before asking for the next.

The scheduler sees sequences, blocks and bytes, never the model's architecture.
"""

from __future__ import annotations

from typing import Iterator

from qiusuo.cache.pool import BlockPool
from qiusuo.infer.sequence import Request, Sequence


def pool_blocks(bytes_per_token: int, block_size: int, max_batch: int, max_model_len: int,
                cache_memory: int | None) -> int:
    """Blocks for the pool: room for every batch row at full context, within `cache_memory` bytes (default: at
    most 1 GiB). A model whose layers keep no paged rows (V4 with sliding-window layers only: the rings live in
    per-sequence states) has blocks of no bytes; it gets a block for every row at full context, for the tables."""
    per_block = block_size * bytes_per_token
    wanted = -(-max_batch * max_model_len // block_size)
    budget = cache_memory if cache_memory is not None else min(wanted * per_block, 1 << 30)
    num_blocks = min(wanted, budget // per_block) if per_block else wanted
    if num_blocks < 1:
        raise ValueError(f"cache_memory={budget} bytes holds no block of {per_block} bytes; raise it")
    return num_blocks


class Scheduler:
    def __init__(self, pool: BlockPool, max_batch: int, share: int | None = None):
        self.pool, self.max_batch = pool, max_batch
        self.share = share or max_batch - max_batch // 4  # batch rows one request may hold
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []

    def add(self, req: Request) -> None:
        self.waiting.extend(req.seqs)

    def of_request(self, request_id: str) -> list[Sequence]:
        return [s for s in self.waiting + self.running if s.req.id == request_id]

    def decoding(self) -> list[Sequence]:
        """Running sequences that decode this step (those admitted in it are prefilled instead)."""
        return [s for s in self.running if s.finish is None]

    def next_waiting(self) -> Sequence | None:
        """The sequence to admit next: the oldest waiting one of the request holding the fewest rows, among
        requests below their share; None when every waiting request is at its share."""
        rows: dict[int, int] = {}
        for s in self.running:
            rows[id(s.req)] = rows.get(id(s.req), 0) + 1
        best, fewest = None, self.share
        for s in self.waiting:  # in arrival order: the first of equals is the oldest
            n = rows.get(id(s.req), 0)
            if n < fewest:
                best, fewest = s, n
                if n == 0:
                    break
        return best

    def admit(self) -> Iterator[list[Sequence]]:
        """Admit waiting sequences fairly (`next_waiting`), with their blocks, in groups to prefill: a group ends
        before a sequence that shares its first block with one in it (see the module docstring). Prefill each
        group before taking the next: the next allocation looks for the blocks that prefill registers."""
        group: list[Sequence] = []
        heads: set[tuple] = set()  # the group's first blocks, with their adapter
        bs = self.pool.block_size
        while len(self.running) < self.max_batch and (s := self.next_waiting()) is not None:
            head = (s.req.adapter, tuple(s.req.prompt[:bs]))
            if head in heads and len(s.req.prompt) > bs:
                yield group
                group, heads = [], set()
            a = s.req.adapter
            root = None if a is None or a < 0 else hash(("lora", a))  # a prefix cache per adapter
            table = self.pool.allocate(s.req.prompt, len(s.req.prompt) + s.req.params.max_tokens, root)
            if table is None:
                break  # wait for running sequences to free blocks
            self.waiting.remove(s)
            s.table = table
            s.req.cached_tokens += table.num_shared
            self.running.append(s)
            group.append(s)
            heads.add(head)
        if group:
            yield group

    def finish(self, s: Sequence, reason: str) -> bool:
        """Mark `s` finished and free its blocks at once; False if it had finished already."""
        if s.finish is not None:
            return False
        s.finish = reason
        if s.table is not None:
            self.pool.release(s.table)
        if s in self.waiting:
            self.waiting.remove(s)
        return True

    def collect(self) -> None:
        """Drop finished sequences from the running batch (their blocks are already free)."""
        self.running = [s for s in self.running if s.finish is None]
