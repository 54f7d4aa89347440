"""`qiusuo bench quality`: the dense twin has the MoE's active parameters, and the interleaved comparison trains
both arms on the same budget, lowers both validation losses and writes its JSON and plot."""

import argparse
import json

import pytest
import torch

from qiusuo.bench.quality import add_args, dense_twin, parse_arm, run
from qiusuo.cli import main as cli
from qiusuo.config import get_config
from qiusuo.data.prepare import prepare
from qiusuo.model.count import count_params

TINY = "pretrain-tiny"  # the run preset (the model size is `tiny`)


@pytest.mark.parametrize("preset", ["tiny", "bench", "deepseek-v2-lite"])
def test_dense_twin_has_the_same_active_parameters(preset):
    moe = get_config(preset)
    dense = moe.replace(**dense_twin(moe))
    a, b = count_params(moe), count_params(dense)
    assert not dense.is_moe and b["routed"] == 0 and b["total"] == b["active"]
    # rounding the width leaves less than one MLP column (3 * hidden) per layer
    assert abs(a["active"] - b["active"]) <= 3 * moe.hidden_size * moe.num_hidden_layers / 2
    assert a["total"] > b["total"]


def test_dense_twin_of_a_dense_model_is_an_error():
    dense = get_config("tiny", n_routed_experts=None, first_k_dense_replace=2)
    with pytest.raises(ValueError, match="already dense"):
        dense_twin(dense)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("quality_data")
    prepare(out, max_bytes=150_000, vocab_size=512, val_fraction=0.05, progress=False)
    return out


@pytest.fixture
def restore_threads():
    """`run.threads=1` (fast on a CPU shared with other jobs) sets torch's global thread count; put it back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def parse(argv):
    p = argparse.ArgumentParser(prog="qiusuo bench quality")
    add_args(p)
    return p.parse_args(argv)


def test_compare_trains_both_arms_and_writes_results(data_dir, tmp_path, capsys, restore_threads):
    out = tmp_path / "q"
    args = parse(["--config", TINY, "--data", str(data_dir), "--out", str(out), "--minutes", "30", "--steps", "12",
                  "--eval-every", "1e9", "--eval-batches", "2", "--no-progress",
                  "--data.batch_size=4", "--data.seq_len=64", "--schedule.warmup_steps=2", "--run.threads=1"])
    assert run(args) == 0
    result = json.loads((out / "quality.json").read_text())
    assert (out / "quality.png").stat().st_size > 0
    moe, dense = result["moe"], result["dense"]
    assert moe["steps"] == dense["steps"] == 12 and moe["tokens"] == dense["tokens"] == 12 * 4 * 64
    assert moe["params_total"] > dense["params_total"]
    assert abs(moe["params_active"] - dense["params_active"]) < 0.02 * moe["params_active"]
    for arm in (moe, dense):
        first, last = arm["curve"][0], arm["curve"][-1]
        assert first["step"] == 0 and last["step"] == 12
        assert last["bpb"] < first["bpb"]  # both learn
        assert last["bpb"] == arm["final_bpb"]
    assert result["unigram_bpb"] > 0
    printed = capsys.readouterr().out
    assert "moe" in printed and "dense" in printed and "unigram baseline" in printed


def test_unknown_override_names_the_closest_key(data_dir, tmp_path, capsys):
    """`--set KEY=VALUE` is gone: settings are the run config's `--section.key` flags, checked by argparse."""
    with pytest.raises(SystemExit) as e:
        parse(["--config", TINY, "--data", str(data_dir), "--out", str(tmp_path), "--optim.lrr=1e-3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "optim.lr" in err


@pytest.mark.parametrize("setting, why", [("--optim.lrr=1e-3", "did you mean --optim.lr"),
                                          ("--optim.lr=-1", "optim.lr=-1.0: must be positive")])
def test_bad_setting_exits_nonzero_with_one_line(tmp_path, capsys, setting, why):
    """Through the real command line: the exit code reaches the shell (it used to be dropped: exit 0) and the
    error is one line, before any data is prepared (--data points at an empty folder)."""
    argv = ["bench", "quality", "--config", TINY, "--data", str(tmp_path / "none"), "--out", str(tmp_path), setting]
    try:
        rc = cli(argv)
    except SystemExit as e:  # argparse: unknown option
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert why in err[-1] and err[-1].startswith("qiusuo bench quality")
    assert not (tmp_path / "none").exists()


def test_any_set_of_arms_with_a_twin(data_dir, tmp_path, restore_threads):
    """`--arm NAME=CONFIG[,key=value]`: three arms (the plain model, the same with mHC streams, the dense twin of
    the first), each trained for the same budget; bad arm specs are one-line errors before any training."""
    out = tmp_path / "arms"
    common = ["--data", str(data_dir), "--out", str(out), "--minutes", "30", "--steps", "4", "--eval-every", "1e9",
              "--eval-batches", "1", "--no-progress", "--data.batch_size=2", "--data.seq_len=32",
              "--schedule.warmup_steps=1", "--run.threads=1"]
    args = parse(common + ["--arm", f"plain={TINY}", "--arm", f"mhc={TINY},model.use_mhc=true,model.hc_mult=2",
                           "--arm", "dense=twin:plain"])
    assert run(args) == 0
    result = json.loads((out / "quality.json").read_text())
    assert result["arms"] == ["plain", "mhc", "dense"]
    assert all(result[a]["steps"] == 4 for a in result["arms"])
    assert result["mhc"]["params_total"] > result["plain"]["params_total"] > result["dense"]["params_total"]
    for bad in ("nameonly", "x=twin:nobody", f"a={TINY},model.hidden_size"):
        assert run(parse(common + ["--arm", bad])) == 2


def test_arm_values_may_be_toml_lists_and_quoted_strings():
    """An arm's settings split at the commas outside brackets and quotes: hash layers are a list value."""
    name, config, settings = parse_arm('hash=pretrain-demo,model.mlp_layer_types=["dense","hash_moe","moe","moe"],'
                                       'optim.name=muon,optim.lr=6e-3,run.out_dir="a,b"')
    assert (name, config) == ("hash", "pretrain-demo")
    assert settings == {"model.mlp_layer_types": ["dense", "hash_moe", "moe", "moe"], "optim.name": "muon",
                        "optim.lr": 6e-3, "run.out_dir": "a,b"}
