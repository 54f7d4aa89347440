"""Rule-based rewards (DeepSeek-R1): accuracy (the answer is right) and format (`<think>...</think>` then
`<answer>...</answer>` and nothing else), plus user functions loaded from `module:function` or `file.py:function`.

A reward function is called once per batch as `fn(completions, problems) -> sequence of floats`, one per
completion: `completions` are the generated texts (special tokens kept, the stop token dropped), `problems` the
`qiusuo.rl.tasks.Problem` each completion answers (question, reference answer, Countdown numbers and target).

A reward function that raises (or returns the wrong number of values, or a non-finite one) does NOT stop
training: its rewards count as 0 for that batch, the failure is counted in the step's metrics
(`failed/<name>`) and reported on stderr with the exception. Why: a user's reward that trips over one odd
completion at step 3,000 should not kill an hours-long run; the metrics and the warning make it impossible to
miss. A spec that cannot be loaded at all is an error before any step runs.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from qiusuo.rl.tasks import Problem, check_answer

_SPAN = r"((?:(?!</?think>|</?answer>).)*)"  # text with no think/answer tags inside
FORMAT = re.compile(rf"\s*<think>{_SPAN}</think>\s*<answer>{_SPAN}</answer>\s*", re.DOTALL)
ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: str) -> str | None:
    """The content of the last `<answer>...</answer>`, stripped; None when there is none."""
    found = ANSWER.findall(text)
    return found[-1].strip() if found else None


def format_ok(text: str) -> bool:
    """Exactly one think block followed by exactly one answer block, nothing but whitespace around them."""
    return FORMAT.fullmatch(text) is not None


def accuracy_reward(completions: Sequence[str], problems: Sequence[Problem]) -> list[float]:
    """1 when the extracted answer is right (`tasks.check_answer`), else 0 (no answer tag counts as wrong)."""
    return [float(check_answer(p, extract_answer(c))) for c, p in zip(completions, problems)]


def format_reward(completions: Sequence[str], problems: Sequence[Problem]) -> list[float]:
    """1 for the R1 template `<think>...</think><answer>...</answer>`, else 0."""
    return [float(format_ok(c)) for c in completions]


BUILTIN: dict[str, Callable] = {"accuracy": accuracy_reward, "format": format_reward}


@dataclass
class RewardSpec:
    name: str
    fn: Callable
    weight: float = 1.0


def load_reward(spec: str) -> RewardSpec:
    """`accuracy`, `format`, `package.module:function` or `path/to/file.py:function`, optionally `=WEIGHT`
    (e.g. `format=0.1`). Errors say what is wrong with the spec."""
    text, eq, w = spec.rpartition("=") if "=" in spec else (spec, "", "")
    try:
        weight = float(w) if eq else 1.0
    except ValueError:
        raise ValueError(f"reward {spec!r}: weight {w!r} is not a number (write NAME=0.5)") from None
    if text in BUILTIN:
        return RewardSpec(text, BUILTIN[text], weight)
    module_name, colon, attr = text.rpartition(":")
    if not colon or not module_name or not attr:
        raise ValueError(f"reward {text!r} is neither a built-in ({', '.join(BUILTIN)}) nor 'module:function' "
                         "(e.g. mypkg.rewards:length_penalty or ./my_rewards.py:brevity)")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ValueError(f"reward {text!r}: file {path} not found")
        spec_ = importlib.util.spec_from_file_location(f"qiusuo_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(spec_)
        spec_.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"reward {text!r}: cannot import module {module_name!r} ({e}); is it on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward {text!r}: {module_name} has no function {attr!r}")
    return RewardSpec(attr, fn, weight)


def score(specs: Sequence[RewardSpec], completions: Sequence[str], problems: Sequence[Problem],
          step: int | None = None) -> tuple[list[float], dict[str, list[float]], dict[str, int]]:
    """Total weighted reward per completion, each function's own rewards, and {name: 1} for each function that
    failed on this batch (its rewards are 0; see the module docstring)."""
    n = len(completions)
    per, failed = {}, {}
    for s in specs:
        try:
            values = [float(v) for v in s.fn(list(completions), list(problems))]
            if len(values) != n:
                raise ValueError(f"returned {len(values)} values for {n} completions")
            if not all(math.isfinite(v) for v in values):
                raise ValueError("returned a non-finite value")
        except Exception as e:  # noqa: BLE001 - any user error is reported and scored 0, by design
            where = f" at step {step}" if step is not None else ""
            print(f"qiusuo grpo: reward function {s.name!r} failed{where}: {type(e).__name__}: {e}; its rewards "
                  f"count as 0 for this batch", file=sys.stderr)
            values, failed[s.name] = [0.0] * n, 1
        per[s.name] = values
    total = [sum(s.weight * per[s.name][i] for s in specs) for i in range(n)]
    return total, per, failed
