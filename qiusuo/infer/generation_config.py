"""A checkpoint's generation_config.json as the engine reads it: sampling defaults under a request's own values,
and the eos ids that end every reply. It lives beside `sampling.py`, whose `SamplingParams` checks the values:
the checkpoint loader (`qiusuo/hf/`) never needed it, and reading it there made `hf` import `infer`, the one
import in the package that ran upward (issue 28)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from qiusuo.infer.sampling import SamplingParams
from qiusuo.io import CheckpointError


@dataclass(frozen=True)
class GenerationConfig:
    """A checkpoint's generation_config.json, the parts a server honours, as vLLM's `--generation-config auto`:
    sampling defaults (`temperature`, `top_p`, `top_k`, `min_p`, and `max_new_tokens` as `max_tokens`) that a request's
    own values override, and the end-of-sequence ids (an int or a list) that end every reply. `do_sample` is not read
    (nor by vLLM): a checkpoint that ships a temperature means it."""

    sampling: dict = field(default_factory=dict)
    eos_token_ids: tuple[int, ...] = ()


GENERATION_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
                   "max_new_tokens": "max_tokens"}


def read_generation_config(path: str | Path) -> GenerationConfig:
    """The folder's generation_config.json (an empty `GenerationConfig` when there is none), checked: a value out of
    range raises `CheckpointError` naming the file and the field."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return GenerationConfig()
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: must be a JSON object")
    sampling = {ours: raw[k] for k, ours in GENERATION_KEYS.items() if raw.get(k) is not None}
    for k, v in sampling.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise CheckpointError(f"{file}: {k} must be a number, got {v!r}")
    try:
        SamplingParams(**sampling)
    except ValueError as e:
        raise CheckpointError(f"{file}: {e}") from None
    eos = raw.get("eos_token_id")
    eos = [] if eos is None else eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in eos):
        raise CheckpointError(f"{file}: eos_token_id must be a token id or a list of them, got {raw['eos_token_id']!r}")
    return GenerationConfig(sampling, tuple(eos))
