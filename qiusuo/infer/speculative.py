"""MTP speculative decoding: DeepSeek's own multi-token-prediction module drafts, the main model verifies.

One decoding step of a row at length N with pending token y (sampled, not yet cached) and drafts d_1..d_K:
1. verify: the main model reads [y, d_1, .., d_K] at positions N..N+K in one forward over the paged cache
   (absorbed attention, like a decoding step, K + 1 queries per row) -> target logits at each position;
2. accept (`accept`): greedy rows keep the longest prefix of drafts equal to the target's argmax; sampled rows
   use the standard speculative-sampling rule (Leviathan et al. 2023, Chen et al. 2023): d_j is kept with
   probability min(1, p(d_j) / q(d_j)), p the target's and q the draft's filtered distribution (the request's
   temperature, top-k, top-p, min-p on both), and the first rejection draws from norm(max(p - q, 0)); after a
   accepted drafts one more token comes from the target at position N + a (the bonus), so a step emits a + 1
   tokens, distributed exactly as plain decoding's, with every draw from the sequence's own seeded generator;
3. roll back: the row's length becomes N + a + 1. Nothing is copied: MLA's latents are addressed by position
   and read under a length mask, V4's rings have K spare slots (`qiusuo.cache.window.ring_writes`), compressed entries of
   windows that rejected tokens closed are invisible until the window really closes, when they are rewritten;
4. draft again: the MTP module (the cache's extra layer, `Transformer.cache_specs(draft=True)`) reads, at each
   position t of the same K + 1 positions, the main model's state at t and the token at t + 1 (d_{t-N+1}, then
   the bonus), which writes its own cache exactly as if it had followed plain decoding, and its output at N + a
   is the first draft; drafts 2..K feed the module its own output state and last draft at the next position
   (the speculative entries they write lie past the length and are overwritten by the next step's pass).

Choices: drafts come from the first MTP module, reused for drafts past the first, as vLLM does for K larger than
the checkpoint's module count (every DeepSeek checkpoint ships one). DeepSeek's module k >= 2 drafts at the same
position from module k-1's state, which needs caches that lag k-1 positions behind and that state kept per
sequence; with one shipped module the reuse is the only choice anyway. A prefill fills the module's cache over
the prompt as well, and the prefix cache names a block by its tokens and the token after it (the module's last
entry of a block reads it: `BlockPool(drafter=True)`), so drafts, and seeded samples, do not depend on what other
requests left in the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from qiusuo.infer.constraint import masked
from qiusuo.infer.sampling import SamplingParams, filter_probs, logprobs_of


@dataclass
class Emitted:
    """One speculative step's output per row: the tokens it emits (accepted drafts, then the bonus), their
    logprobs and top logprobs under the target model when asked, and rows that could not be sampled."""

    tokens: list[list[int]]
    logprobs: list[list[float]] | None
    top: list[list[list[tuple[int, float]]]] | None
    errors: dict[int, str] = field(default_factory=dict)


def vocab_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The filtered distribution of `p` over the vocabulary, in token order: logits (n, V) -> probs (n, V)."""
    n, V = logits.shape

    def col(v) -> torch.Tensor:
        return torch.full((n,), v)

    probs, ids = filter_probs(logits, col(float(p.temperature)), col(min(p.top_k, V)), col(float(p.top_p)),
                              col(float(p.min_p)))
    return torch.zeros_like(probs).scatter_(-1, ids, probs)


def _draw(probs: torch.Tensor, gen: torch.Generator | None) -> int:
    row = probs if gen is None or gen.device == probs.device else probs.to(gen.device)
    return int(torch.multinomial(row, 1, generator=gen))


def propose(logits: torch.Tensor, params: list[SamplingParams],
            gens: list[torch.Generator | None]) -> tuple[list[int], list[torch.Tensor | None], list[bool]]:
    """Draft logits (B, V) -> per row a draft token, its distribution q (V,) for sampled rows (None: greedy), and
    whether the row drafted at all (non-finite draft logits: no draft, so the step decodes plainly)."""
    logits = logits.float()
    ok = logits.isfinite().all(-1).tolist()
    tokens = logits.argmax(-1).tolist()
    qs: list[torch.Tensor | None] = [None] * len(params)
    for r, p in enumerate(params):
        if p.temperature > 0 and ok[r]:
            q = vocab_probs(logits[r: r + 1], p)[0]
            if not bool(q.sum() > 0):
                ok[r] = False
                continue
            qs[r], tokens[r] = q, _draw(q, gens[r])
    return tokens, qs, ok


