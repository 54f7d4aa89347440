"""A request and its samples, the state the engine's roles pass between them: the scheduler gives a sequence its
block table, the runner feeds its pending token to the model, and `process` / `close` apply each step's tokens to
the sequences: stop tokens end a sequence (they are not output), other tokens become text through its
`TextOutput` (`output.py`) and go to the request's sink as Deltas. output.py knows nothing of sequences (it holds
text and result types), so the two files import in one direction only: this one reads output.py."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Iterator

from qiusuo.cache.pool import BlockTable
from qiusuo.infer.output import Delta, PromptLogprobs, StopToken, TextOutput, Usage
from qiusuo.infer.sampling import Sampled, SamplingParams

if TYPE_CHECKING:
    from qiusuo.infer.speculative import Emitted


class Request:
    """One submitted prompt and its `params.n` samples; `sink` gets the PromptLogprobs (when asked), each Delta
    and finally one Usage."""

    def __init__(self, rid: str, prompt: list[int], params: SamplingParams, stop_ids: set[int],
                 sink: Callable[[PromptLogprobs | Delta | Usage], None], tokenizer, adapter: int | None = None):
        self.id, self.prompt, self.params, self.sink = rid, prompt, params, sink
        # the LoRA adapter its rows run: an index in the model's banks, -1 the base alone, None the model as it is
        # (a training run's model with its one adapter: GRPO's rollouts, a run's samples)
        self.adapter = adapter
        self.stop_ids = set() if params.ignore_eos else set(stop_ids)
        self.stop_ids |= set(params.stop_token_ids)
        self.seqs = [Sequence(self, i, tokenizer) for i in range(params.n)]
        self.unfinished = params.n
        self.arrival = time.perf_counter()
        self.first_token: float | None = None
        self.completion_tokens = 0
        self.cached_tokens = 0


class Sequence:
    """One sample of a request: its output tokens, the token sampled last (output, not yet in the cache), its
    block table while admitted, its text, and why it finished."""

    def __init__(self, req: Request, index: int, tokenizer):
        self.req, self.index = req, index
        self.gen = req.params.generator(index)
        self.out: list[int] = []  # accepted output tokens
        self.pending: int | None = None  # last sampled token, not yet in the cache
        self.drafts: list[int] = []  # speculative decoding: the tokens drafted to follow `pending`
        self.draft_q: list = []  # and the distribution each was drawn from (None for greedy rows)
        self.drafting = True  # False once speculation gave up on this sequence (`ModelRunner._give_up`)
        self.spec_steps = self.spec_hits = 0  # steps that verified drafts, and those that kept the first
        self.table: BlockTable | None = None
        self.text = TextOutput(tokenizer, req.params.stop, req.params.skip_special_tokens)
        self.finish: str | None = None
        self.error: str | None = None  # why it finished with "error"
        self.stop: StopToken | None = None  # the stop token that ended it
        self.constraint = None  # structured output: its grammar's state (`constraint.RowConstraint`)

    @property
    def tokens(self) -> list[int]:
        return self.req.prompt + self.out


def process(seqs: list[Sequence], sampled: Sampled | Emitted, stats: dict) -> Iterator[tuple[Sequence, str]]:
    """The tokens of one step per sequence (row r of `sampled` is `seqs[r]`'s: one sampled token, or a
    speculative step's accepted drafts and bonus), in order: counted; a stop token ends the sequence; any other
    becomes its pending token and its final text goes to the request's sink (one Delta per token); a token
    followed by another of the same step is in the cache already and joins the output. Yields (sequence, finish
    reason) as each one finishes, dropping the rest of its step: the caller frees its blocks and calls `close`
    before the next sequence is processed, so sinks see every sequence's last Delta and Usage in step order."""
    now = time.perf_counter()
    for r, s in enumerate(seqs):
        req = s.req
        if r in sampled.errors:  # this row alone could not be sampled
            s.error = f"sampling failed: {sampled.errors[r]}"
            yield s, "error"
            continue
        if req.first_token is None:
            req.first_token = now
            stats["ttft_sum"] += now - req.arrival
            stats["ttft_count"] += 1
        toks, lps, tops = _row(sampled, r)
        for i, tok in enumerate(toks):
            req.completion_tokens += 1
            stats["generation_tokens"] += 1
            if tok in req.stop_ids:
                s.stop = StopToken(tok, lps[i] if lps else None, tops[i] if tops else [])
                yield s, "stop"
                break
            s.pending = tok
            piece, reason = s.text.push(tok, final=len(s.out) + 1 >= req.params.max_tokens)
            req.sink(Delta(s.index, piece, [tok], lps[i: i + 1], tops[i: i + 1], reason))
            if reason is not None or i + 1 < len(toks):
                s.out.append(s.pending)  # a final token is output, never fed back; a drafted one is cached
                s.pending = None
            if reason is not None:
                yield s, reason
                break


def _row(sampled: Sampled | Emitted, r: int) -> tuple[list[int], list[float], list]:
    """Row r's tokens, logprobs and top logprobs as lists (a plain step has one token per row)."""
    tok, lp, top = sampled.tokens[r], sampled.logprobs, sampled.top
    if isinstance(tok, int):
        return [tok], [lp[r]] if lp is not None else [], [top[r]] if top is not None else []
    return tok, lp[r] if lp is not None else [], top[r] if top is not None else []


def close(s: Sequence, reason: str) -> None:
    """A finished sequence's last words: the text it held back (unless its last piece went out already or it
    was aborted), then the request's Usage once every sample has finished."""
    req = s.req
    if not s.text.done and reason != "abort":
        req.sink(Delta(s.index, s.text.rest(), [], [], [], reason, s.error, s.stop))
    req.unfinished -= 1
    if req.unfinished == 0:
        req.sink(Usage(len(req.prompt), req.completion_tokens, req.cached_tokens))
