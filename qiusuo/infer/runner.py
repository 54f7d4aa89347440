"""The model runner: turns scheduled sequences into model calls and sampled tokens. No scheduling here.

Prefill runs the expanded MLA path over each sequence's uncached prompt tokens, right-padded into batches of at
most `max_prefill_tokens` (rows x longest): one forward over many prompts keeps the matmuls large (batching 32
prompts of 64 tokens was 1.5-2.1x faster than one at a time here); cached prefix blocks are attended, not
recomputed. Decoding runs the absorbed path, one token for every running sequence over its own block table,
eagerly or through `torch.compile` (`compile=True`, opt-in: compiling costs tens of seconds). The model advances
the block tables itself (`PagedBatch.advance`); the runner then names the newly filled blocks for the prefix
cache and samples one token per sequence.

With `draft_tokens` K > 0 (speculative decoding, `speculative.py`), a decoding step instead verifies each row's
pending token and its drafts (1 + k <= 1 + K tokens per row, absorbed attention), accepts, rolls every row back to
its accepted length, and runs the MTP drafter over the same positions; prefill runs the drafter over the prompt.

Prompt scoring (`score`: echo's prompt logprobs, lm-eval's loglikelihood) is a forward of its own, outside both.

LoRA adapters (a model whose layers carry a bank of them: `qiusuo.lora.peft.attach`): every forward runs each row
with its request's adapter (`Request.adapter`), so requests for different adapters share one batch; the adapter
layers gather each row's A and B (punica's BGMV), and a batch whose rows all use one adapter runs plain matmuls.
"""

from __future__ import annotations

import contextlib

import torch

from qiusuo.cache.contiguous import ContiguousCache
from qiusuo.cache.pool import BlockPool, PagedBatch
from qiusuo.infer import constraint
from qiusuo.infer.output import PromptLogprobs
from qiusuo.infer.sampling import Sampled, sample, scored_tokens
from qiusuo.infer.sequence import Sequence
from qiusuo.infer.speculative import Counters, Emitted, accept, propose
from qiusuo.lora.layers import adapter_rows, lora_layers


# speculative decoding gives up on a sequence whose first draft was accepted in under MIN_ACCEPTANCE of its
# first PROBE drafting steps (`ModelRunner._give_up`)
PROBE, MIN_ACCEPTANCE = 16, 0.1
LOGIT_ROWS = 256  # prompt positions whose logits `score` holds at once: (256, V) floats


