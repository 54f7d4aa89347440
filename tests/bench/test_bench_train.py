"""`qiusuo bench train` times THE training step (`TrainStep`) against transformers' step on the same model and
inputs, and the `qiusuo bench NAME` dispatcher passes each benchmark's exit code through."""

import argparse

import pytest
import torch

from qiusuo import bench
from qiusuo.bench import train
from qiusuo.config import get_config
from qiusuo.model.transformer import Transformer


@pytest.fixture(autouse=True)
def _keep_threads():
    """`--threads` sets torch's process-wide thread count; give the other tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _args(argv):
    p = argparse.ArgumentParser()
    train.add_args(p)
    return p.parse_args(argv)


def test_train_bench_against_transformers(capsys):
    args = _args(["--preset", "tiny", "--batch", "2", "--seq-len", "16", "--repeats", "1", "--dtypes", "fp32",
                  "--threads", "1"])
    out = train.run(args)
    assert set(out) == {"qiusuo/fp32", "transformers/fp32"} and all(v > 0 for v in out.values())
    text = capsys.readouterr().out
    assert "matmul peak: fp32" in text and "MFU" in text and "fp32  speedup over transformers:" in text


def test_train_step_moves_the_weights_and_the_balancing_bias():
    """The timed step is a real optimizer step: weights change, and the routers' biases move (gamma 1e-3)."""
    model = Transformer(get_config("tiny", num_nextn_predict_layers=0)).train()
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train.qiusuo_step(model, x, torch.roll(x, -1, dims=1), None)()
    after = model.state_dict()
    assert not torch.equal(before["embed_tokens.weight"], after["embed_tokens.weight"])
    biases = [k for k in after if k.endswith("e_score_correction_bias")]
    assert biases and any(not torch.equal(before[k], after[k]) for k in biases)


def test_dispatcher_passes_exit_codes_through(monkeypatch):
    """A run function's int is the exit code; a dict of figures means success."""
    import qiusuo.bench.train as mod

    monkeypatch.setattr(mod, "run", lambda args: 3)
    assert bench.main(argparse.Namespace(bench="train")) == 3
    monkeypatch.setattr(mod, "run", lambda args: {"qiusuo/fp32": 1.0})
    assert bench.main(argparse.Namespace(bench="train")) == 0


def test_bad_setting_is_one_line_and_exit_code_2(capsys):
    from qiusuo.cli import main

    assert main(["bench", "train", "--preset", "tinny", "--no-reference"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qiusuo bench train: unknown model size 'tinny'")


def test_train_bench_reads_the_run_config(capsys):
    """`bench train` is a command that trains: the one run config (`--config`, `--section.key`), with its old
    flags as aliases."""
    p = argparse.ArgumentParser()
    train.add_args(p)
    assert "--optim.lr" in p.format_help() and "--data.batch_size" in p.format_help()
    args = p.parse_args(["--model.preset=tiny", "--data.batch_size=2", "--seq-len", "16", "--repeats", "1",
                         "--dtypes", "fp32", "--no-reference", "--run.threads=1"])
    out = train.run(args)
    assert set(out) == {"qiusuo/fp32"}
    assert "model tiny: batch 2 x 16 tokens" in capsys.readouterr().out
