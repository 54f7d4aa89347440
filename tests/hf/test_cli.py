"""`qiusuo convert` and `qiusuo inspect` on the command line: FP8 and back, dtype, shards, and what inspect reports
against `count_params` and the files themselves."""

import json

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
