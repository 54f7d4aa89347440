"""Built-in reasoning tasks with verifiable answers, generated locally: integer arithmetic and Countdown.

A task draws `Problem`s (a question for the user turn, a reference answer, and a worked trace for SFT) from a
seeded random stream. Train and test are disjoint by construction: a question belongs to the test split when a
stable hash of its text falls in the test share (`test_percent`), so no test question is ever trained on,
whatever the seeds, and both splits can be drawn in any amount.

Task specs on the command line: `arithmetic`, `arithmetic:digits=2,terms=3,ops=+-*`, `countdown:count=4`.

Traces follow the R1 template: `<think>steps</think><answer>result</answer>`.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import random
import warnings
from dataclasses import dataclass
from fractions import Fraction


@dataclass(frozen=True)
class Problem:
    """One question. `numbers`/`target` are set for Countdown, where any expression that uses each number once
    and reaches the target is right; otherwise the answer must match `answer` exactly (as an integer)."""

    question: str  # the user turn
    answer: str  # the reference answer (Countdown: one valid expression)
    trace: str  # `<think>...</think><answer>...</answer>`, a worked solution for SFT
    numbers: tuple[int, ...] | None = None
    target: int | None = None


def _in_test(question: str, test_percent: int) -> bool:
    h = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big")
    return h % 100 < test_percent


def _draw(make, split: str, n: int, seed: int, test_percent: int, unique: bool) -> list[Problem]:
    """n problems of `split` from `make(rng)`. `unique=True` returns distinct questions and stops early when the
    split has fewer than n (small problem spaces: 1-digit addition has 100)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{seed}:{split}")
    want_test = split == "test"
    out, seen, misses = [], set(), 0
    while len(out) < n and misses < 20 * n + 1000:
        p = make(rng)
        if _in_test(p.question, test_percent) != want_test or (unique and p.question in seen):
            misses += 1
            continue
        seen.add(p.question)
        out.append(p)
    if not out:
        raise ValueError(f"the {split} split of this task is empty; change test_percent or the difficulty")
    return out


@dataclass(frozen=True)
class Arithmetic:
    """Integer expressions evaluated left to right: `terms` operands of up to `digits` digits joined by `ops`.
    A `*` after a sum is parenthesised, so the written expression means what the trace computes.

    `direct_percent` of the SFT traces skip the worked steps (`<think></think><answer>N</answer>`): a model
    fine-tuned on the mix answers some questions at once and works others out, and GRPO can discover which pays
    (the demo in docs/reasoning.md). It changes only the traces, never the questions or answers."""

    digits: int = 1
    terms: int = 2
    ops: str = "+"
    test_percent: int = 20
    direct_percent: int = 0

    def __post_init__(self):
        if self.digits < 1 or self.terms < 2 or not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"arithmetic needs digits >= 1, terms >= 2 and ops from '+-*', got {self}")
        if not 0 < self.test_percent < 100:
            raise ValueError(f"test_percent must be in (0, 100), got {self.test_percent}")
        if not 0 <= self.direct_percent <= 100:
            raise ValueError(f"direct_percent must be in [0, 100], got {self.direct_percent}")

    def make(self, rng: random.Random) -> Problem:
        hi = 10**self.digits - 1
        value = rng.randint(0, hi)
        expr, steps = str(value), []
        for _ in range(self.terms - 1):
            op, b = rng.choice(self.ops), rng.randint(0, hi)
            new = value + b if op == "+" else value - b if op == "-" else value * b
            steps.append(f"{value}{op}{b}={new}")
            expr = f"({expr})*{b}" if op == "*" and any(c in expr for c in "+-") else f"{expr}{op}{b}"
            value = new
        if self.direct_percent and rng.randrange(100) < self.direct_percent:  # no draw at 0: same streams as before
            steps = []
        return Problem(f"Compute {expr}.", str(value), f"<think>{' '.join(steps)}</think><answer>{value}</answer>")

    def problems(self, split: str, n: int, seed: int = 0, unique: bool = False) -> list[Problem]:
        return _draw(self.make, split, n, seed, self.test_percent, unique)


