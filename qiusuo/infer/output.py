"""Output text and results: what a request's sink receives, and how a sequence's tokens become it. Applying a step's
tokens to the sequences (`process`, `close`) is `sequence.py`'s; this file imports nothing of the engine.

Per sequence: stop tokens end it (they are not output); other tokens are detokenised incrementally
(`Detokenizer`: a window of the last few tokens is decoded, never the whole output), and only text that is final
is released: a tail ending in an incomplete UTF-8 sequence (U+FFFD) and any tail that could be the start of a
stop string are held back, a stop string cuts the text before it. So streamed pieces concatenate to exactly the
non-streamed text, which is `tokenizer.decode(output ids)` up to the stop. Finish reasons: "stop" (a stop token
or string), "length" (max_tokens), "abort" (the client went away), "error" (the sequence alone could not be
sampled, or the engine failed the step; `Delta.error` says why).

A stop token is not output (no text, not in `token_ids`), but the model chose it: the last Delta of a sample it
ended carries it (`StopToken`, with its logprob when asked), for the legacy completions API, which reports it as
vLLM does. A request that asked for `prompt_logprobs` gets its prompt's scores (`PromptLogprobs`) before anything
else.

`ThinkSplitter` routes a reply's `<think>...</think>` text to reasoning and the rest to content (the server's
`reasoning_content`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field


@dataclass
class StopToken:
    """The stop token that ended a sample, its logprob and top (id, logprob) pairs (None and [] unless asked)."""

    id: int
    logprob: float | None
    top: list[tuple[int, float]]


@dataclass
class PromptLogprobs:
    """A prompt's scores, one entry per prompt token: its logprob given the tokens before it, its rank in the
    vocabulary (1: the most likely), and the k most likely (id, logprob) pairs at its position; None for the first
    token, which nothing predicts. Sent to a request's sink before its first Delta."""

    logprobs: list[float | None]
    ranks: list[int | None]
    top: list[list[tuple[int, float]] | None]


@dataclass
class Delta:
    """A streamed piece of sample `index`: new text and tokens; `finish_reason` is set on its last piece (and
    `stop`, when a stop token ended the sample)."""

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None  # why, when finish_reason is "error"
    stop: StopToken | None = None


@dataclass
class Completion:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str
    error: str | None = None  # why, when finish_reason is "error"
    stop: StopToken | None = None  # the stop token that ended it


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
    outputs: list[Completion]  # max_tokens 0 (scoring only): empty texts, finish_reason "length"
    usage: Usage
    prompt_logprobs: PromptLogprobs | None = None  # when asked for (SamplingParams.prompt_logprobs)


