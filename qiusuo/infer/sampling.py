"""Per-request sampling: parameters (validated on construction), the top_k/top_p/min_p filters, and one
sampled token per row of a batch of logits.

Every sample of every request draws from its own `torch.Generator` (seeded from `seed` and the sample's index),
so a seeded request gives the same tokens whatever else shares its batch. Filters follow vLLM's order:
temperature, then top_k, then top_p on the renormalised top_k set, then min_p relative to the most likely token.
Logprobs are the model's own distribution (log_softmax of the raw logits), as in OpenAI's and vLLM's APIs, so
they do not depend on the sampling settings.

One request must never hurt another: parameters that cannot work are refused on construction (`ParamError`
names the field: temperatures in (0, 1e-5), where sampling is greedy in all but name and 1/temperature leaves
float32's range for large logits), values that are merely large are made to work (`top_k` beyond the vocabulary
keeps every token, as in vLLM; any integer seed is reduced modulo 2^64, the range `torch.Generator` takes, so
`seed + index` never overflows), and a row whose distribution still comes out empty or non-finite (a model
producing NaN) fails alone: `Sampled.errors` names it and every other row is drawn exactly as without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qiusuo.infer.constraint import Grammar, masked

MIN_TEMPERATURE = 1e-5


class ParamError(ValueError):
    """A sampling parameter out of range; `param` is its name (the server's 400 says which)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    """What one request asks for; out-of-range values raise ValueError naming the field."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of most likely tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 or -1 = all
    min_p: float = 0.0  # drop tokens less likely than min_p x the most likely one
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # stop strings: the output ends before them
    stop_token_ids: list[int] = field(default_factory=list)  # besides the tokenizer's EOS and <|end|>
    ignore_eos: bool = False  # keep generating past EOS (benchmarks)
    # also stop at the chat template's end-of-turn token (`Engine.stop_ids`); off: only where transformers'
    # `generate` and vLLM stop, at EOS and generation_config.json's eos ids (`Engine.eos_ids`; /v1/completions)
    stop_at_turn_end: bool = True
    skip_special_tokens: bool = False  # text without control tokens (vLLM's default; /v1/completions sets it)
    n: int = 1  # independent samples of the same prompt (they share its cached blocks)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob plus the k most likely
    # None: none; k >= 0: every prompt token's logprob given the tokens before it, plus the k most likely at each
    # position (a scoring forward of its own: `ModelRunner.score`); with it, max_tokens may be 0 (score only)
    prompt_logprobs: int | None = None
    # structured output: the reply must match this grammar (`qiusuo.infer.constraint`: json_schema, regex, ...)
    grammar: Grammar | None = None

    def __post_init__(self) -> None:
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            ("max_tokens", self.max_tokens >= 1 or (self.max_tokens == 0 and self.prompt_logprobs is not None),
             "must be >= 1 (0 only when scoring the prompt: prompt_logprobs)"),
            ("temperature", self.temperature == 0 or MIN_TEMPERATURE <= self.temperature <= 2.0,
             f"must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, 2]"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= 0, "must be -1 or 0 (off) or a positive count"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            ("n", 1 <= self.n <= 64, "must be in [1, 64]"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= 20, "must be in [0, 20]"),
            ("prompt_logprobs", self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "must be in [0, 20]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ParamError(name, f"{name} {why}, got {getattr(self, name)!r}")

    def generator(self, index: int = 0, device: torch.device | str | None = None) -> torch.Generator:
        """The private random stream of sample `index`: `(seed + index) mod 2^64` when seeded (for seeds in
        torch's range exactly what `manual_seed` does with them), fresh entropy otherwise."""
        gen = torch.Generator(device=device or "cpu")
        gen.manual_seed((self.seed + index) % 2**64 if self.seed is not None
                        else int(torch.randint(0, 2**62, ()).item()))
        return gen


@dataclass
class Sampled:
    """One step's choice per row: token ids; when any row asked for logprobs, every row's chosen-token logprob
    and its `logprobs`-many top (id, logprob) pairs; `errors`: rows that could not be sampled -> why (their
    token is meaningless; the engine fails those sequences alone)."""

    tokens: list[int]
    logprobs: list[float] | None
    top: list[list[tuple[int, float]]] | None
    errors: dict[int, str] = field(default_factory=dict)


def filter_probs(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                 min_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Filtered distributions for rows of logits (B, V), all rows at once: returns probs (B, V) over token ids
    (B, V), both sorted by decreasing logit, filtered-out entries 0. Per-row params are (B,) tensors; top_k 0,
    top_p 1 and min_p 0 turn a filter off; the most likely token always stays. temperature must be > 0."""
    x = logits.float() / temperature[:, None]
    x, ids = x.sort(-1, descending=True)  # (B, V)
    V = x.shape[-1]
    rank = torch.arange(V, device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k, V).to(x.device)
    probs = torch.softmax(x.masked_fill(rank >= k[:, None], float("-inf")), -1)
    before = probs.cumsum(-1) - probs  # mass of the more likely tokens
    # rank > 0: a top_p too small for float32 (1e-300 -> 0) still keeps the top token
    probs = probs.masked_fill((before >= top_p[:, None].to(x.device)) & (rank > 0), 0.0)
    probs = probs.masked_fill(probs < min_p[:, None].to(x.device) * probs[:, :1], 0.0)
    return probs / probs.sum(-1, keepdim=True), ids


def sample(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None],
           allowed: tuple[list[int], torch.Tensor] | None = None) -> Sampled:
    """Next token per row of logits (B, V). Greedy rows (temperature 0) share one argmax; sampled rows are
    filtered together and each draws from its own generator. A row with NaN or +inf logits, or with nothing left
    to draw from, goes to `errors` without touching the others. `allowed`: (rows, mask (R, V) bool), the tokens a
    constraint leaves those rows (`constraint.allowed`); the others are drawn as without it, and logprobs stay the
    model's own."""
    logits = logits.float()
    V = logits.shape[-1]
    bad = (~logits.amax(-1).isfinite()).tolist()  # amax is NaN when any logit is, +-inf for +inf or all -inf
    errors = {r: "the model's logits for this sequence are not finite (NaN or inf)" for r, b in enumerate(bad) if b}
    draw = logits
    if allowed is not None:
        held, mask = allowed
        draw = masked(logits, held, mask)
        for r, ok in zip(held, mask.any(-1).tolist()):
            if not ok:
                errors.setdefault(r, "the constraint allows no token here")
    tokens = draw.argmax(-1)  # (B,)
    rows = [r for r, p in enumerate(params) if p.temperature > 0 and r not in errors]
    if rows:
        ps = [params[r] for r in rows]
        probs, ids = filter_probs(draw[rows], torch.tensor([p.temperature for p in ps]),
                                  torch.tensor([min(p.top_k, V) for p in ps]), torch.tensor([p.top_p for p in ps]),
                                  torch.tensor([p.min_p for p in ps]))
        ok = (probs.isfinite().all(-1) & (probs.sum(-1) > 0)).tolist()
        for j, r in enumerate(rows):
            if not ok[j]:
                p = params[r]
                errors[r] = (f"nothing to sample from at temperature={p.temperature}, top_k={p.top_k}, "
                             f"top_p={p.top_p}, min_p={p.min_p}")
                continue
            g, row = gens[r], probs[j]
            if g is not None and g.device != row.device:
                row = row.to(g.device)  # a generator draws only on its own device
            tokens[r] = ids[j, int(torch.multinomial(row, 1, generator=g))]
    out = tokens.tolist()
    want = [p.logprobs for p in params]
    if all(k is None for k in want):
        return Sampled(out, None, None, errors)
    return Sampled(out, *logprobs_of(logits, tokens, want), errors)


def logprobs_of(logits: torch.Tensor, tokens: torch.Tensor,
                want: list[int | None]) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """Rows of logits (B, V) and the token chosen in each (B,) -> each token's logprob under the unfiltered
    model distribution, and row r's `want[r]` most likely (id, logprob) pairs (what the API reports)."""
    lp = torch.log_softmax(logits.float(), -1)  # (B, V)
    chosen = lp.gather(1, tokens[:, None])[:, 0].tolist()
    return chosen, _top(lp, want)


def _top(lp: torch.Tensor, want: list[int | None]) -> list[list[tuple[int, float]]]:
    """Row r's `want[r]` most likely (id, logprob) pairs of logprobs (B, V)."""
    kmax = min(max(k or 0 for k in want), lp.shape[-1])
    top_v, top_i = lp.topk(kmax, -1) if kmax else (lp[:, :0], lp[:, :0].long())
    return [list(zip(top_i[r, : k or 0].tolist(), top_v[r, : k or 0].tolist())) for r, k in enumerate(want)]


def scored_tokens(logits: torch.Tensor, tokens: torch.Tensor,
                  k: int) -> tuple[list[float], list[int], list[list[tuple[int, float]]]]:
    """Rows of logits (N, V) and the token that followed each (N,) -> each token's logprob, its rank among the
    vocabulary (1 = the most likely; vLLM's `rank`), and each row's k most likely (id, logprob) pairs: a prompt's
    scores (`ModelRunner.score`)."""
    lp = torch.log_softmax(logits.float(), -1)  # (N, V)
    chosen = lp.gather(1, tokens[:, None])  # (N, 1)
    rank = (lp > chosen).sum(-1) + 1  # (N,)
    return chosen[:, 0].tolist(), rank.tolist(), _top(lp, [k] * len(lp))
