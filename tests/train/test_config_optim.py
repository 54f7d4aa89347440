"""Run config (TOML, overrides, bad keys, --help), optimizer groups and learning-rate schedule anchors."""

import argparse
import math

import pytest
import torch

from qiusuo.config import get_config
from qiusuo.model.transformer import Transformer
from qiusuo.train import run
from qiusuo.train.config import RunConfig, ScheduleSection, all_keys, load_run_config, preset_names
from qiusuo.train.optim import build_optimizer, lr_factor, param_groups


def test_presets_load_and_round_trip_through_toml(tmp_path):
    assert {"pretrain-demo", "pretrain-tiny", "pretrain-bench", "sft", "grpo"} <= set(preset_names())
    for name in preset_names():
        cfg = load_run_config(name)
        path = tmp_path / f"{name}.toml"
        path.write_text(cfg.to_toml())
        assert load_run_config(path).to_dict() == cfg.to_dict()


def test_overrides_set_typed_values_and_model_fields():
    cfg = load_run_config("pretrain-tiny", ["--optim.lr=3e-4", "--train.minutes=2", "--model.hidden_size=96",
                                   "--run.compile=true", "--eval.prompts=[\"x\", \"y\"]"])
    assert cfg.optim.lr == 3e-4 and cfg.train.minutes == 2.0 and cfg.run.compile is True
    assert cfg.eval.prompts == ["x", "y"]
    assert cfg.model.build().hidden_size == 96
    assert cfg.model.build(vocab_size=300).vocab_size == 300  # the data's vocabulary wins...
    assert load_run_config("pretrain-tiny", {"model.vocab_size": 1000}).model.build(vocab_size=300).vocab_size == 1000  # ...unless set


@pytest.mark.parametrize("key, near", [("optim.lrr", "optim.lr"), ("train.step", "train.steps"),
                                       ("model.hiden_size", "model.hidden_size"), ("balance.gama", "balance.gamma")])
def test_unknown_key_suggests_the_closest(key, near, tmp_path):
    with pytest.raises(ValueError, match=f"unknown run config key '{key}'; did you mean '{near}'"):
        load_run_config("pretrain-tiny", {key: 1})
    section, name = key.split(".")
    path = tmp_path / "bad.toml"
    path.write_text(f"[{section}]\n{name} = 1\n")
    with pytest.raises(ValueError, match=f"did you mean '{near}'"):
        load_run_config(path)


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="optim.lr='fast': expected float"):
        load_run_config("pretrain-tiny", {"optim.lr": "fast"})
    with pytest.raises(ValueError, match="schedule.kind"):
        load_run_config("pretrain-tiny", {"schedule.kind": "linear"})
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        load_run_config("pretrain-tiny", {"model.num_experts_per_tok": 99})
    with pytest.raises(ValueError, match="unknown model size 'tinny'.*did you mean 'tiny'"):
        load_run_config("pretrain-tiny", {"model.preset": "tinny"})
    with pytest.raises(FileNotFoundError, match="neither a TOML file nor a preset"):
        load_run_config("no_such_preset")


def test_cli_lists_every_key_and_hints_on_typos(capsys):
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_args(p)
    text = p.format_help()
    for key in all_keys():
        assert f"--{key}" in text, key
    assert "(default: 0.003)" in text  # optim.lr's default is shown
    args = p.parse_args(["--config", "pretrain-tiny", "--optim.lr", "1e-4", "--model.num_hidden_layers=3"])
    assert run.overrides(args) == {"optim.lr": "1e-4", "model.num_hidden_layers": "3"}
    with pytest.raises(SystemExit):
        p.parse_args(["--config", "pretrain-tiny", "--optim.lrr=1"])
    assert "did you mean --optim.lr?" in capsys.readouterr().err


def test_optimizer_groups():
    model = Transformer(get_config("tiny", tie_word_embeddings=True))
    groups = param_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups[0]["params"]}
    no_decay = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert not decay & no_decay
    assert decay | no_decay == set(names.values())  # every parameter once (the tied head is the embedding)
    assert "embed_tokens.weight" in no_decay
    assert all("norm" in n or n == "embed_tokens.weight" for n in no_decay)
    assert {"layers.1.mlp.experts.gate_up_proj", "layers.1.mlp.gate.weight", "layers.0.self_attn.q_a_proj.weight"} <= decay
    assert all(p.dim() >= 2 for p in groups[0]["params"])
    opt = build_optimizer(model, RunConfig().optim)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))