class Detokenizer:
    """`tokenizer.decode(ids)` kept up to date one token at a time by decoding only a window of the last tokens
    (vLLM's `detokenize_incrementally`). Re-decoding the whole output at every step costs O(length) per token:
    on `qiusuo bench engine` (batch 32, 128 new tokens) releasing text took 78 ms per run that way and 50 ms with
    the window (cProfile, of ~1.9 s), and the gap grows with the output's length.

    The window starts at a token boundary where decoding can restart, and its first tokens (up to the last
    boundary) are context only: their text is decoded again and cut off, so decoders that treat the first token
    differently (SentencePiece's leading space) give the same text as in the whole decode. A boundary is where
    the text so far does not end in U+FFFD: a byte-level token may hold part of a character, and the next bytes
    can still complete it. `text` is `decode(all ids)` at every step, incomplete tail included; `final` is the
    part no later token can change."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False):
        # skip_special_tokens: control tokens leave no text (a tokenizer that is asked nothing need not know it)
        self.decode = functools.partial(tokenizer.decode, skip_special_tokens=True) if skip_special_tokens \
            else tokenizer.decode
        self.final = ""  # text of the tokens before the window's last boundary
        self.tail = ""  # text of the tokens since, possibly ending in an incomplete character
        self.window: list[int] = []  # tokens from the previous boundary on
        self.context = 0  # leading tokens of the window whose text is already in `final`
        self.context_text = ""  # decode(window[:context])

    @property
    def text(self) -> str:
        return self.final + self.tail

    def add(self, token: int) -> None:
        self.window.append(token)
        text = self.decode(self.window)
        self.tail = text[len(self.context_text):]
        if text.endswith("\ufffd"):
            return  # an incomplete character (or bytes that never form one): decode it again with the next token
        self.final, self.tail = self.final + self.tail, ""
        self.window = self.window[self.context:]
        self.context = len(self.window)
        self.context_text = self.decode(self.window)


class TextOutput:
    """The text of one sequence: what has been released, what is held back, and stop strings (searched only
    from just before the released text's end)."""

    def __init__(self, tokenizer, stop: list[str], skip_special_tokens: bool = False):
        self.detok = Detokenizer(tokenizer, skip_special_tokens)
        self.stop = stop
        self.emitted = 0  # characters of the text already released
        self.done = False  # the last piece was released with a finish reason

    def push(self, token: int, final: bool) -> tuple[str, str | None]:
        """Add an output token; returns the newly final text and the finish reason ("stop" when a stop string
        appeared, "length" when `final`, else None). A stop string ends the text before it."""
        self.detok.add(token)
        text = self.detok.text
        reason = "length" if final else None
        for st in self.stop:
            i = text.find(st, max(self.emitted - len(st) + 1, 0))
            if i >= 0:
                text, reason = text[:i], "stop"
        if reason is None:
            end = len(text)
            if text.endswith("\ufffd"):
                end = len(text.rstrip("\ufffd"))
            for st in self.stop:  # hold back a tail that may be the start of a stop string
                for k in range(min(len(st) - 1, end), 0, -1):
                    if text[end - k:end] == st[:k]:
                        end -= k
                        break
            text = text[:end]
        piece = text[self.emitted:] if len(text) > self.emitted else ""
        self.emitted = max(self.emitted, len(text))
        self.done = reason is not None
        return piece, reason

    def rest(self) -> str:
        """The text held back so far (released when a stop token or an error ends the sequence)."""
        return self.detok.text[self.emitted:]


def completions(deltas: dict[int, list[Delta]]) -> list[Completion]:
    """Each sample's Deltas (by index) joined into its Completion."""
    outs = []
    for i in sorted(deltas):
        ds = deltas[i]
        want = any(d.logprobs for d in ds)
        outs.append(Completion(i, "".join(d.text for d in ds), [t for d in ds for t in d.token_ids],
                               [x for d in ds for x in d.logprobs] if want else None,
                               [x for d in ds for x in d.top_logprobs] if want else None, ds[-1].finish_reason,
                               ds[-1].error, ds[-1].stop))
    return outs


class ThinkSplitter:
    """Routes streamed text between `<think>` and `</think>` to reasoning, the rest to content. Holds back a tail
    that may be the start of a tag, so tags never leak split across pieces. `ends`: markers that also end reasoning
    the prompt opened (`thinking=True`), kept as the start of the content: DeepSeek-V4's `<｜DSML｜tool_calls>`, a tool
    call block the model may start before closing its reasoning (vLLM's V4 reasoning parser does the same). They do
    not end a `<think>` block the reply opens itself."""

    OPEN, CLOSE = "<think>", "</think>"

    def __init__(self, thinking: bool = False, ends: tuple[str, ...] = ()):
        self.thinking, self.buf = thinking, ""
        self.ends = ends if thinking else ()  # cleared when the reply opens a block of its own
        self.strip = False  # drop the newlines right after "</think>" (they separate reasoning from the answer)

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buf += text
        reasoning, content = [], []
        while True:
            if self.strip and not self.thinking:
                self.buf = self.buf.lstrip("\n")
                self.strip = not self.buf
            tags = (self.CLOSE, *self.ends) if self.thinking else (self.OPEN,)
            found = [(i, tag) for tag in tags if (i := self.buf.find(tag)) >= 0]
            if not found:
                break
            i, tag = min(found)
            (reasoning if self.thinking else content).append(self.buf[:i])
            kept = tag in self.ends  # an implicit end stays in the text, as the content's start
            self.buf, self.thinking = self.buf[i if kept else i + len(tag):], not self.thinking
            self.strip = not self.thinking and not kept
            self.ends = () if kept or tag == self.OPEN else self.ends
        keep = 0
        if not final:
            tags = (self.CLOSE, *self.ends) if self.thinking else (self.OPEN,)
            keep = max(next((k for k in range(min(len(t) - 1, len(self.buf)), 0, -1) if self.buf.endswith(t[:k])), 0)
                       for t in tags)
        out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
        (reasoning if self.thinking else content).append(out)
        return "".join(reasoning), "".join(content)
