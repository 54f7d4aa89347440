"""Every field of OpenAI's completion and chat request bodies, and what qiusuo does with it: honoured, accepted
without effect, or refused with a 400 naming it. No field is dropped silently.

Why a table: a client that sends `echo`, `logit_bias` or `response_format` expects the answer to mean what the
OpenAI API says, and an answer computed without the field looks exactly like a right one (lm-eval scored a model
0.23 instead of 0.33 through a dropped `echo`, with no error). So each field is one of:
- honoured: the server does what the field asks (the request models in `api_requests.py` declare exactly these);
- accepted: the field cannot change the answer (`user`, `metadata`, `store`, ...): it is removed before validation;
- refused: a 400 naming the field and saying why, unless its value asks for nothing (`best_of: 1`,
  `logit_bias: {}`, penalties 0, null), which is accepted.
A field in no table (a typo, another server's extension) is refused too. The "Request fields" table of
docs/serving.md says the same for people; a test holds the two together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

HONOURED, ACCEPTED, REFUSED = "honoured", "accepted", "refused"


class FieldError(ValueError):
    """A field qiusuo refuses; `param` names it (the server's 400 says which)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Rule:
    what: str  # HONOURED | ACCEPTED | REFUSED
    note: str  # what qiusuo does; for a refused field, why (the 400's message)
    asks_nothing: Callable[[Any], bool] = lambda v: v is None  # refused fields: values accepted all the same


def _none_or(*values) -> Callable[[Any], bool]:
    return lambda v: v is None or any(v == x and type(v) is type(x) for x in values)


def honoured(note: str) -> Rule:
    return Rule(HONOURED, note)


def accepted(note: str) -> Rule:
    return Rule(ACCEPTED, note)


def refused(note: str, asks_nothing: Callable[[Any], bool] = _none_or()) -> Rule:
    return Rule(REFUSED, note, asks_nothing)


_ZERO = _none_or(0, 0.0)
_NO_EFFECT = "cannot change the answer; accepted and not used"

COMMON = {
    "model": honoured("must name the served model (404 otherwise)"),
    "max_tokens": honoured("tokens to generate at most"),
    "temperature": honoured("0 is greedy"),
    "top_p": honoured("nucleus sampling"),
    "n": honoured("samples per prompt, 1 to 64"),
    "seed": honoured("each sample draws from its own generator seeded with seed + its index"),
    "stop": honoured("stop strings; the text ends before them"),
    "stream": honoured("server-sent events"),
    "stream_options": honoured("include_usage: false leaves out the final usage chunk, which qiusuo sends "
                               "otherwise; include_obfuscation is accepted and not used"),
    "frequency_penalty": refused("not implemented; send 0 or leave it out", _ZERO),
    "presence_penalty": refused("not implemented; send 0 or leave it out", _ZERO),
    "logit_bias": refused("not implemented; send {} or leave it out", _none_or({})),
    "user": accepted(_NO_EFFECT),
    "response_format": honoured("text, json_object, json_schema (strict or not), and qiusuo's regex and grammar "
                                "(Lark or GBNF): the reply is held to it by constrained decoding, after the "
                                "reasoning"),
    # qiusuo's extensions, as vLLM names them
    "top_k": honoured("extension: keep the k most likely tokens (0 or -1: all)"),
    "min_p": honoured("extension: drop tokens less likely than min_p x the most likely"),
    "stop_token_ids": honoured("extension: token ids that end a sample, besides EOS"),
    "ignore_eos": honoured("extension: generate past EOS (benchmarks)"),
}

COMPLETIONS = {
    **COMMON,
    "prompt": honoured("a string, a list of strings, a list of token ids or a list of lists of token ids: one "
                       "choice per prompt and sample (index = prompt x n + sample; at most 256); a stream takes "
                       "one prompt"),
    "echo": honoured("text is prompt + completion; with logprobs, the prompt's tokens come first (the first "
                     "one's logprob null); max_tokens 0 returns the prompt and its logprobs only"),
    "logprobs": honoured("each token's logprob and the k most likely (0 to 20); a stop token that ended a sample "
                         "is reported last, as vLLM does"),
    "suffix": refused("fill in the middle is not supported; put the text in the prompt",
                      _none_or("")),
    "best_of": refused("values other than 1 are not supported; ask for n samples and choose among them",
                       _none_or(1)),
    "prompt_logprobs": honoured("extension (vLLM's): each prompt token's logprob, rank and the k most likely, "
                                "in vLLM's shape, in every choice"),
    "skip_special_tokens": honoured("extension (vLLM's): true (the default) leaves control tokens out of the "
                                    "text"),
}

CHAT = {
    **COMMON,
    "messages": honoured("system, developer, user, assistant (with tool_calls) and tool messages; text parts"),
    "max_completion_tokens": honoured("as max_tokens, and wins over it"),
    "logprobs": honoured("each token's logprob"),
    "top_logprobs": honoured("with logprobs: the k most likely at each token (0 to 20)"),
    "tools": honoured("function tools, rendered by the chat template or DeepSeek-V3.2/V4's encoding (or "
                      "DeepSeek-V3.1's block)"),
    "tool_choice": honoured("auto, none, required, or a named function (the reply is started with the call and "
                            "held to one valid call by constrained decoding)"),
    "parallel_tool_calls": refused("false is not supported: a reply may call several tools; send true or "
                                   "leave it out", _none_or(True)),
    "functions": refused("deprecated and not supported; send tools"),
    "function_call": refused("deprecated and not supported; send tool_choice"),
    "audio": refused("audio output is not supported"),
    "modalities": refused("only text output is supported; send [\"text\"] or leave it out", _none_or(["text"])),
    "reasoning_effort": honoured("DeepSeek-V4's encoding: \"max\" adds its preamble in thinking mode, \"high\" "
                                 "is its default (other values: the model's default); a chat template gets it as a "
                                 "variable"),
    "chat_template_kwargs": honoured("extension (vLLM's): {\"thinking\": true} (or enable_thinking) opens the reply "
                                     "in thinking mode; other keys are refused"),
    "verbosity": refused("not supported"),
    "web_search_options": refused("web search is not supported"),
    "prediction": accepted("predicted output only speeds up OpenAI's servers; " + _NO_EFFECT),
    "metadata": accepted(_NO_EFFECT),
    "store": accepted(_NO_EFFECT + " (nothing is stored)"),
    "service_tier": accepted(_NO_EFFECT),
    "safety_identifier": accepted(_NO_EFFECT),
    "prompt_cache_key": accepted("the prefix cache works without it; " + _NO_EFFECT),
    "prompt_cache_retention": accepted(_NO_EFFECT),
}


def check(body: dict, rules: dict[str, Rule], route: str) -> dict:
    """`body` without the fields that cannot change the answer (accepted ones, refused ones whose value asks for
    nothing); FieldError names the first field refused or unknown."""
    out = {}
    for name, value in body.items():
        rule = rules.get(name)
        if rule is None:
            raise FieldError(name, f"{name}: not a field of {route} that qiusuo knows; see the table "
                                   "'Request fields' in qiusuo's docs/serving.md for what each OpenAI field does here")
        if rule.what == HONOURED:
            out[name] = value
        elif rule.what == REFUSED and not rule.asks_nothing(value):
            raise FieldError(name, f"{name}: {rule.note}")
    return out