@dataclass(frozen=True)
class Countdown:
    """Reach `target` from `count` numbers in 1..max_number with + - * / (each number exactly once, exact
    division only), as in TinyZero. Targets are made by a random expression over the numbers, so every problem
    has a solution; they lie in 1..max_target."""

    count: int = 3
    max_number: int = 10
    max_target: int = 100
    test_percent: int = 20

    def __post_init__(self):
        if self.count < 2 or self.max_number < 1 or self.max_target < 1:
            raise ValueError(f"countdown needs count >= 2, max_number >= 1 and max_target >= 1, got {self}")
        if not 0 < self.test_percent < 100:
            raise ValueError(f"test_percent must be in (0, 100), got {self.test_percent}")

    def make(self, rng: random.Random) -> Problem:
        while True:
            numbers = [rng.randint(1, self.max_number) for _ in range(self.count)]
            items = [(str(x), Fraction(x), False) for x in numbers]  # (text, value, is a compound expression)
            steps = []
            while len(items) > 1:
                i, j = rng.sample(range(len(items)), 2)
                (ta, va, ca), (tb, vb, cb) = items[i], items[j]
                op = rng.choice("+-*/")
                if op == "/" and (vb == 0 or (va / vb).denominator != 1):
                    op = "+"
                v = va + vb if op == "+" else va - vb if op == "-" else va * vb if op == "*" else va / vb
                wrap = lambda t, c: f"({t})" if c else t  # noqa: E731
                text = f"{wrap(ta, ca and op in '*/')}{op}{wrap(tb, cb and op != '+')}"
                steps.append(f"{va}{op}{vb}={v}")
                items = [it for k, it in enumerate(items) if k not in (i, j)] + [(text, v, True)]
            text, value, _ = items[0]
            if value.denominator == 1 and 1 <= value <= self.max_target:
                target = int(value)
                q = f"Using the numbers {numbers}, make {target}. Use each number once, with + - * /."
                return Problem(q, text, f"<think>{' '.join(steps)}</think><answer>{text}</answer>", tuple(numbers), target)

    def problems(self, split: str, n: int, seed: int = 0, unique: bool = False) -> list[Problem]:
        return _draw(self.make, split, n, seed, self.test_percent, unique)


TASKS = {"arithmetic": Arithmetic, "countdown": Countdown}


def get_task(spec: str):
    """`name` or `name:key=value,key=value` -> a task object (see the module docstring)."""
    name, _, params = spec.partition(":")
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)} (e.g. arithmetic:digits=2)")
    cls = TASKS[name]
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    kwargs = {}
    for item in filter(None, params.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in fields:
            raise ValueError(f"bad task option {item!r} in {spec!r}; {name} takes {', '.join(f'{k}=' for k in fields)}")
        kwargs[key] = value if fields[key] in ("str", str) else int(value)
    return cls(**kwargs)


def _safe_eval(node) -> tuple[Fraction, list[int]]:
    """Value and the integer literals of an expression of + - * / and parentheses; ValueError otherwise."""
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return Fraction(node.value), [node.value]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        (a, na), (b, nb) = _safe_eval(node.left), _safe_eval(node.right)
        if isinstance(node.op, ast.Div) and b == 0:
            raise ValueError("division by zero")
        op = node.op
        v = a + b if isinstance(op, ast.Add) else a - b if isinstance(op, ast.Sub) else a * b if isinstance(op, ast.Mult) else a / b
        return v, na + nb
    raise ValueError("only integers, + - * / and parentheses are allowed")


def check_answer(problem: Problem, answer: str | None) -> bool:
    """Is `answer` (the text inside `<answer>`) right? Arithmetic: the same integer as the reference (spaces
    ignored). Countdown: an expression of + - * / that uses each given number exactly once and equals the target."""
    if answer is None:
        return False
    text = answer.strip().replace(" ", "")
    if problem.numbers is None:
        try:
            return int(text) == int(problem.answer)
        except ValueError:
            return False
    if len(text) > 200:  # bounded work on garbage
        return False
    try:
        with warnings.catch_warnings():  # odd text like "1else" makes the parser warn; it is just a wrong answer
            warnings.simplefilter("ignore", SyntaxWarning)
            tree = ast.parse(text, mode="eval")
        value, used = _safe_eval(tree.body)
    except (SyntaxError, ValueError, RecursionError):
        return False
    return sorted(used) == sorted(problem.numbers) and value == problem.target


def chat_messages(problem: Problem, with_answer: bool = True) -> list[dict]:
    """The conversation for SFT (user question, assistant trace) or, without the answer, the GRPO/eval prompt."""
    msgs = [{"role": "user", "content": problem.question}]
    return msgs + [{"role": "assistant", "content": problem.trace}] if with_answer else msgs
