"""The inference engine: continuous batching over a paged cache, the thin front the server, the CLI and GRPO share.

Between decoding steps, waiting sequences join and finished ones leave, freeing their blocks at once. The roles:
`scheduler.py` decides who runs (admission, prefix-sharing waits, the memory budget), `runner.py` runs the model
(batched prefill, eager or compiled decoding, sampling), `output.py` turns tokens into released text (incremental
detokenisation, stop strings), `paged.py` holds the cache. This module owns only requests coming in and results
going out.

The engine is single-threaded at heart: `step()` does all the work. `generate()` drives it in the caller's
thread; `start()` runs it in a background thread for the server, which submits requests and aborts through
thread-safe queues and streams results with `stream()` (an async iterator).

A request that asks for `prompt_logprobs` is scored first (`ModelRunner.score`, a forward of its own, at the start
of the step that takes it in), then joins the scheduler like any other; with `max_tokens` 0 it ends there.
Requests that do not ask never meet that path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import signal
import threading
import traceback
from typing import AsyncIterator, Callable, Iterator

import torch

from qiusuo.cache.pool import BlockPool
from qiusuo.cache.precision import CacheDtype
from qiusuo.cache.spec import block_bytes, block_size_for, state_bytes
from qiusuo.infer.generation_config import GenerationConfig
from qiusuo.infer.constraint import Grammars
from qiusuo.infer.output import Completion, Delta, PromptLogprobs, RequestOutput, Usage, completions
from qiusuo.infer.runner import ModelRunner
from qiusuo.infer.sampling import Sampled, SamplingParams
from qiusuo.infer.scheduler import Scheduler, pool_blocks
from qiusuo.infer.sequence import Request, Sequence, close, process

__all__ = ["Completion", "Delta", "Engine", "PromptLogprobs", "RequestOutput", "Usage"]


SPECULATIVE = ("mtp",)  # draft sources


def check_speculative(cfg, speculative: str | None, draft_tokens: int) -> int:
    """The draft tokens per step for `speculative` (0: off), or a clear error."""
    if speculative is None:
        return 0
    if speculative not in SPECULATIVE:
        raise ValueError(f"speculative={speculative!r} is not a draft source; use one of {list(SPECULATIVE)}")
    if not cfg.num_nextn_predict_layers:
        raise ValueError("speculative='mtp' drafts with the checkpoint's MTP module, and this model has none "
                         "(num_nextn_predict_layers = 0); train one with --train.mtp_weight > 0 and "
                         "--model.num_nextn_predict_layers=1, or serve without speculation")
    if not 1 <= draft_tokens <= 16:
        raise ValueError(f"draft_tokens must be between 1 and 16, got {draft_tokens}")
    return draft_tokens


@contextlib.contextmanager
def interrupt_between_steps() -> Iterator[Callable[[], bool]]:
    """Hold a Ctrl-C that comes during a step until the step ends: yields `interrupted()`, which the caller checks
    between steps; on leaving, KeyboardInterrupt if there was one. A second Ctrl-C interrupts at once (a step that
    takes too long). Why: a KeyboardInterrupt inside a step can land between taking blocks from the pool and
    recording them on the sequence, and leak them. Only in the main thread with Python's own SIGINT handler
    (elsewhere signals cannot be caught, or someone else handles them): there it does nothing."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield lambda: False
        return
    got: list[int] = []

    def held(signum, frame) -> None:
        if got:
            raise KeyboardInterrupt
        got.append(signum)

    signal.signal(signal.SIGINT, held)
    try:
        yield lambda: bool(got)
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if got:
        raise KeyboardInterrupt


