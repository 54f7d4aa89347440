"""The inference engine: continuous batching over a paged latent cache.

Between decoding steps, waiting sequences join (when the batch has room and the pool has blocks for their
prompt plus `max_tokens`: reserving up front means a running sequence is never preempted) and finished ones
leave, freeing their blocks at once. Newly admitted sequences are prefilled together on the expanded MLA path
(their uncached prompt tokens right-padded into one batch; cached prefix blocks are attended, not recomputed);
all running sequences then decode together on the absorbed path, one token each, over their own block tables.
`compile=True` runs the decoding step through `torch.compile` (opt-in: compiling costs tens of seconds).

The engine is single-threaded at heart: `step()` does all the work. `generate()` drives it in the caller's
thread; `start()` runs it in a background thread for the server, which submits requests and aborts through
thread-safe queues and streams results with `stream()` (an async iterator).

Text is detokenised incrementally: the whole output is decoded each step and only text that is final is
released. Text ending in an incomplete UTF-8 sequence (U+FFFD) and any tail that could begin a stop string are
held back, so streamed pieces concatenate to exactly the non-streamed text.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

import torch

from qiusuo.infer.paged_cache import BlockPool, BlockTable, PagedBatch
from qiusuo.infer.sampling import SamplingParams, sample


@dataclass
class Delta:
    """A streamed piece of sample `index`: new text and tokens; `finish_reason` is set on its last piece."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str


@dataclass
class Usage:
    """Sent to a request's sink after its last Delta."""

    prompt_tokens: int
    completion_tokens: int  # over all samples, stop tokens included
    cached_tokens: int  # prompt tokens served by the prefix cache, over all samples


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[Completion]
    usage: Usage


class _Request:
    def __init__(self, rid: str, prompt: list[int], params: SamplingParams, stop_ids: set[int],
                 sink: Callable[[Delta | Usage], None]):
        self.id, self.prompt, self.params, self.sink = rid, prompt, params, sink
        self.stop_ids = set() if params.ignore_eos else set(stop_ids)
        self.stop_ids |= set(params.stop_token_ids)
        self.seqs = [_Seq(self, i) for i in range(params.n)]
        self.unfinished = params.n
        self.arrival = time.perf_counter()
        self.first_token: float | None = None
        self.completion_tokens = 0
        self.cached_tokens = 0


class _Seq:
    def __init__(self, req: _Request, index: int):
        self.req, self.index = req, index
        self.gen = req.params.generator(index)
        self.out: list[int] = []  # accepted output tokens
        self.pending: int | None = None  # last sampled token, not yet in the cache
        self.table: BlockTable | None = None
        self.emitted = 0  # characters of the decoded output already released
        self.finish: str | None = None

    @property
    def tokens(self) -> list[int]:
        return self.req.prompt + self.out


