"""`qiusuo demo`'s closing lines are commands that work: they parse with the real parsers of `qiusuo chat` and
`qiusuo serve` (which require `--model`)."""

import argparse
import importlib
import shlex

import pytest

from qiusuo.cli import COMMANDS
from qiusuo.demo import report

SUMMARY = {"steps": 10, "tokens": 1000, "train_seconds": 5.0, "wall_seconds": 7.0, "val_bpb": 2.0, "unigram_bpb": 3.0,
           "plots": ["runs/demo/loss.png"], "samples": [{"prompt": "def ", "text": "f():"}],
           "model": "runs/demo/model", "checkpoint": "runs/demo/checkpoints/step_000010"}


def _parse(command: str) -> argparse.Namespace:
    """Parse `qiusuo NAME ...` as `qiusuo.cli.main` would."""
    words = shlex.split(command)
    assert words[0] == "qiusuo"
    module, help_ = COMMANDS[words[1]]
    p = argparse.ArgumentParser(prog=f"qiusuo {words[1]}", description=help_)
    importlib.import_module(module).add_args(p)
    return p.parse_args(words[2:])


@pytest.mark.parametrize("label", ["chat with it:", "serve it:", "train longer:"])
def test_printed_commands_parse(label):
    line = next(s for s in report(SUMMARY).splitlines() if s.strip().startswith(label))
    command = line.split(":", 1)[1].split("(")[0].strip()
    args = _parse(command)
    if label != "train longer:":
        assert args.model == "runs/demo/model"
    else:
        assert args.resume == "runs/demo"
