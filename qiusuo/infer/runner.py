"""The model runner: turns scheduled sequences into model calls and sampled tokens. No scheduling here.

Prefill runs the expanded MLA path over each sequence's uncached prompt tokens, right-padded into batches of at
most `max_prefill_tokens` (rows x longest): one forward over many prompts keeps the matmuls large (batching 32
prompts of 64 tokens was 1.5-2.1x faster than one at a time here); cached prefix blocks are attended, not
recomputed. Decoding runs the absorbed path, one token for every running sequence over its own block table,
eagerly or through `torch.compile` (`compile=True`, opt-in: compiling costs tens of seconds). The model advances
the block tables itself (`PagedBatch.advance`); the runner then names the newly filled blocks for the prefix
cache and samples one token per sequence.
"""

from __future__ import annotations

import torch

from qiusuo.infer.paged import BlockPool, PagedBatch
from qiusuo.infer.sampling import Sampled, sample
from qiusuo.infer.sequence import Sequence


class ModelRunner:
    def __init__(self, model, pool: BlockPool, *, max_batch: int, max_model_len: int, max_prefill_tokens: int,
                 compile: bool = False):
        self.model, self.pool = model, pool
        self.device = pool.device
        self.max_batch, self.max_model_len = max_batch, max_model_len
        self.max_prefill_tokens = max(1, max_prefill_tokens)
        self._compiled = self._compile() if compile else None

    def _compile(self):
        """`model.decode_logits` through `torch.compile`, fed fixed shapes: rows padded to a power of two and the
        context gathered in multiples of 64 tokens, so a few compilations serve every batch (the first steps of
        each new shape take tens of seconds on a CPU). Inductor's freezing folds the weights in as constants
        (prepacked matmuls): after changing the weights, build a new Engine."""
        options = {"freezing": True} if self.device.type == "cpu" else None
        return torch.compile(self.model.decode_logits, options=options)

    def prefill(self, seqs: list[Sequence]) -> Sampled:
        """Newly admitted sequences -> the first sampled token of each. A prompt longer than
        `max_prefill_tokens` is prefilled in pieces of that many tokens first (the same caches as in one go:
        every cache kind continues from `num_cached`), so one long prompt never needs one huge forward; a V4
        prompt pauses at its last full block for the pool to snapshot its window state (prefix caching)."""
        cap = self.max_prefill_tokens
        for s in seqs:
            stop = self.pool.snapshot_boundary(s.table, len(s.req.prompt))
            if stop is not None:  # V4: pause at the last full block to snapshot the state (prefix caching)
                while s.table.num_cached < stop:
                    self._prefill_chunk([s], min(cap, stop - s.table.num_cached))
                self.pool.snapshot(s.table)
            while len(s.req.prompt) - s.table.num_cached > cap:
                self._prefill_chunk([s], cap)
        chunks: list[list[Sequence]] = [[]]
        longest = 0
        for s in seqs:
            n = len(s.req.prompt) - s.table.num_cached
            if chunks[-1] and (len(chunks[-1]) + 1) * max(longest, n) > self.max_prefill_tokens:
                chunks.append([])
                longest = 0
            chunks[-1].append(s)
            longest = max(longest, n)
        return self._sample(seqs, torch.cat([self._prefill_chunk(c) for c in chunks]))

    def _prefill_chunk(self, seqs: list[Sequence], limit: int | None = None) -> torch.Tensor:
        """One padded prefill forward -> logits (B, V) at each row's last new token (`limit`: at most that
        many of each row's uncached prompt tokens)."""
        news = [s.req.prompt[s.table.num_cached:][:limit] for s in seqs]
        T = max(len(n) for n in news)
        ids = torch.tensor([n + [0] * (T - len(n)) for n in news], device=self.device)  # (B, T) right-padded
        h = self.model.hidden(ids, cache=PagedBatch(self.pool, [s.table for s in seqs], [len(n) for n in news]),
                              absorb=False)  # (B, T, D)
        last = torch.tensor([len(n) - 1 for n in news], device=self.device)
        h = h[torch.arange(len(seqs), device=self.device), last]  # (B, D) each row's last prompt token
        for s in seqs:
            self.pool.register(s.table, s.req.prompt)
        return self.model.logits(h)

    def decode(self, seqs: list[Sequence]) -> Sampled:
        """Feed every sequence its pending token -> the next sampled token of each."""
        tables = [s.table for s in seqs]
        tokens = [[s.pending] for s in seqs]
        if self._compiled is None:
            batch = PagedBatch(self.pool, tables, 1)
        else:
            rows = min(1 << (len(seqs) - 1).bit_length(), max(self.max_batch, len(seqs)))  # 1, 2, 4, ... buckets
            length = max(t.num_cached for t in tables) + 1
            length = min(-(-length // 64) * 64, self.max_model_len)  # context gathered in steps of 64 tokens
            tokens += [[0]] * (rows - len(seqs))
            batch = PagedBatch(self.pool, tables, 1, rows=rows, length=length)
        ids = torch.tensor(tokens, device=self.device)  # (rows, 1)
        logits = self.model.decode_step(ids, batch, compiled=self._compiled)[: len(seqs)]  # (B, V)
        for s in seqs:
            s.out.append(s.pending)
            s.pending = None
            self.pool.register(s.table, s.tokens)
        return self._sample(seqs, logits)

    @staticmethod
    def _sample(seqs: list[Sequence], logits: torch.Tensor) -> Sampled:
        return sample(logits, [s.req.params for s in seqs], [s.gen for s in seqs])