class Engine:
    """Serve `model` (a `qiusuo.Transformer`) with `tokenizer` (encode/decode/eos_id/token_to_id).

    max_batch: sequences decoded together. block_size: tokens per cache block (small, so short prompts
    repeated n times still share blocks). cache_memory: bytes of latent cache (default: room for every
    batch row at full context, at most 1 GiB). max_model_len: prompt + output tokens per sequence."""

    def __init__(self, model, tokenizer, *, max_batch: int = 32, block_size: int = 16, cache_memory: int | None = None,
                 max_model_len: int | None = None, cache_dtype: torch.dtype | None = None,
                 max_prefill_tokens: int = 4096, compile: bool = False):
        self.model, self.tokenizer = model.eval(), tokenizer
        cfg = model.cfg
        p = next(model.parameters())
        self.device, dtype = p.device, cache_dtype or p.dtype
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}; "
                             "load the tokenizer that belongs to this model")
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_batch = max_batch
        per_block = block_size * cfg.cache_bytes_per_token(torch.finfo(dtype).bits // 8)
        wanted = -(-max_batch * self.max_model_len // block_size)
        budget = cache_memory if cache_memory is not None else min(wanted * per_block, 1 << 30)
        num_blocks = min(wanted, budget // per_block)
        if num_blocks < 1:
            raise ValueError(f"cache_memory={budget} bytes holds no block of {per_block} bytes; raise it")
        self.pool = BlockPool(cfg, num_blocks, block_size, device=self.device, dtype=dtype)
        self.max_model_len = min(self.max_model_len, num_blocks * block_size)
        self.max_prefill_tokens = max(1, max_prefill_tokens)
        self._step = self._compiled_step() if compile else None
        self.stop_ids = {i for i in (tokenizer.eos_id, tokenizer.token_to_id("<|end|>")) if i is not None}
        self.waiting: list[_Seq] = []
        self.running: list[_Seq] = []
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", _Request) | ("abort", request id)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._ids = itertools.count()
        self.stats = {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0, "ttft_sum": 0.0, "ttft_count": 0,
                      "aborted": 0}

    def _compiled_step(self):
        """`model.decode_step` through `torch.compile`, fed fixed shapes: rows padded to a power of two and the
        context gathered in multiples of 64 tokens, so a few compilations serve every batch (the first steps of
        each new shape take tens of seconds on a CPU). Inductor's freezing folds the weights in as constants
        (prepacked matmuls): after changing the weights, build a new Engine."""
        options = {"freezing": True} if self.device.type == "cpu" else None
        return torch.compile(self.model.decode_step, options=options)

    # ---- submitting ----

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(i) for i in prompt]
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        if min(ids) < 0 or max(ids) >= self.model.cfg.vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, {self.model.cfg.vocab_size})")
        return ids

    def check_fits(self, prompt_len: int, params: SamplingParams) -> None:
        if prompt_len + params.max_tokens > self.max_model_len:
            raise ValueError(f"this model's context is {self.max_model_len} tokens, but the prompt has {prompt_len} "
                             f"and max_tokens is {params.max_tokens}; shorten the prompt or lower max_tokens")

    def submit(self, prompt: str | list[int], params: SamplingParams, sink: Callable[[Delta | Usage], None],
               request_id: str | None = None) -> str:
        """Queue a request; `sink` gets each Delta and finally a Usage (called from the engine's thread)."""
        ids = self.encode_prompt(prompt)
        self.check_fits(len(ids), params)
        rid = request_id or f"req-{next(self._ids)}"
        self._inbox.put(("add", _Request(rid, ids, params, self.stop_ids, sink)))
        self._wake.set()
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks (a client went away)."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    # ---- the loop ----

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or not self._inbox.empty())

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, x = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.stats["requests"] += 1
                self.stats["prompt_tokens"] += len(x.prompt)
                self.waiting.extend(x.seqs)
            else:
                for s in [s for s in self.waiting + self.running if s.req.id == x]:
                    self._finish(s, "abort")
                    self.stats["aborted"] += 1

    @torch.inference_mode()
    def step(self) -> None:
        """Admit and prefill waiting sequences, then decode one token for every sequence already running."""
        self._drain_inbox()
        decoding = [s for s in self.running if s.finish is None]
        pending: list[_Seq] = []  # admitted, to prefill together
        heads: set[tuple[int, ...]] = set()  # their first blocks
        bs = self.pool.block_size
        while self.waiting and len(self.running) < self.max_batch:
            s = self.waiting[0]
            head = tuple(s.req.prompt[:bs])
            if head in heads and len(s.req.prompt) > bs:
                # it would share cached blocks with a sequence admitted this step: prefill that one first, so the
                # n samples of a request (and prompts with a common system prompt) compute their prefix once
                self._prefill(pending)
                pending, heads = [], set()
            table = self.pool.allocate(s.req.prompt, len(s.req.prompt) + s.req.params.max_tokens)
            if table is None:
                break  # wait for running sequences to free blocks
            self.waiting.pop(0)
            s.table = table
            s.req.cached_tokens += table.num_shared
            self.running.append(s)
            pending.append(s)
            heads.add(head)
        self._prefill(pending)
        if decoding:
            self._decode(decoding)
        self.running = [s for s in self.running if s.finish is None]

    def _prefill(self, seqs: list[_Seq]) -> None:
        """Prefill newly admitted sequences in padded batches of at most `max_prefill_tokens` (rows x longest):
        one forward over many prompts keeps the matmuls large (batching 32 prompts of 64 tokens was 1.5-2.1x
        faster than one at a time here)."""
        chunk: list[_Seq] = []
        longest = 0
        for s in seqs:
            n = len(s.req.prompt) - s.table.num_cached
            if chunk and (len(chunk) + 1) * max(longest, n) > self.max_prefill_tokens:
                self._prefill_chunk(chunk)
                chunk, longest = [], 0
            chunk.append(s)
            longest = max(longest, n)
        if chunk:
            self._prefill_chunk(chunk)

    def _prefill_chunk(self, seqs: list[_Seq]) -> None:
        news = [s.req.prompt[s.table.num_cached:] for s in seqs]
        T = max(len(n) for n in news)
        ids = torch.tensor([n + [0] * (T - len(n)) for n in news], device=self.device)  # (B, T) right-padded
        batch = PagedBatch(self.pool, [s.table for s in seqs], [len(n) for n in news])
        h = self.model.hidden(ids, cache=batch, absorb=False)  # (B, T, D)
        last = torch.tensor([len(n) - 1 for n in news], device=self.device)
        h = h[torch.arange(len(seqs), device=self.device), last]  # (B, D) each row's last prompt token
        for s, n in zip(seqs, news):
            s.table.num_cached += len(n)
            self.pool.register(s.table, s.req.prompt)
        self._accept(seqs, self.model.lm_head(self.model.norm(h)))

    def _decode(self, seqs: list[_Seq]) -> None:
        tables = [s.table for s in seqs]
        if self._step is None:
            tokens = torch.tensor([[s.pending] for s in seqs], device=self.device)  # (B, 1)
            logits = self.model.decode_step(tokens, PagedBatch(self.pool, tables, 1))  # (B, V)
        else:
            rows = min(1 << (len(seqs) - 1).bit_length(), max(self.max_batch, len(seqs)))  # 1, 2, 4, ... buckets
            length = max(t.num_cached for t in tables) + 1
            length = min(-(-length // 64) * 64, self.max_model_len)  # context gathered in steps of 64 tokens
            tokens = torch.tensor([[s.pending] for s in seqs] + [[0]] * (rows - len(seqs)), device=self.device)
            logits = self._step(tokens, PagedBatch(self.pool, tables, 1, rows=rows, length=length))[: len(seqs)]
        for s in seqs:
            s.table.num_cached += 1
            s.out.append(s.pending)
            s.pending = None
            self.pool.register(s.table, s.tokens)
        self._accept(seqs, logits)

    def _accept(self, seqs: list[_Seq], logits: torch.Tensor) -> None:
        """Sample one token per sequence; stop, release text, finish."""
        res = sample(logits, [s.req.params for s in seqs], [s.gen for s in seqs])
        now = time.perf_counter()
        for r, s in enumerate(seqs):
            req, tok = s.req, res.tokens[r]
            if req.first_token is None:
                req.first_token = now
                self.stats["ttft_sum"] += now - req.arrival
                self.stats["ttft_count"] += 1
            req.completion_tokens += 1
            self.stats["generation_tokens"] += 1
            if tok in req.stop_ids:
                self._finish(s, "stop")
                continue
            s.pending = tok
            lp = [res.logprobs[r]] if res.logprobs is not None else []
            top = [res.top[r]] if res.top is not None else []
            self._release(s, [tok], lp, top, final=len(s.out) + 1 >= req.params.max_tokens)

    def _release(self, s: _Seq, toks: list[int], lp, top, final: bool) -> None:
        """Emit the text of `s.out + toks` that is final; handle stop strings."""
        text = self.tokenizer.decode(s.out + toks)
        stops = s.req.params.stop
        reason = "length" if final else None
        for st in stops:
            i = text.find(st, max(s.emitted - len(st) + 1, 0))
            if i >= 0:
                text, reason = text[:i], "stop"
        if reason is None:
            end = len(text)
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            for st in stops:  # hold back a tail that may be the start of a stop string
                for k in range(min(len(st) - 1, end), 0, -1):
                    if text[end - k:end] == st[:k]:
                        end -= k
                        break
            text = text[:end]
        piece = text[s.emitted:] if len(text) > s.emitted else ""
        s.emitted = max(s.emitted, len(text))
        s.req.sink(Delta(s.index, piece, toks, lp, top, reason))
        if reason is not None:
            if s.pending is not None:
                s.out.append(s.pending)  # the final token is output, never fed back
                s.pending = None
            self._finish(s, reason, emitted=True)

    def _finish(self, s: _Seq, reason: str, emitted: bool = False) -> None:
        if s.finish is not None:
            return
        s.finish = reason
        if s.table is not None:
            self.pool.release(s.table)
        if s in self.waiting:
            self.waiting.remove(s)
        if not emitted and reason != "abort":
            text = self.tokenizer.decode(s.out)  # flush what was held back (a stop token ended it)
            s.req.sink(Delta(s.index, text[s.emitted:], [], [], [], reason))
        req = s.req
        req.unfinished -= 1
        if req.unfinished == 0:
            req.sink(Usage(len(req.prompt), req.completion_tokens, req.cached_tokens))

    # ---- background thread (server) ----

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="qiusuo-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _loop(self) -> None:
        while not self._stop:
            if not self.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception:  # a bug must not hang every client: fail the requests in flight, keep serving
                traceback.print_exc()
                for s in self.waiting + self.running:
                    self._finish(s, "error")
                self.running = []

    # ---- front ends ----

    def generate(self, prompts: list[str | list[int]] | str, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: Callable[[Delta], None] | None = None) -> list[RequestOutput]:
        """Run prompts to completion together (continuous batching); blocking."""
        if isinstance(prompts, str):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        done = threading.Event()
        stores: list[dict] = [{} for _ in prompts]
        usages: list[Usage | None] = [None] * len(prompts)

        def make_sink(r: int):
            def sink(d: Delta | Usage) -> None:
                if isinstance(d, Usage):
                    usages[r] = d
                    if all(u is not None for u in usages):
                        done.set()
                    return
                stores[r].setdefault(d.index, []).append(d)
                if progress is not None:
                    progress(d)
            return sink

        ids = [self.encode_prompt(p) for p in prompts]
        rids = [self.submit(x, p, make_sink(r)) for r, (x, p) in enumerate(zip(ids, plist))]
        if self._thread is None:
            while not done.is_set():
                self.step()
        else:
            done.wait()
        return [RequestOutput(rid, x, _completions(store), u) for rid, x, store, u in zip(rids, ids, stores, usages)]

    async def stream(self, prompt: str | list[int], params: SamplingParams,
                     request_id: str | None = None) -> AsyncIterator[Delta | Usage]:
        """Deltas of one request as they are produced, then its Usage (needs `start()`); closing the iterator
        early aborts the request and frees its blocks."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(d: Delta | Usage) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, d)
            except RuntimeError:  # the client's event loop is gone; abort() below cleans up
                pass

        rid = self.submit(prompt, params, sink, request_id)
        finished = False
        try:
            while True:
                d = await q.get()
                finished = isinstance(d, Usage)
                yield d
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)


def _completions(store: dict[int, list[Delta]]) -> list[Completion]:
    outs = []
    for i in sorted(store):
        ds = store[i]
        want = any(d.logprobs for d in ds)
        outs.append(Completion(i, "".join(d.text for d in ds), [t for d in ds for t in d.token_ids],
                               [x for d in ds for x in d.logprobs] if want else None,
                               [x for d in ds for x in d.top_logprobs] if want else None, ds[-1].finish_reason))
    return outs