def accept(logits: torch.Tensor, drafts: list[list[int]], qs: list[list[torch.Tensor | None]],
           params: list[SamplingParams], gens: list[torch.Generator | None],
           allowed: tuple[list[int], torch.Tensor] | None = None) -> Emitted:
    """Target logits (B, T, V) at each row's pending token and its drafts (row r's first len(drafts[r]) + 1
    positions are real) -> the tokens each row emits (the accepted drafts, then one from the target). `allowed`:
    (rows, mask (R, V) bool) of constrained rows, which draft nothing: their one position is drawn from the tokens
    their grammar allows (`constraint.allowed`); logprobs stay the model's own."""
    logits = logits.float()
    finite = logits.isfinite().all(-1).tolist()  # (B, T)
    draw = logits
    if allowed is not None:
        held, mask = allowed
        draw = logits.clone()
        draw[held, 0] = masked(logits[held, 0], list(range(len(held))), mask)
    argmax = draw.argmax(-1).tolist()  # (B, T)
    out, errors = [], {}
    for r, (ds, p) in enumerate(zip(drafts, params)):
        lg = draw[r, : len(ds) + 1]  # (k + 1, V)
        if not all(finite[r][: len(ds) + 1]):
            errors[r] = "the model's logits for this sequence are not finite (NaN or inf)"
            out.append([0])
            continue
        if p.temperature <= 0:  # greedy: drafts while they are the argmax, then the argmax
            best = argmax[r]
            a = next((j for j, d in enumerate(ds) if d != best[j]), len(ds))
            out.append(ds[:a] + [best[a]])
            continue
        probs = vocab_probs(lg, p)  # (k + 1, V)
        if not bool((probs.sum(-1) > 0).all()):
            errors[r] = (f"nothing to sample from at temperature={p.temperature}, top_k={p.top_k}, "
                         f"top_p={p.top_p}, min_p={p.min_p}")
            out.append([0])
            continue
        out.append(_accept_sampled(probs, ds, qs[r], gens[r]))
    want = [p.logprobs for p in params]
    if all(k is None for k in want):
        return Emitted(out, None, None, errors)
    lps, tops = [], []
    for r, toks in enumerate(out):
        chosen, top = logprobs_of(logits[r, : len(toks)], torch.tensor(toks, device=logits.device),
                                  [want[r]] * len(toks))
        lps.append(chosen)
        tops.append(top)
    return Emitted(out, lps, tops, errors)


def _accept_sampled(probs: torch.Tensor, drafts: list[int], qs: list[torch.Tensor | None],
                    gen: torch.Generator | None) -> list[int]:
    """The speculative-sampling rule over one row: probs (k + 1, V) the target's, qs[j] the distribution d_j
    was drawn from."""
    for j, d in enumerate(drafts):
        q = qs[j].to(probs.device)
        u = float(torch.rand((), generator=gen, device=gen.device if gen is not None else "cpu"))
        if u * float(q[d]) < float(probs[j, d]):  # kept with probability min(1, p(d) / q(d))
            continue
        resid = (probs[j] - q).clamp_min(0.0)
        total = resid.sum()
        return drafts[:j] + [_draw(resid / total if bool(total > 0) else probs[j], gen)]
    return drafts + [_draw(probs[len(drafts)], gen)]


class Counters:
    """Acceptance statistics for /metrics and the benchmark: per draft position, how often a row drafted there
    and how often the draft was kept; rows verified and tokens they emitted."""

    def __init__(self, k: int):
        self.drafted, self.accepted = [0] * k, [0] * k
        self.steps = self.emitted = 0

    def add(self, num_drafts: int, emitted: int) -> None:
        self.steps += 1
        self.emitted += emitted
        for j in range(num_drafts):
            self.drafted[j] += 1
            self.accepted[j] += j < emitted - 1

    def summary(self) -> dict[str, float]:
        """{"acceptance_rate": over all drafts, "acceptance_rate_j": position j (1-based), "tokens_per_step"}."""
        out = {"acceptance_rate": sum(self.accepted) / max(sum(self.drafted), 1),
               "tokens_per_step": self.emitted / max(self.steps, 1)}
        out.update({f"acceptance_rate_{j + 1}": a / max(d, 1) for j, (a, d) in enumerate(zip(self.accepted,
                                                                                            self.drafted))})
        return out