class Engine:
    """Serve `model` (a `qiusuo.Transformer`) with `tokenizer` (encode/decode/eos_id/token_to_id).

    max_batch: sequences decoded together. block_size: tokens per cache block (small, so short prompts
    repeated n times still share blocks). cache_memory: bytes of cache (default: room for every batch row at
    full context, at most 1 GiB). max_model_len: prompt + output tokens per sequence. kv_cache_dtype: the cache's
    precision (`qiusuo.cache.precision.CacheDtype.of`): None / "auto" the model's dtype, "bf16", or "fp8" (keys
    in FP8 with their rotary parts in bf16: about half the bytes per token of context, which the memory budget
    counts). generation: the checkpoint's
    `GenerationConfig` (generation_config.json: sampling defaults the server and the commands apply under a request's
    own values, eos ids that end every reply). speculative="mtp": draft `draft_tokens` tokens per step with the
    checkpoint's MTP module and verify them in one forward (`speculative.py`; the same outputs, greedy token for
    token, sampled in distribution). adapters: the names of the LoRA adapters the model's layers hold, in bank
    order (`qiusuo.lora.peft.attach`); a request names one (`submit(adapter=...)`) or runs the base. Without
    names, a model carrying adapters runs as it is (a training run's one adapter: GRPO's rollouts)."""

    def __init__(self, model, tokenizer, *, max_batch: int = 32, block_size: int = 16, cache_memory: int | None = None,
                 max_model_len: int | None = None, kv_cache_dtype: CacheDtype | torch.dtype | str | None = None,
                 max_prefill_tokens: int = 4096, compile: bool = False, generation=None,
                 speculative: str | None = None, draft_tokens: int = 1, adapters: list[str] | tuple = ()):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.adapters = {name: i for i, name in enumerate(adapters)}  # LoRA adapter name -> its index in the banks
        self.generation = generation or GenerationConfig()  # the checkpoint's sampling defaults and eos ids
        cfg = model.cfg
        p = next(model.parameters())
        self.device, dtype = p.device, CacheDtype.of(kv_cache_dtype, p.dtype)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}; "
                             "load the tokenizer that belongs to this model")
        self.max_model_len = min(max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.max_batch = max_batch
        K = check_speculative(cfg, speculative, draft_tokens)
        specs = model.cache_specs(draft=K > 0)
        block_size = block_size_for(specs, block_size)  # V4: a multiple of every compression rate
        states = max_batch if state_bytes(specs, dtype) else 0  # V4: one window state per batch row, taken first
        state_size = state_bytes(specs, dtype, K)
        budget = None if cache_memory is None else cache_memory - states * state_size
        if budget is not None and budget <= 0:
            raise ValueError(f"cache_memory={cache_memory} bytes does not hold the window states of {max_batch} "
                             f"sequences ({states * state_size} bytes for DeepSeek-V4's "
                             "sliding windows and open compression windows); raise it or lower max_batch")
        per_token = -(-block_bytes(specs, block_size, dtype) // block_size)
        num_blocks = pool_blocks(per_token, block_size, max_batch, self.max_model_len, budget)
        self.pool = BlockPool(specs, num_blocks, block_size, device=self.device, dtype=dtype, num_states=states,
                              slack=K, drafter=K > 0)
        self.max_model_len = min(self.max_model_len, num_blocks * block_size)
        self.scheduler = Scheduler(self.pool, max_batch)
        self.runner = ModelRunner(model, self.pool, max_batch=max_batch, max_model_len=self.max_model_len,
                                  max_prefill_tokens=max_prefill_tokens, compile=compile, draft_tokens=K)
        # where transformers' `generate` stops: EOS and generation_config's eos ids; the end of a reply adds the
        # template's end-of-turn token (`tokenizer.stop_ids`), unless a request turns that off (`stop_at_turn_end`)
        self.eos_ids = {tokenizer.eos_id} - {None} | set(self.generation.eos_token_ids)
        self.stop_ids = set(tokenizer.stop_ids) | self.eos_ids
        self.grammars = Grammars(tokenizer, cfg.vocab_size, self.eos_ids)  # structured output (`constraint.py`)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("add", Request) | ("abort", request id)
        self.scoring: list[Request] = []  # taken in, their prompt logprobs not yet computed
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._ids = itertools.count()
        self.stats = {"requests": 0, "prompt_tokens": 0, "generation_tokens": 0, "ttft_sum": 0.0, "ttft_count": 0,
                      "aborted": 0, "failed": 0}

    @property
    def speculation(self) -> dict[str, float]:
        """Speculative decoding's acceptance so far: overall, per draft position, tokens per verified step."""
        return self.runner.counters.summary()

    @property
    def waiting(self) -> list[Sequence]:
        return self.scheduler.waiting

    @property
    def running(self) -> list[Sequence]:
        return self.scheduler.running

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

    def submit(self, prompt: str | list[int], params: SamplingParams,
               sink: Callable[[PromptLogprobs | Delta | Usage], None], request_id: str | None = None,
               adapter: str | None = None) -> str:
        """Queue a request; `sink` gets its PromptLogprobs (when asked), each Delta and finally a Usage (called
        from the engine's thread). `adapter`: the LoRA adapter it runs (None: the base model)."""
        if adapter is not None and adapter not in self.adapters:
            raise ValueError(f"no LoRA adapter named {adapter!r}; this engine serves "
                             f"{', '.join(self.adapters) or 'none'}")
        ids = self.encode_prompt(prompt)
        self.check_fits(len(ids), params)
        rid = request_id or f"req-{next(self._ids)}"
        stop_ids = self.stop_ids if params.stop_at_turn_end else self.eos_ids
        index = self.adapters[adapter] if adapter is not None else -1 if self.adapters else None
        req = Request(rid, ids, params, stop_ids, sink, self.tokenizer, index)
        if params.grammar is not None:  # each sample its own matcher; constrained rows never draft
            compiled = self.grammars.compile(params.grammar)
            for s in req.seqs:
                s.constraint, s.drafting = compiled.start(), False
        self._inbox.put(("add", req))
        self._wake.set()
        return rid

    def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks (a client went away)."""
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def _abort_now(self, request_ids: list[str]) -> None:
        """Abort `request_ids` for a caller that stops waiting (`generate` interrupted). Without the background
        thread nobody else would drain the inbox, so it is drained here. Interrupts are held to step boundaries
        (`interrupt_between_steps`); after a second Ctrl-C cut a step short, aborting still frees what the
        sequences hold (prefill registers a block's prefix hash only after writing it)."""
        for rid in request_ids:
            self.abort(rid)
        if self._thread is None:
            self._drain_inbox()
            self.scheduler.collect()

    # ---- the loop ----

    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.scoring or not self._inbox.empty())

    @torch.inference_mode()
    def step(self) -> None:
        """Take new requests and aborts; score the prompts that asked for it; admit and prefill waiting
        sequences; decode one token for every sequence that was already running; release their text."""
        self._drain_inbox()
        if self.scoring:
            self._score()
        decoding = self.scheduler.decoding()
        for group in self.scheduler.admit():  # each group prefilled before the next is admitted
            self._emit(group, self.runner.prefill(group))
        if decoding:
            self._emit(decoding, self.runner.decode(decoding))
        self.scheduler.collect()

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, x = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                self.stats["requests"] += 1
                self.stats["prompt_tokens"] += len(x.prompt)
                if x.params.prompt_logprobs is not None:
                    self.scoring.append(x)
                else:
                    self.scheduler.add(x)
            else:
                for s in self.scheduler.of_request(x) + [s for r in self.scoring if r.id == x for s in r.seqs]:
                    self._finish(s, "abort")
                    self.stats["aborted"] += 1

    def _score(self) -> None:
        """Score the prompts taken in (`ModelRunner.score`), hand each its PromptLogprobs, then schedule it, or end
        it when it asked for no tokens. They leave `scoring` only once scored: a step that fails fails them too."""
        live = [r for r in self.scoring if r.unfinished]  # an aborted one is finished already
        scored = self.runner.score([r.prompt for r in live], [r.params.prompt_logprobs for r in live],
                                   [r.adapter for r in live])
        self.scoring = []
        for r, p in zip(live, scored):
            r.sink(p)
            if r.params.max_tokens == 0:
                for s in r.seqs:
                    self._finish(s, "length")
            else:
                self.scheduler.add(r)

    def _emit(self, seqs: list[Sequence], sampled: Sampled) -> None:
        for s, reason in process(seqs, sampled, self.stats):
            self._finish(s, reason)

    def _finish(self, s: Sequence, reason: str) -> None:
        if self.scheduler.finish(s, reason):  # blocks freed before the sink hears the end
            self.stats["failed"] += reason == "error"
            close(s, reason)

    # ---- background thread (server) ----

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="qiusuo-engine", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the background thread after its current step (safe to call twice, from two threads)."""
        self._stop = True
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join()

    def _loop(self) -> None:
        while not self._stop:
            if not self.has_work():
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # a bug must not hang every client: fail the requests in flight, keep serving
                traceback.print_exc()
                for s in self.waiting + self.running + [s for r in self.scoring for s in r.seqs]:
                    s.error = f"the engine failed a step ({type(e).__name__}: {e})"
                    self._finish(s, "error")
                self.scoring = []
                self.scheduler.collect()

    # ---- front ends ----

    def generate(self, prompts: list[str | list[int]] | str, params: SamplingParams | list[SamplingParams] | None = None,
                 progress: Callable[[Delta], None] | None = None,
                 adapters: list[str | None] | None = None) -> list[RequestOutput]:
        """Run prompts to completion together (continuous batching), prompt i with LoRA adapter `adapters[i]`
        (default: the base model); blocking. Ctrl-C (KeyboardInterrupt) aborts
        these requests, their blocks freed, and is raised on to the caller (`qiusuo chat` goes back to its prompt)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        plist = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(plist)} SamplingParams")
        done = threading.Event()
        stores: list[dict[int, list[Delta]]] = [{} for _ in prompts]
        usages: list[Usage | None] = [None] * len(prompts)
        scores: list[PromptLogprobs | None] = [None] * len(prompts)

        def make_sink(r: int):
            def sink(d: PromptLogprobs | Delta | Usage) -> None:
                if isinstance(d, PromptLogprobs):
                    scores[r] = d
                    return
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
        for p in plist:  # a grammar that does not compile fails the call before any prompt is queued
            if p.grammar is not None:
                self.grammars.compile(p.grammar)
        names = adapters or [None] * len(prompts)
        rids = [self.submit(x, p, make_sink(r), adapter=names[r]) for r, (x, p) in enumerate(zip(ids, plist))]
        try:
            if self._thread is None:
                with interrupt_between_steps() as interrupted:
                    while not done.is_set() and not interrupted():
                        self.step()
            else:
                done.wait()
        except BaseException:  # Ctrl-C (KeyboardInterrupt) in the caller: these requests end here, blocks freed
            self._abort_now(rids)
            raise
        return [RequestOutput(rid, x, completions(store), u, p)
                for rid, x, store, u, p in zip(rids, ids, stores, usages, scores)]

    async def stream(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                     adapter: str | None = None) -> AsyncIterator[PromptLogprobs | Delta | Usage]:
        """The PromptLogprobs of one request (when asked), its Deltas as they are produced, then its Usage (needs
        `start()`); closing the iterator early aborts the request and frees its blocks."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def sink(d: PromptLogprobs | Delta | Usage) -> None:
            try:
                loop.call_soon_threadsafe(q.put_nowait, d)
            except RuntimeError:  # the client's event loop is gone; abort() below cleans up
                pass

        rid = self.submit(prompt, params, sink, request_id, adapter)
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
