"""Tasks (splits, determinism, verifiers) and rule-based rewards (parsing, user functions, failures)."""

import pytest

from qiusuo.rl.rewards import (RewardSpec, accuracy_reward, extract_answer, format_ok, format_reward, load_reward,
                               score)
from qiusuo.rl.tasks import Arithmetic, Problem, check_answer, get_task

SPECS = ["arithmetic", "arithmetic:digits=2,terms=3,ops=+-*", "countdown", "countdown:count=4,max_number=20"]


@pytest.mark.parametrize("spec", SPECS)
def test_reference_answers_verify_and_splits_are_disjoint(spec):
    task = get_task(spec)
    train = task.problems("train", 300, seed=1)
    test = task.problems("test", 100, seed=1, unique=True)
    assert all(check_answer(p, p.answer) for p in train + test)
    assert all(extract_answer(p.trace) == p.answer and format_ok(p.trace) for p in train)
    assert not {p.question for p in train} & {p.question for p in test}
    assert len({p.question for p in test}) == len(test)
    assert task.problems("train", 50, seed=1) == train[:50]  # deterministic given the seed
    assert task.problems("train", 50, seed=2) != train[:50]


def test_arithmetic_expression_means_what_the_trace_computes():
    for p in get_task("arithmetic:digits=2,terms=4,ops=+-*").problems("train", 200, seed=0):
        expr = p.question.removeprefix("Compute ").removesuffix(".")
        assert eval(expr) == int(p.answer)  # noqa: S307 - generated digits and operators only


def test_small_space_unique_test_split_is_exhausted_not_padded():
    test = Arithmetic(digits=1).problems("test", 1000, unique=True)
    assert 5 < len(test) < 100 and len({p.question for p in test}) == len(test)


def test_bad_task_specs():
    with pytest.raises(ValueError, match="unknown task"):
        get_task("algebra")
    with pytest.raises(ValueError, match="takes digits="):
        get_task("arithmetic:depth=3")
    with pytest.raises(ValueError, match="terms >= 2"):
        get_task("arithmetic:terms=1")
    with pytest.raises(ValueError, match="split"):
        Arithmetic().problems("val", 3)


def test_check_answer_arithmetic_and_countdown():
    p = Problem("Compute 7+5.", "12", "")
    assert check_answer(p, "12") and check_answer(p, " 12 ") and check_answer(p, "+12")
    assert not check_answer(p, "13") and not check_answer(p, "twelve") and not check_answer(p, None)
    assert not check_answer(p, "12.0") and not check_answer(p, "")
    c = Problem("", "(2+6)*6", "", numbers=(6, 2, 6), target=48)
    assert check_answer(c, "6*(6+2)") and check_answer(c, "(6 + 2) * 6")
    assert not check_answer(c, "6*8")  # 8 is not a given number
    assert not check_answer(c, "(2+6)*6+0")  # an extra number
    assert not check_answer(c, "6*6+2")  # wrong value
    assert not check_answer(c, "(2+6)*6 if 1 else 0") and not check_answer(c, "__import__('os')")
    assert not check_answer(c, "6/(2-2)*6") and not check_answer(c, "(2+6)*6)")
    assert check_answer(Problem("", "", "", numbers=(3, 3, 2), target=3), "3/3+2")


def test_rewards_parse_correct_wrong_and_malformed():
    p = Problem("Compute 7+5.", "12", "")
    cases = {
        "<think>7+5=12</think><answer>12</answer>": (1.0, 1.0),
        " <think>\n7+5=12\n</think>\n<answer> 12 </answer>\n": (1.0, 1.0),
        "<think>7+5=13</think><answer>13</answer>": (0.0, 1.0),  # wrong, well formed
        "<answer>12</answer>": (1.0, 0.0),  # right, no think block
        "<think>7+5=12</think>12": (0.0, 0.0),  # no answer tag
        "<think>x</think><answer>12</answer><answer>12</answer>": (1.0, 0.0),  # two answers
        "<think>x<think>y</think><answer>12</answer>": (1.0, 0.0),  # nested think
        "<answer>12</answer><think>x</think>": (1.0, 0.0),  # wrong order
        "<think>x</think><answer>12": (0.0, 0.0),  # unterminated
        "<think>x</think><answer>12</answer> trailing": (1.0, 0.0),
        "": (0.0, 0.0),
    }
    texts = list(cases)
    acc = accuracy_reward(texts, [p] * len(texts))
    fmt = format_reward(texts, [p] * len(texts))
    assert [(a, f) for a, f in zip(acc, fmt)] == list(cases.values())


def test_load_reward_specs(tmp_path):
    assert load_reward("accuracy").fn is accuracy_reward
    spec = load_reward("format=0.25")
    assert spec.fn is format_reward and spec.weight == 0.25
    f = tmp_path / "my_rewards.py"
    f.write_text("def brevity(completions, problems):\n    return [1.0 / (1 + len(c)) for c in completions]\n")
    user = load_reward(f"{f}:brevity=2")
    assert user.name == "brevity" and user.weight == 2.0 and user.fn(["ab"], [None]) == [1 / 3]
    assert load_reward("qiusuo.rl.rewards:format_reward").fn is format_reward
    for bad, msg in [("speed", "neither a built-in"), ("no_such_mod_xyz:f", "cannot import"),
                     ("qiusuo.rl.rewards:nope", "no function 'nope'"), (f"{tmp_path}/missing.py:f", "not found"),
                     ("format=heavy", "not a number")]:
        with pytest.raises(ValueError, match=msg):
            load_reward(bad)


def test_a_reward_function_that_raises_scores_zero_and_is_reported(capsys):
    def boom(completions, problems):
        raise KeyError("missing field")

    def short(completions, problems):
        return [1.0]

    p = Problem("Compute 1+1.", "2", "")
    texts = ["<think>1+1=2</think><answer>2</answer>", "<think></think><answer>3</answer>"]
    specs = [RewardSpec("accuracy", accuracy_reward, 1.0), RewardSpec("format", format_reward, 0.5),
             RewardSpec("boom", boom, 1.0), RewardSpec("short", short, 1.0)]
    total, per, failed = score(specs, texts, [p, p], step=7)
    assert total == [1.5, 0.5]
    assert per["boom"] == [0.0, 0.0] and per["short"] == [0.0, 0.0]
    assert failed == {"boom": 1, "short": 1}
    err = capsys.readouterr().err
    assert "'boom' failed at step 7: KeyError" in err and "returned 1 values for 2 completions" in err


def test_direct_traces_skip_the_steps_only():
    mixed = get_task("arithmetic:terms=4,direct_percent=50").problems("train", 400, seed=3)
    direct = [p for p in mixed if p.trace.startswith("<think></think>")]
    assert 120 < len(direct) < 280  # about half
    for p in mixed:
        assert format_ok(p.trace) and extract_answer(p.trace) == p.answer and check_answer(p, p.answer)
        if p not in direct:
            assert p.trace.count("=") == 3  # three worked steps for four terms
    assert all(p.trace.startswith("<think></think>") for p in get_task("arithmetic:direct_percent=100").problems("train", 50))
    assert not any(p.trace.startswith("<think></think>") for p in get_task("arithmetic:terms=3").problems("train", 200))
    with pytest.raises(ValueError, match="direct_percent"):
        get_task("arithmetic:direct_percent=101")