def test_lr_schedule_anchors():
    cos = ScheduleSection(kind="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(cos, 0, 0.0) == pytest.approx(0.1)
    assert lr_factor(cos, 4, 0.0) == pytest.approx(0.5)
    assert lr_factor(cos, 9, 0.0) == pytest.approx(1.0)
    assert lr_factor(cos, 10, 0.0) == pytest.approx(1.0)
    assert lr_factor(cos, 500, 0.5) == pytest.approx(0.55)
    assert lr_factor(cos, 1000, 1.0) == pytest.approx(0.1)
    assert lr_factor(cos, 1000, 1.7) == pytest.approx(0.1)  # past the end it stays at the floor
    wsd = ScheduleSection(kind="wsd", warmup_steps=0, min_lr_ratio=0.0, decay_fraction=0.2)
    assert lr_factor(wsd, 5, 0.3) == 1.0 and lr_factor(wsd, 5, 0.8) == pytest.approx(1.0)
    assert lr_factor(wsd, 5, 0.9) == pytest.approx(0.5)
    assert lr_factor(wsd, 5, 1.0) == pytest.approx(0.0)
    const = ScheduleSection(kind="constant", warmup_steps=2)
    assert lr_factor(const, 0, 0.0) == 0.5 and lr_factor(const, 7, 0.9) == 1.0
    # monotone after warmup
    vals = [lr_factor(cos, 10, p / 100) for p in range(101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert not math.isnan(sum(vals))


def test_adamw_matches_torch_reference_on_one_step():
    torch.manual_seed(0)
    model = Transformer(get_config("tiny"))
    ref = Transformer(get_config("tiny"))
    ref.load_state_dict(model.state_dict())
    cfg = RunConfig().optim
    ours = build_optimizer(model, cfg)
    decay = [p for n, p in ref.named_parameters() if p.dim() >= 2 and "embed" not in n]
    rest = [p for n, p in ref.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    theirs = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                               lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
    x = torch.randint(0, 512, (2, 8))
    for m, o in ((model, ours), (ref, theirs)):
        m(x, labels=x).loss.backward()
        o.step()
    for (n, a), b in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("command", ["train", "sft", "grpo"])
def test_every_training_command_lists_its_keys_and_takes_optim_lr(command, capsys):
    """One config system: `--help` of each command that trains lists every run config key (its own section
    included), and `--optim.lr=...` sets the learning rate."""
    from qiusuo.cli import main

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for key in ("--optim.lr", "--train.steps", "--sft.data", "--grpo.group_size", "--balance.gamma"):
        assert key in text, (command, key)
    import importlib

    from qiusuo.cli import COMMANDS

    module = importlib.import_module(COMMANDS[command][0])
    p = argparse.ArgumentParser()
    module.add_args(p)
    args = p.parse_args(["--config", "pretrain-tiny", "--optim.lr=1.5e-4"] if command == "train" else ["--optim.lr=1.5e-4"])
    source = args.config or args.default_config
    assert load_run_config(source, run.overrides(args)).optim.lr == 1.5e-4


def test_aliases_set_their_keys():
    """The short flags users type are aliases of keys: `qiusuo sft --lr 1e-3 --no-pack --model tiny`."""
    from qiusuo.rl import sft

    p = argparse.ArgumentParser()
    sft.add_args(p)
    cfg = sft.config_from_args(p.parse_args(["--data", "x.jsonl", "--lr", "1e-3", "--no-pack", "--model", "bench",
                                             "--steps", "7"]))
    assert (cfg.optim.lr, cfg.sft.pack, cfg.model.preset, cfg.train.steps, cfg.sft.data) == (1e-3, False, "bench", 7, "x.jsonl")
    assert cfg.optim.weight_decay == 0.0  # the `sft` preset's default, not pretraining's


def test_optim_name_picks_the_optimizer_and_bad_ones_are_named():
    from qiusuo.train.muon import MuonAdamW

    model = Transformer(get_config("tiny"))
    assert isinstance(build_optimizer(model, load_run_config("pretrain-tiny").optim), torch.optim.AdamW)
    assert isinstance(build_optimizer(model, load_run_config("pretrain-tiny", {"optim.name": "muon"}).optim), MuonAdamW)
    with pytest.raises(ValueError, match="optim.name='sgd'"):
        load_run_config("pretrain-tiny", {"optim.name": "sgd"})
    with pytest.raises(ValueError, match="FSDP shards them"):
        load_run_config("pretrain-tiny", {"optim.name": "muon", "parallel.dp": "fsdp"})
    with pytest.raises(ValueError, match="train.fp4_qat_from"):
        load_run_config("pretrain-tiny", {"train.fp4_qat_from": 1.5})


def test_precision_auto_measures_only_where_bf16_is_native(monkeypatch):
    from qiusuo import runtime

    def peaks(fp32, bf16):
        calls = []
        return calls, lambda dt: calls.append(dt) or (bf16 if dt == torch.bfloat16 else fp32)

    calls, peak = peaks(100e9, 300e9)
    assert runtime.pick_precision(False, peak) is None and calls == []  # AVX2-only: fp32, nothing measured
    assert runtime.pick_precision(True, peak) == torch.bfloat16  # AMX-like: bf16 3x faster
    assert runtime.pick_precision(True, peaks(151e9, 82e9)[1]) is None  # flags but slower (this project's Xeon)
    assert runtime.pick_precision(True, peaks(100e9, 105e9)[1]) is None  # within BF16_MIN_SPEEDUP: keep fp32
    assert runtime.pick_precision(True, peaks(100e9, 140e9)[1]) is None  # 1.4x: not clearly faster
    assert runtime.resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    assert runtime.resolve_precision("fp32", torch.device("cuda")) is None
    assert runtime.resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16

    measured = []
    monkeypatch.setattr(runtime, "matmul_peak", lambda dev, dt, n=None, repeats=5: measured.append(dt) or
                        (400e9 if dt == torch.bfloat16 else 170e9))
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert runtime.resolve_precision("auto", torch.device("cpu")) == torch.bfloat16 and measured
    dtype, record = runtime.precision_choice("auto", torch.device("cpu"))  # what the run's log gets
    assert record | {"precision": "bf16", "native_bf16": True, "peak_fp32": 170.0, "peak_bf16": 400.0} == record
    measured.clear()
    monkeypatch.setattr(runtime, "cpu_flags", lambda: {"avx2", "fma"})
    assert runtime.resolve_precision("auto", torch.device("cpu")) is None and not measured
    assert runtime.precision_choice("auto", torch.device("cpu"))[1]["peak_bf16"] is None
