"""Adapters through the one train step: `qiusuo sft --lora.rank=...` over a packed (QLoRA) base trains only the
adapters, checkpoints hold only them (peft's files) and resume bit for bit; GRPO's reference is the policy with its
adapters off; bad `[lora]` settings are refused naming the key."""

import json

import pytest
import torch
from safetensors.torch import load_file

from qiusuo.cli import main
from qiusuo.config import get_config
from qiusuo.data.tokenizer import Tokenizer
from qiusuo.hf.save import save_hf
from qiusuo.lora.layers import lora_layers
from qiusuo.rl.sft import task_chats
from qiusuo.train.config import load_run_config
from qiusuo.train.metrics import read
from qiusuo.train.trainer import random_model


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random tiny model with a tokenizer trained on arithmetic chats, saved as a model folder."""
    chats = task_chats("arithmetic", 200, 0)
    tok = Tokenizer.train([m["content"] for _, c in chats for m in c], 320)
    cfg = get_config("tiny", vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                     pad_token_id=tok.pad_id)
    out = tmp_path_factory.mktemp("base") / "model"
    save_hf(random_model(cfg, 0), out, tokenizer=tok, progress=False)
    return out


def sft_args(base, out, *extra):
    return ["sft", "--data", "task:arithmetic", "--sft.examples=64", "--model", str(base), "--batch-size", "4",
            "--seq-len", "64", "--threads", "1", "--no-progress", "--train.log_every=1", "--out-dir", str(out),
            "--lora.rank=4", "--lora.alpha=8", "--lora.targets=attention,experts", "--quantize", "experts=int4",
            *extra]


def test_qlora_sft_checkpoints_only_adapters_and_resumes_exactly(base, tmp_path):
    assert main([*sft_args(base, tmp_path / "a"), "--steps", "4"]) == 0
    assert main([*sft_args(base, tmp_path / "b"), "--steps", "2", "--checkpoint.every=2"]) == 0
    assert main(["sft", "--resume", str(tmp_path / "b"), "--train.steps=4"]) == 0

    def losses(run):
        return [r["loss"] for r in read(run) if r["kind"] == "train"]

    assert len(losses(tmp_path / "a")) == 4 and losses(tmp_path / "a") == losses(tmp_path / "b")  # bit for bit
    step = tmp_path / "a" / "checkpoints" / "step_000004"
    assert not (step / "model.safetensors").exists() and (step / "adapter_model.safetensors").is_file()
    tensors = load_file(step / "adapter_model.safetensors")
    assert tensors and all(".lora_A." in k or ".lora_B." in k for k in tensors)
    state = torch.load(step / "optimizer.pt", weights_only=True)["state"]
    assert len(state) == len(tensors)  # AdamW holds moments for the adapters alone
    cfg = json.loads((tmp_path / "a" / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base) and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert load_run_config(tmp_path / "b" / "run.toml").lora.quantize == "experts=int4"


def test_training_leaves_the_packed_base_untouched(base, tmp_path):
    from qiusuo.rl.sft import ChatSource
    from qiusuo.train.trainer import Trainer

    cfg = load_run_config("sft", {"sft.data": "task:arithmetic", "sft.examples": 32, "sft.init": str(base),
                                  "data.batch_size": 4, "data.seq_len": 64, "run.threads": 1, "run.progress": False,
                                  "run.out_dir": str(tmp_path / "r"), "lora.rank": 2, "lora.router": True,
                                  "lora.quantize": "int8", "balance.gamma": 0.01})
    t = Trainer(cfg, source=ChatSource(cfg))
    trained = {n for n, p in t.model.named_parameters() if p.requires_grad}
    frozen = {k: v.clone() for k, v in t.model.state_dict().items()
              if k not in trained and not k.endswith("e_score_correction_bias")}
    assert any(k.endswith("experts.base_layer.gate_up_proj") for k in frozen)  # the packed codes
    assert trained and all("lora_" in n or n.endswith(("_A", "_B", "gate.weight")) for n in trained)
    bias = t.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    for _ in range(2):
        t.train_step()
    after = t.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())
    assert not torch.equal(bias, t.model.layers[1].mlp.gate.e_score_correction_bias)  # its router trains: it balances
    assert any(float(m.lora_B.detach().abs().max()) > 0 for m in lora_layers(t.model) if hasattr(m, "lora_B"))


def test_grpo_reference_is_the_policy_without_adapters(base, tmp_path):
    from qiusuo.rl.grpo import GRPO

    cfg = load_run_config("grpo", {"grpo.model": str(base), "grpo.prompts_per_step": 2, "grpo.group_size": 2,
                                   "grpo.max_tokens": 8, "grpo.beta": 0.1, "grpo.eval_n": 4, "train.steps": 1,
                                   "run.threads": 1, "run.progress": False, "run.out_dir": str(tmp_path / "g"),
                                   "lora.rank": 2, "lora.targets": "attention"})
    g = GRPO(cfg)
    assert g.ref is None  # no copy of the model
    rec = g.step()
    assert rec["kl"] == 0.0  # B starts at zero: the policy is its reference at the first step
    assert set(load_file(g.save(tmp_path / "g") / "adapter_model.safetensors")) and \
        not (tmp_path / "g" / "model").exists()


@pytest.mark.parametrize("over, message", [
    ({"lora.targets": "attention,head"}, "unknown 'head'"),
    ({"lora.rank": 4, "optim.name": "muon"}, "optim.name"),
    ({"lora.rank": 0, "lora.quantize": "int4"}, "lora.quantize"),
    ({"lora.rank": -1}, "lora.rank"),
])
def test_bad_lora_settings_name_the_key(over, message):
    with pytest.raises(ValueError, match=message):
        load_run_config("sft", {"lora.rank": 4, **over})


def test_lora_needs_a_base_folder(tmp_path):
    from qiusuo.rl.sft import run_sft

    cfg = load_run_config("sft", {"sft.data": "task:arithmetic", "sft.examples": 16, "lora.rank": 2,
                                  "run.out_dir": str(tmp_path / "x"), "run.threads": 1})
    with pytest.raises(ValueError, match="adapters adapt a trained model"):
        run_sft(cfg)
