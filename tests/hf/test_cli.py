"""`qiusuo convert` and `qiusuo inspect` on the command line: FP8 and back, dtype (short names too), shards, and what
inspect reports against `count_params` and the files themselves (a capped context said, a run folder named)."""

import argparse
import json

import pytest
import torch

import qiusuo
from qiusuo.cli import main as cli


def test_convert_fp8_and_back_then_inspect(tmp_path, capsys):
    cfg = qiusuo.get_config("tiny", num_nextn_predict_layers=2)
    torch.manual_seed(0)
    model = qiusuo.Transformer(cfg)
    qiusuo.save_hf(model, tmp_path / "src", progress=False)

    assert cli(["convert", str(tmp_path / "src"), str(tmp_path / "fp8"), "--fp8", "--no-progress"]) == 0
    assert cli(["convert", str(tmp_path / "fp8"), str(tmp_path / "bf16"), "--dtype", "bfloat16",
                "--max-shard-gb", str(100_000 / 2**30), "--no-progress"]) == 0
    capsys.readouterr()

    assert cli(["inspect", str(tmp_path / "fp8"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    counts = qiusuo.count_params(cfg)
    assert d["architecture"] == "DeepseekV3ForCausalLM" and d["model_type"] == "deepseek_v3"
    assert (d["params_total"], d["params_active"]) == (counts["total"], counts["active"])
    assert d["fp8"] is True and d["mtp_layers"] == [cfg.num_hidden_layers, cfg.num_hidden_layers + 1]
    assert list(d["shards"]) == ["model.safetensors"]

    assert cli(["inspect", str(tmp_path / "bf16"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["fp8"] is False and d["dtype"] == "bfloat16" and len(d["shards"]) > 1
    index = json.loads((tmp_path / "bf16" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == sorted(d["shards"])

    assert cli(["inspect", str(tmp_path / "bf16")]) == 0  # the human-readable form names the same facts
    text = capsys.readouterr().out
    assert "DeepseekV3ForCausalLM" in text and "bfloat16" in text and "FP8           no" in text

    # the bf16 copy of the FP8 copy is the FP8 dequantisation rounded to bf16, tensor for tensor
    via_fp8 = qiusuo.load_model(tmp_path / "fp8", dtype=torch.bfloat16, progress=False).state_dict()
    final = qiusuo.load_model(tmp_path / "bf16", progress=False).state_dict()
    assert via_fp8.keys() == final.keys()
    for k in final:
        assert torch.equal(final[k], via_fp8[k]), k


def test_convert_bad_source_names_the_problem(tmp_path, capsys):
    try:
        rc = cli(["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--no-progress"])
        message = capsys.readouterr().err
        assert rc != 0
    except (ValueError, SystemExit) as e:  # a CheckpointError, or argparse-style exit with the message on stderr
        message = str(e) + capsys.readouterr().err
    assert "config.json" in message
    assert not (tmp_path / "out").exists()


def test_dtype_takes_the_short_names(tmp_path, capsys):
    """The README's `qiusuo convert SRC DST --dtype bf16`: bf16/bfloat16, fp16/float16/half, fp32/float32 name the
    same dtypes in one parser (`parse_dtype`), for convert and for the engine commands' --dtype; a bad one is
    named with the choices."""
    from qiusuo.bench import add_args as bench_args
    from qiusuo.hf.load import parse_dtype
    from qiusuo.infer.load import add_engine_args

    for names, dt in (("bf16 bfloat16 BF16 torch.bfloat16", torch.bfloat16), ("fp16 float16 half", torch.float16),
                      ("fp32 float32 float", torch.float32)):
        assert all(parse_dtype(n) is dt for n in names.split()), names
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert p.parse_args(["--model", "m", "--dtype", "bf16"]).dtype == "bfloat16"
    p = argparse.ArgumentParser()
    bench_args(p)
    assert p.parse_args(["decode", "--dtype", "bf16"]).dtype == "bfloat16"

    qiusuo.save_hf(qiusuo.Transformer(qiusuo.get_config("tiny")), tmp_path / "src", progress=False)
    for flag, name in (("bf16", "bfloat16"), ("fp16", "float16")):
        assert cli(["convert", str(tmp_path / "src"), str(tmp_path / flag), "--dtype", flag, "--no-progress"]) == 0
        assert cli(["inspect", str(tmp_path / flag), "--json"]) == 0
        assert json.loads(capsys.readouterr().out.split("\n", 1)[1])["dtype"] == name
    with pytest.raises(SystemExit):
        cli(["convert", str(tmp_path / "src"), str(tmp_path / "x"), "--dtype", "bf17"])
    assert "unknown dtype 'bf17'; use float32 (fp32), bfloat16 (bf16) or float16 (fp16)" in capsys.readouterr().err


def test_inspect_says_when_it_caps_the_context(tmp_path, capsys):
    cfg = qiusuo.get_config("tiny")
    qiusuo.save_hf(qiusuo.Transformer(cfg), tmp_path / "m", progress=False)
    n = cfg.max_position_embeddings
    assert cli(["inspect", str(tmp_path / "m"), "--context", "32768"]) == 0
    out = capsys.readouterr().out
    assert f"1 x {n:,} tokens" in out
    assert f"context       32,768 asked, capped at {n:,}: the model's max_position_embeddings" in out
    assert cli(["inspect", str(tmp_path / "m"), "--context", str(n // 2)]) == 0
    assert "capped" not in capsys.readouterr().out
    assert cli(["inspect", str(tmp_path / "m"), "--context", "32768", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert (d["context"], d["context_asked"], d["max_position_embeddings"]) == (n, 32768, n)


def test_inspect_names_a_run_folder(tmp_path, capsys):
    qiusuo.save_hf(qiusuo.Transformer(qiusuo.get_config("tiny")), tmp_path / "run" / "model", progress=False)
    assert cli(["inspect", str(tmp_path / "run")]) == 2
    run = tmp_path / "run"
    assert f"{run} is a run folder; its model is {run / 'model'}" in capsys.readouterr().err
