"""A request and its samples, the state the engine's roles pass between them: the scheduler gives a sequence its
block table, the runner feeds its pending token to the model, output processing turns its tokens into text."""

from __future__ import annotations

import time
from typing import Callable

from qiusuo.infer.output import Delta, PromptLogprobs, StopToken, TextOutput, Usage
from qiusuo.infer.paged import BlockTable
from qiusuo.infer.sampling import SamplingParams


class Request:
    """One submitted prompt and its `params.n` samples; `sink` gets the PromptLogprobs (when asked), each Delta
    and finally one Usage."""

    def __init__(self, rid: str, prompt: list[int], params: SamplingParams, stop_ids: set[int],
                 sink: Callable[[PromptLogprobs | Delta | Usage], None], tokenizer):
        self.id, self.prompt, self.params, self.sink = rid, prompt, params, sink
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

    @property
    def tokens(self) -> list[int]:
        return self.req.prompt + self.out