class ModelRunner:
    """`draft_tokens` K > 0: speculative decoding with the model's MTP module (`speculative.py`); the pool then
    holds the drafter's layer (`cache_specs(draft=True)`) and K slots of slack."""

    def __init__(self, model, pool: BlockPool, *, max_batch: int, max_model_len: int, max_prefill_tokens: int,
                 compile: bool = False, draft_tokens: int = 0):
        self.model, self.pool = model, pool
        self.device = pool.device
        self.max_batch, self.max_model_len = max_batch, max_model_len
        self.max_prefill_tokens = max(1, max_prefill_tokens)
        self.K = draft_tokens
        self.counters = Counters(draft_tokens)
        self.masker = constraint.Masker()  # structured output: each step's masks computed while the model runs
        self.lora = lora_layers(model)  # adapter layers: each row runs its request's adapter
        if compile and self.lora:
            raise ValueError("compiled decoding freezes the weights it sees, and LoRA adapters change per row: "
                             "serve adapters without --compile")
        self._compiled = self._compile() if compile else None

    def _compile(self):
        """The decoding step through `torch.compile`, fed fixed shapes: rows padded to a power of two and the
        context gathered in multiples of 64 tokens, so a few compilations serve every batch (the first steps of
        each new shape take tens of seconds on a CPU). Inductor's freezing folds the weights in as constants
        (prepacked matmuls): after changing the weights, build a new Engine. For the same reason the step keeps no
        guards on the model's modules (`skip_guard_on_all_nn_modules_unsafe`): the frozen graph is of this model
        as it was, and checking its hundreds of module attributes before every step cost ~1 ms of a ~17 ms
        compiled step at the 760M shape (docs/quant.md); the inputs' guards (shapes, the cache) stay. Speculative
        decoding compiles its verification (K + 1 tokens per row) and the drafter instead of `decode_logits`."""
        options = None
        if self.device.type == "cpu":
            options = {"freezing": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
        if not self.K:
            return torch.compile(self.model.decode_logits, options=options)
        return (torch.compile(self.model.verify_logits, options=options),
                torch.compile(self.model.draft_states, options=options),
                torch.compile(self.model.decode_logits, options=options))  # steps where no row drafts

    def _adapters(self, adapters: list[int], rows: int | None = None):
        """The context of a forward whose row r serves adapter `adapters[r]` (-1: the base; padding rows up to
        `rows`: the base too); None: the model as it is (an engine given no adapter names)."""
        if not self.lora or adapters[0] is None:
            return contextlib.nullcontext()
        a = adapters + [-1] * ((rows or len(adapters)) - len(adapters))
        if len(set(a)) == 1:  # one adapter for the whole batch: plain matmuls, no gather
            return adapter_rows(self.lora, a[0])
        return adapter_rows(self.lora, torch.tensor(a, device=self.device))

    # ---- prefill ----

    def prefill(self, seqs: list[Sequence]) -> Sampled:
        """Newly admitted sequences -> the first sampled token of each. A prompt longer than
        `max_prefill_tokens` is prefilled in pieces of that many tokens first (the same caches as in one go:
        every cache kind continues from `num_cached`), so one long prompt never needs one huge forward; a V4
        prompt pauses at its last full block for the pool to snapshot its window state (prefix caching). With
        a drafter, each piece also fills the drafter's cache, and the first drafts follow the sampled token."""
        cap = self.max_prefill_tokens
        for s in seqs:
            stop = self.pool.snapshot_boundary(s.table, len(s.req.prompt))
            if stop is not None:  # V4: pause at the last full block to snapshot the state (prefix caching)
                while s.table.num_cached < stop:
                    self._prefill_piece(s, min(cap, stop - s.table.num_cached))
                self.pool.snapshot(s.table)
            while len(s.req.prompt) - s.table.num_cached > cap:
                self._prefill_piece(s, cap)
        chunks: list[list[Sequence]] = [[]]
        longest = 0
        for s in seqs:
            n = len(s.req.prompt) - s.table.num_cached
            if chunks[-1] and (len(chunks[-1]) + 1) * max(longest, n) > self.max_prefill_tokens:
                chunks.append([])
                longest = 0
            chunks[-1].append(s)
            longest = max(longest, n)
        self.masker.start(seqs, self.model.cfg.vocab_size)  # structured output: masks while the model runs
        passes = [self._prefill_forward(c) for c in chunks]
        rows = [(state, torch.tensor([len(n) - 1 for n in news], device=self.device)) for state, _, news in passes]
        h = torch.cat([self.model.collapse(st)[torch.arange(len(i), device=self.device), i] for st, i in rows])
        sampled = self._sample(seqs, self.model.logits(h))  # (B, D) each row's last prompt token -> its token
        done = 0
        for c, (state, batch, news), (_, last) in zip(chunks, passes, rows):
            toks = sampled.tokens[done: done + len(c)]
            done += len(c)
            if self.K:  # the drafter reads each position's next token: the prompt's, then the sampled one
                self._draft(c, state, batch, [n[1:] + [t] for n, t in zip(news, toks)], last, False, [0] * len(c))
            for s, t in zip(c, toks):
                # with a drafter, a block is named with the token after it (the sampled one at the prompt's end)
                self.pool.register(s.table, s.req.prompt + ([t] if self.K else []))
        return sampled

    def _prefill_piece(self, s: Sequence, limit: int) -> None:
        """Prefill the next `limit` prompt tokens of `s` (more of the prompt follows)."""
        state, batch, news = self._prefill_forward([s], limit)
        if self.K:
            start = s.table.num_cached - len(news[0])
            self._draft([s], state, batch, [s.req.prompt[start + 1: start + len(news[0]) + 1]])
        self.pool.register(s.table, s.req.prompt)

    def _prefill_forward(self, seqs: list[Sequence], limit: int | None = None):
        """One padded prefill forward over each row's uncached prompt tokens (at most `limit`) -> (the last
        residual state (B, T, ...), its PagedBatch, each row's new tokens)."""
        news = [s.req.prompt[s.table.num_cached:][:limit] for s in seqs]
        T = max(len(n) for n in news)
        ids = torch.tensor([n + [0] * (T - len(n)) for n in news], device=self.device)  # (B, T) right-padded
        batch = PagedBatch(self.pool, [s.table for s in seqs], [len(n) for n in news])
        with self._adapters([s.req.adapter for s in seqs]):
            state = self.model.states(ids, cache=batch, absorb=False)
        return state, batch, news

    # ---- prompt scoring ----

    def score(self, prompts: list[list[int]], k: list[int], adapters: list[int] | None = None) -> list[PromptLogprobs]:
        """Each prompt's `PromptLogprobs` with `k[i]` top entries per position, from a scoring forward over the
        whole prompt through a contiguous cache of its own: the paged pool and the prefix cache are not touched.

        Why not from the prefill: the prefill skips the prompt blocks the prefix cache holds (lm-eval's choices
        share their context, so most of each choice is skipped) and takes logits at the last position only;
        scoring there would put a recomputation path for cached blocks and full-width logits into the hot path
        of every request. A forward of its own leaves prefill and decoding exactly as they are for requests that
        do not ask, at the price of computing the prompt twice when the request also generates (`max_tokens` 0
        does not). Prompts are batched as in prefill (right-padded rows, rows x longest <= max_prefill_tokens,
        similar lengths together); a longer prompt runs alone in pieces of that many positions, the cache
        carrying the context; logits are taken LOGIT_ROWS positions at a time, so a long prompt over a large
        vocabulary never holds (T, V) logits at once. `adapters`: each prompt's LoRA adapter (default: none)."""
        adapters = adapters or [-1] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        groups: list[list[int]] = [[]] if prompts else []
        longest = 0
        for i in order:
            n = len(prompts[i])
            if groups[-1] and (len(groups[-1]) + 1) * max(longest, n) > self.max_prefill_tokens:
                groups.append([])
                longest = 0
            groups[-1].append(i)
            longest = max(longest, n)
        out: list[PromptLogprobs | None] = [None] * len(prompts)
        for g in groups:
            with self._adapters([adapters[i] for i in g]):
                scored_rows = self._score_rows([prompts[i] for i in g], [k[i] for i in g])
            for i, scored in zip(g, scored_rows):
                out[i] = scored
        return out

    def _score_rows(self, rows: list[list[int]], k: list[int]) -> list[PromptLogprobs]:
        """One batch of `score`: position t's logits score token t + 1 of its row."""
        B, T = len(rows), max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (T - len(r)) for r in rows], device=self.device)  # (B, T) right-padded
        scores_of = torch.tensor([len(r) - 1 for r in rows], device=self.device)  # (B,) positions that score
        cache = ContiguousCache(self.model.cache_specs(), B, T, device=self.device, dtype=self.pool.cache_dtype)
        out = [PromptLogprobs([None], [None], [None]) for _ in rows]
        width = max(1, self.max_prefill_tokens // B)
        for a in range(0, T, width):
            b = min(a + width, T)
            h = self.model.collapse(self.model.states(ids[:, a:b], cache=cache, absorb=False))  # (B, b - a, D)
            pos = torch.arange(a, b, device=self.device)  # (b - a,)
            r_idx, t_idx = (pos[None, :] < scores_of[:, None]).nonzero(as_tuple=True)  # (N,) row-major
            h, nxt = h[r_idx, t_idx], ids[r_idx, a + t_idx + 1]  # (N, D), (N,)
            rows_of = r_idx.tolist()
            for s in range(0, len(rows_of), LOGIT_ROWS):
                lps, ranks, tops = scored_tokens(self.model.logits(h[s: s + LOGIT_ROWS]), nxt[s: s + LOGIT_ROWS],
                                                 max(k))
                for r, lp, rank, top in zip(rows_of[s: s + LOGIT_ROWS], lps, ranks, tops):
                    out[r].logprobs.append(lp)
                    out[r].ranks.append(rank)
                    out[r].top.append(top[: k[r]])
        return out

    # ---- decoding ----

    def decode(self, seqs: list[Sequence]) -> Sampled | Emitted:
        """Feed every sequence its pending token -> the next sampled token of each (with a drafter: verify the
        drafts too -> the tokens each sequence emits)."""
        if self.K:
            return self._speculate(seqs)
        tables = [s.table for s in seqs]
        batch = self._batch(tables, 1)
        ids = torch.tensor([[s.pending] for s in seqs] + [[0]] * (len(batch.starts) - len(seqs)),
                           device=self.device)  # (rows, 1)
        with self._adapters([s.req.adapter for s in seqs], len(batch.starts)):
            self.masker.start(seqs, self.model.cfg.vocab_size)
            logits = self.model.decode_step(ids, batch, compiled=self._compiled)[: len(seqs)]  # (B, V)
        for s in seqs:
            s.out.append(s.pending)
            s.pending = None
            self.pool.register(s.table, s.tokens)
        return self._sample(seqs, logits)

    def _batch(self, tables, T: int, counts: list[int] | None = None) -> PagedBatch:
        """The decoding PagedBatch: as it is eagerly; compiled, rows padded to a power of two and the context to a
        multiple of 64 tokens (fixed shapes)."""
        if self._compiled is None:
            return PagedBatch(self.pool, tables, counts or T)
        rows = min(1 << (len(tables) - 1).bit_length(), max(self.max_batch, len(tables)))  # 1, 2, 4, ... buckets
        length = max(t.num_cached for t in tables) + T
        length = min(-(-length // 64) * 64, self.max_model_len)  # context gathered in steps of 64 tokens
        return PagedBatch(self.pool, tables, counts or T, rows=rows, length=length, width=T)

    def _speculate(self, seqs: list[Sequence]) -> Emitted:
        """Verify each row's pending token and drafts in one forward, accept, roll back, draft again."""
        n = len(seqs)
        tables = [s.table for s in seqs]
        # a row emits at most max_tokens: the drafts it may still use (the cache holds them: reserved up front)
        drafts = [s.drafts[: max(0, min(len(s.drafts), s.req.params.max_tokens - len(s.out) - 2))] for s in seqs]
        widest = max(len(d) for d in drafts)
        T = 1 + (self.K if self._compiled and widest else widest)  # compiled: one shape
        batch = self._batch(tables, T, [len(d) + 1 for d in drafts])
        rows = len(batch.starts)
        ids = torch.tensor([[s.pending] + d + [0] * (T - 1 - len(d)) for s, d in zip(seqs, drafts)]
                           + [[0] * T] * (rows - n), device=self.device)  # (rows, T)
        self.masker.start(seqs, self.model.cfg.vocab_size)
        if self._compiled and not widest and not any(s.drafting for s in seqs):  # all gave up: a plain step
            state, logits = None, self._compiled[2](ids, batch)[:, None]
        else:
            verify = self._compiled[0] if self._compiled else self.model.verify_logits
            with self._adapters([s.req.adapter for s in seqs], rows):  # drafts come from the base's MTP module
                state, logits = verify(ids, batch)  # (rows, T, ...), (rows, T, V)
        emitted = accept(logits[:n], drafts, [s.draft_q[: len(d)] for s, d in zip(seqs, drafts)],
                         [s.req.params for s in seqs], [s.gen for s in seqs],
                         self.masker.allowed(seqs, logits.shape[-1]))  # constrained rows never draft
        constraint.advance(seqs, [toks[0] if toks else None for toks in emitted.tokens], emitted.errors)
        for s, d, toks in zip(seqs, drafts, emitted.tokens):
            self.counters.add(len(d), len(toks))
            self._give_up(s, d, toks)
        live = [i for i, s in enumerate(seqs) if s.drafting]  # rows whose drafter keeps up (see `_give_up`)
        compiled = self._compiled is not None and len(live) == n  # a subset runs eagerly: no new shapes to compile
        if len(live) < n and live:  # the drafter over those rows alone, at the verified positions
            dstate = state[torch.tensor(live, device=self.device)]
            dbatch = PagedBatch(self.pool, [tables[i] for i in live], [len(drafts[i]) + 1 for i in live], width=T)
        else:
            dstate, dbatch = state, batch
        for s, toks in zip(seqs, emitted.tokens):
            s.table.num_cached += len(toks)  # the pending token and the accepted drafts: the rest is rolled back
        if live:  # the drafter over the same positions: position t reads the token at t + 1 (drafts, the bonus)
            toks = [emitted.tokens[i] for i in live]
            nxt = [t + [0] * (T - len(t)) for t in toks]
            last = torch.tensor([len(t) - 1 for t in toks], device=self.device)
            self._draft([seqs[i] for i in live], dstate, dbatch, nxt, last, True,
                        [len(seqs[i].out) + len(t) for i, t in zip(live, toks)], compiled)
        keep = set(live)
        for i, (s, toks) in enumerate(zip(seqs, emitted.tokens)):
            s.out.append(s.pending)
            s.pending = None
            if i in keep:  # a row that stopped drafting left holes in its drafter's cache: its blocks stay private
                self.pool.register(s.table, s.tokens + toks)
        return emitted

    def _give_up(self, s: Sequence, drafts: list[int], emitted: list[int]) -> None:
        """After `PROBE` steps that drafted, a sequence whose first draft was accepted less than `MIN_ACCEPTANCE`
        of the time stops drafting for good and decodes plainly: verifying 1 + K tokens and running the drafter
        cost more than the rare accepted draft saves (random MTP weights: 0.6x plain decoding's speed on the
        demo model here). A sequence's own history decides, so its output stays reproducible; the drafter's
        cache is not kept from then on, so the sequence never drafts again."""
        if not drafts:
            return
        s.spec_steps += 1
        s.spec_hits += len(emitted) > 1
        if s.spec_steps >= PROBE and s.spec_hits < MIN_ACCEPTANCE * s.spec_steps:
            s.drafting = False
            s.drafts, s.draft_q = [], []

    def _draft(self, seqs: list[Sequence], state: torch.Tensor, batch: PagedBatch, nxt: list[list[int]],
               last: torch.Tensor | None = None, absorb: bool = False, out_lens: list[int] | None = None,
               compiled: bool = True) -> None:
        """Run the drafter over `batch`'s positions (position t reads the main state at t and the token at t + 1,
        `nxt`), writing its cache; with `last` (each row's last real position), draft into `s.drafts` /
        `s.draft_q` from there: the first from this pass, the others one position further each, as many as the
        row's next step can use (`out_lens`: its output length by then; max_tokens bounds what it may emit)."""
        T = state.shape[1]
        ids = torch.tensor([x + [0] * (T - len(x)) for x in nxt] + [[0] * T] * (state.shape[0] - len(nxt)),
                           device=self.device)
        draft = self._compiled[1] if self._compiled and absorb and compiled else self.model.draft_states
        g = draft(state, ids, batch) if absorb else draft(state, ids, batch, absorb=False)  # (rows, T, ...)
        if last is None:
            return
        for s in seqs:
            s.drafts, s.draft_q = [], []
        want = [max(0, min(self.K, s.req.params.max_tokens - n - 2)) if s.drafting else 0
                for s, n in zip(seqs, out_lens)]
        live = [r for r in range(len(seqs)) if want[r]]
        if not live:  # every row is at its last tokens: nothing to draft
            return
        sel = torch.tensor(live, dtype=torch.long, device=self.device)
        g = g[sel, last[sel]][:, None]  # (live, 1, ...) each row's state at its last real position
        logits = self.model.draft_logits(g)[:, 0]  # (live, V)
        for j in range(self.K):
            toks, qs, ok = propose(logits, [seqs[r].req.params for r in live], [seqs[r].gen for r in live])
            for i, r in enumerate(live):
                if ok[i]:
                    seqs[r].drafts.append(toks[i])
                    seqs[r].draft_q.append(qs[i])
            keep = [i for i, r in enumerate(live) if ok[i] and want[r] > j + 1]
            live = [live[i] for i in keep]
            if not live:
                return
            step = PagedBatch(self.pool, [seqs[r].table for r in live], 1, offset=j)  # one position further
            g = self.model.draft_states(g[keep], torch.tensor([[toks[i]] for i in keep], device=self.device), step)
            logits = self.model.draft_logits(g)[:, -1]

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor) -> Sampled:
        """One token per row; constrained rows drawn from what their grammar allows, then fed what they drew."""
        sampled = sample(logits, [s.req.params for s in seqs], [s.gen for s in seqs],
                         self.masker.allowed(seqs, logits.shape[-1]))
        constraint.advance(seqs, sampled.tokens, sampled.errors)
        return sampled
