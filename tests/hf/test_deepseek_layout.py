"""Checkpoint layout as DeepSeek and Moonshot publish it: which tensors an FP8 export stores in FP8 (compared tensor by
tensor with DeepSeek-V3's published list), the scale formats of V3 and V3.1, and Kimi-K2 folders (`kimi_k2`, the
rotary tables its checkpoint carries, its tiktoken tokenizer and generation_config.json stop ids)."""

import json
import logging
import math
import re

import pytest
import torch
from published_checkpoints import FIXTURES, kimi_folder
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import qiusuo
from qiusuo.cli import main as cli
from qiusuo.infer.generation_config import read_generation_config
from qiusuo.infer import Engine

# DeepSeek-V3's FP8 tensors, as its inference/model.py (deepseek-ai/DeepSeek-V3 @ 9b4e978) builds them: every
# `Linear` takes the FP8 dtype except the output head (explicit bf16): attention wq / wq_a, wq_b, wkv_a, wkv_b, wo;
# MLP w1, w2, w3 of dense layers, routed experts and shared experts. Not FP8: embed, head, router weight (a plain
# Parameter), its float32 bias, every RMSNorm. In the hub names (its convert.py mapping), per layer N:
FP8_IN_A_LAYER = [r"self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)",
                  r"mlp\.(gate_proj|up_proj|down_proj)", r"mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)",
                  r"mlp\.shared_experts\.(gate_proj|up_proj|down_proj)"]
# The MTP layer (model.layers.{num_hidden_layers}) is a full block like the others, FP8 the same way, plus its own
# enorm, hnorm, eh_proj and shared_head.norm in bf16 (eh_proj as in vLLM's MTP layer, a plain unquantised Linear:
# about 103 MB more than FP8 on V3) and the copies of the embedding and head.
FP8 = re.compile(r"model\.layers\.\d+\.(" + "|".join(FP8_IN_A_LAYER) + r")\.weight")


@pytest.mark.parametrize("q_lora_rank", [32, None])
def test_fp8_export_is_deepseeks_layout(tmp_path, q_lora_rank):
    cfg = qiusuo.get_config("tiny", hidden_size=160, moe_intermediate_size=136, q_lora_rank=q_lora_rank,
                            num_nextn_predict_layers=1)
    torch.manual_seed(0)
    model = qiusuo.Transformer(cfg).to(torch.bfloat16)
    qiusuo.save_hf(model, tmp_path / "m", fp8=True, progress=False)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    weights = {k for k in dtypes if not k.endswith("_scale_inv")}
    fp8 = {k for k in weights if dtypes[k] == "F8_E4M3"}
    assert fp8 == {k for k in weights if FP8.fullmatch(k)}  # exactly DeepSeek's set, tensor by tensor
    L = cfg.num_hidden_layers
    assert f"model.layers.{L}.self_attn.kv_b_proj.weight" in fp8 and f"model.layers.{L}.eh_proj.weight" not in fp8
    for k in weights - fp8:
        assert dtypes[k] == ("F32" if k.endswith("e_score_correction_bias") else "BF16"), k
    for k in fp8:
        R, C = shapes[k]
        assert dtypes[k + "_scale_inv"] == "F32" and shapes[k + "_scale_inv"] == [math.ceil(R / 128), math.ceil(C / 128)]
    assert set(dtypes) == weights | {k + "_scale_inv" for k in fp8}
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    published = json.loads((FIXTURES / "deepseek-v3" / "config.json").read_text())["quantization_config"]
    assert conf["quantization_config"] == published  # no scale_fmt key, as V3 ships it


def test_ue8m0_scales_as_deepseek_v31_ships_them(tmp_path):
    """V3.1's `scale_fmt: "ue8m0"`: float32 scale tensors holding powers of two; read back by value and re-exported
    (convert's default follows the source's scale_fmt) to the same bytes."""
    torch.manual_seed(0)
    model = qiusuo.Transformer(qiusuo.get_config("tiny", num_nextn_predict_layers=1)).to(torch.bfloat16)
    qiusuo.save_hf(model, tmp_path / "a", fp8=True, scale_fmt="ue8m0", progress=False)
    conf = json.loads((tmp_path / "a" / "config.json").read_text())
    assert conf["quantization_config"]["scale_fmt"] == "ue8m0"
    a = load_file(str(tmp_path / "a" / "model.safetensors"))
    scales = [t for k, t in a.items() if k.endswith("_scale_inv")]
    assert scales and all(s.dtype == torch.float32 and torch.equal(s, 2.0 ** s.log2().round()) for s in scales)
    assert cli(["convert", str(tmp_path / "a"), str(tmp_path / "b"), "--fp8", "--no-progress"]) == 0
    b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def test_kimi_k2_folder_loads(tmp_path, caplog):
    """A Kimi-K2-shaped folder: model_type kimi_k2 (exported and read back as such), per-layer
    `rotary_emb.inv_freq` tensors skipped with a logged line, the tiktoken tokenizer, and the turn ending on
    generation_config.json's <|im_end|> as well as on config.json's EOS."""
    folder = kimi_folder(tmp_path / "kimi")
    kimi = json.loads((FIXTURES / "kimi-k2" / "config.json").read_text())
    cfg = qiusuo.get_config("tiny", model_type="kimi_k2", vocab_size=kimi["vocab_size"], hidden_size=32,
                            intermediate_size=64, moe_intermediate_size=16, num_nextn_predict_layers=0,
                            bos_token_id=kimi["bos_token_id"], eos_token_id=kimi["eos_token_id"])
    torch.manual_seed(0)
    model = qiusuo.Transformer(cfg).to(torch.bfloat16)
    qiusuo.save_hf(model, tmp_path / "w", progress=False)
    conf = json.loads((tmp_path / "w" / "config.json").read_text())
    assert conf["model_type"] == "kimi_k2" and conf["architectures"] == ["DeepseekV3ForCausalLM"]
    tensors = load_file(str(tmp_path / "w" / "model.safetensors"))
    for n in range(cfg.num_hidden_layers):  # as Kimi-K2's checkpoint carries them
        tensors[f"model.layers.{n}.self_attn.rotary_emb.inv_freq"] = torch.rand(cfg.qk_rope_head_dim // 2)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(conf))
    with caplog.at_level(logging.INFO, logger="qiusuo.hf"):
        loaded = qiusuo.load_model(folder, progress=False)
    assert "skipping 2 tensor(s) that carry no weights" in caplog.text
    assert loaded.cfg.model_type == "kimi_k2"
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values()))
    tok = qiusuo.load_tokenizer(folder)
    engine = Engine(loaded, tok, max_batch=1, generation=read_generation_config(folder))
    assert engine.stop_ids == {163585, 163586}  # [EOS], and <|im_end|> from the template and generation_config
