"""`qiusuo bench quality`: the dense twin has the MoE's active parameters, and the interleaved comparison trains
both arms on the same budget, lowers both validation losses and writes its JSON and plot."""

import argparse
import json

import pytest
import torch

from qiusuo.config import count_params, get_config
from qiusuo.data.prepare import prepare
from qiusuo.train.quality import add_quality_args, dense_twin, run_quality


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
    p = argparse.ArgumentParser()
    add_quality_args(p)
    return p.parse_args(argv)


def test_compare_trains_both_arms_and_writes_results(data_dir, tmp_path, capsys, restore_threads):
    out = tmp_path / "q"
    args = parse(["--config", "tiny", "--data", str(data_dir), "--out", str(out), "--minutes", "30", "--steps", "12",
                  "--eval-every", "1e9", "--eval-batches", "2", "--no-progress",
                  "--set", "data.batch_size=4", "--set", "data.seq_len=64", "--set", "schedule.warmup_steps=2",
                  "--set", "run.threads=1"])
    assert run_quality(args) == 0
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
    args = parse(["--config", "tiny", "--data", str(data_dir), "--out", str(tmp_path), "--set", "optim.lrr=1e-3"])
    assert run_quality(args) == 2
    err = capsys.readouterr().err
    assert "optim.lrr" in err and "optim.lr" in err
