"""What `qiusuo serve` answers, in OpenAI's shapes: server-sent event lines, `usage`, and token logprobs in the
legacy completions form (`tokens`, `token_logprobs`, `text_offset`, `top_logprobs` keyed by text), vLLM's
`prompt_logprobs`, and the chat form (`token`, `logprob`, `bytes`, `top_logprobs`). The routes assemble choices
from these; nothing here knows requests or the event loop.
"""

from __future__ import annotations

import json

from qiusuo.infer.engine import Engine, PromptLogprobs, Usage
from qiusuo.infer.output import StopToken


def sse(obj: dict) -> str:
    """One server-sent event carrying `obj` as JSON (text kept as UTF-8, not escaped)."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def usage_json(u: Usage) -> dict:
    """OpenAI's `usage`, with the prompt tokens the prefix cache served as `cached_tokens`."""
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.prompt_tokens + u.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _tok_str(engine: Engine, t: int) -> str:
    return engine.tokenizer.decode([t])


def completion_logprobs(engine: Engine, tokens, lps, tops, offset0: int, stop: StopToken | None = None) -> dict:
    """OpenAI's legacy logprobs of some tokens whose text starts at `offset0`; a stop token that ended the sample
    goes last (vLLM reports it too; lm-eval's loglikelihood drops the last entry as the generated token, so without
    it a choice whose greedy next token is EOS would lose its last token's logprob)."""
    if stop is not None:
        tokens, lps, tops = [*tokens, stop.id], [*lps, stop.logprob], [*tops, stop.top]
    toks = [_tok_str(engine, t) for t in tokens]
    offsets, o = [], offset0
    for t in toks:
        offsets.append(o)
        o += len(t)
    return {"tokens": toks, "token_logprobs": lps, "text_offset": offsets,
            "top_logprobs": [_top_dict(engine, top) for top in tops]}


def echo_logprobs(engine: Engine, ids: list[int], scores: PromptLogprobs, k: int, after: dict | None) -> dict:
    """The legacy logprobs of an echoed prompt (the first token's logprob and top_logprobs null), then `after`'s."""
    lp = completion_logprobs(engine, ids, scores.logprobs, [t if t is None else t[:k] for t in scores.top], 0)
    for key in lp if after is not None else ():
        lp[key] += after[key]
    return lp


def vllm_prompt_logprobs(engine: Engine, ids: list[int], scores: PromptLogprobs, k: int) -> list[dict | None]:
    """vLLM's `prompt_logprobs`: per prompt token, None for the first, else {token id: {logprob, rank,
    decoded_token}} for the token itself and the k most likely."""
    out: list[dict | None] = [None]
    for t, lp, rank, top in zip(ids[1:], scores.logprobs[1:], scores.ranks[1:], scores.top[1:]):
        entry = {str(t): {"logprob": lp, "rank": rank, "decoded_token": _tok_str(engine, t)}}
        for j, (a, v) in enumerate(top[:k]):
            entry.setdefault(str(a), {"logprob": v, "rank": j + 1, "decoded_token": _tok_str(engine, a)})
        out.append(entry)
    return out


def _top_dict(engine: Engine, top: list[tuple[int, float]] | None) -> dict[str, float] | None:
    """OpenAI's legacy format keys alternatives by text; tokens with equal text keep the likelier one. None (the
    first prompt token's) stays None."""
    if top is None:
        return None
    out: dict[str, float] = {}
    for t, v in top:
        out.setdefault(_tok_str(engine, t), v)
    return out


def chat_logprobs(engine: Engine, tokens, lps, tops) -> list[dict]:
    def entry(t: int, v: float) -> dict:
        s = _tok_str(engine, t)
        return {"token": s, "logprob": v, "bytes": list(s.encode("utf-8"))}
    return [{**entry(t, v), "top_logprobs": [entry(a, b) for a, b in top]} for t, v, top in zip(tokens, lps, tops)]

