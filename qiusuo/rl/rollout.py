"""Rollouts for GRPO on qiusuo's serving engine, and the training forward's log-probabilities of the same tokens.

`sample_groups` submits each prompt once with `n = G`: the engine prefills the prompt for the first copy and the
other G - 1 find its full blocks in the prefix cache (blocks are small, `block_size` tokens, so short prompts
share too). A fresh engine is built per call because the weights change between rollouts: cached prefix blocks
from the previous policy would be stale.

Stopping: only `<|end|>` ends a completion (it closes an assistant turn in our chat template). When it is
sampled, the engine drops it from the output; we append it back so the policy is trained to stop. Its
sampling-time log-probability is not reported by the engine, which is one reason GRPO recomputes the old
policy's log-probabilities with the training forward (`token_logprobs`) rather than trusting the sampler's; the
test checks that the two agree on every reported token (<= 1e-5 in fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Rollout:
    prompt_ids: list[int]
    completion_ids: list[int]  # sampled tokens, then `<|end|>` when the completion stopped on it
    logprobs: list[float]  # sampling-time log-probabilities of the completion tokens before the stop token
    text: str  # decoded completion without the stop token
    finish_reason: str  # "stop" | "length"


def stop_token(tokenizer) -> int:
    end = tokenizer.token_to_id("<|end|>")
    end = end if end is not None else tokenizer.eos_id
    if end is None:
        raise ValueError("the tokenizer has neither <|end|> nor an EOS token, so completions cannot stop")
    return end


def sample_groups(model, tokenizer, prompts: list[list[int]], group_size: int, temperature: float, max_tokens: int,
                  seed: int, block_size: int = 4, draft_tokens: int = 0) -> tuple[list[list[Rollout]], dict]:
    """G completions per prompt (a list of G `Rollout`s per prompt) and engine stats (prompt tokens served from
    the prefix cache, generated tokens). Sample g of prompt p draws from seed `seed + p * G + g`, so a rollout
    is reproducible whatever else shares the batch. `draft_tokens` > 0: MTP speculative decoding."""
    from qiusuo.infer.engine import Engine
    from qiusuo.infer.sampling import SamplingParams

    end = stop_token(tokenizer)
    longest = max(len(p) for p in prompts)
    engine = Engine(model, tokenizer, max_batch=len(prompts) * group_size, block_size=block_size,
                    max_model_len=longest + max_tokens, speculative="mtp" if draft_tokens else None,
                    draft_tokens=draft_tokens or 1)
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + p * group_size, n=group_size,
                             logprobs=0, ignore_eos=True, stop_token_ids=[end]) for p in range(len(prompts))]
    results = engine.generate(prompts, params)
    groups, cached, generated = [], 0, 0
    for prompt, res in zip(prompts, results):
        group = []
        for c in res.outputs:
            ids = list(c.token_ids) + ([end] if c.finish_reason == "stop" else [])
            group.append(Rollout(prompt, ids, list(c.logprobs or []), c.text, c.finish_reason))
        groups.append(group)
        cached += res.usage.cached_tokens
        generated += res.usage.completion_tokens
    return groups, {"prompt_tokens": sum(len(p) for p in prompts) * group_size, "cached_prompt_tokens": cached,
                    "generated_tokens": generated}


def pack_rollouts(rollouts: list[Rollout], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + completion per row, right-padded: ids (B, T) and the completion mask (B, T-1) over the
    predicted positions (mask[b, t] = 1 when token t+1 of row b is a completion token)."""
    T = max(len(r.prompt_ids) + len(r.completion_ids) for r in rollouts)
    ids = torch.full((len(rollouts), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rollouts), T - 1)
    for b, r in enumerate(rollouts):
        P, C = len(r.prompt_ids), len(r.completion_ids)
        ids[b, : P + C] = torch.tensor(r.prompt_ids + r.completion_ids)
        mask[b, P - 1: P + C - 1] = 1.0
    return ids.to(device), mask.to(device)


def token_logprobs(model, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(ids[:, t+1] | ids[:, :t+1]) for every position, (B, T-1), from the training forward (expanded MLA,
    one causal pass; right padding cannot affect earlier positions). The logits are divided by the sampling
    temperature, so this is the distribution the tokens were drawn from."""
    logits = model(ids[:, :-1]).float()  # (B, T-1, V)
    if temperature != 1.0:
        logits = logits / temperature
    return torch.gather(F.log_softmax(logits, dim=-1), 2, ids[:, 1:, None])[..., 0]
