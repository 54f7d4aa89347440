"""The config files of published checkpoints (tests/fixtures/*, provenance in each PROVENANCE.md), as a user holds
them before downloading any weights: every one parses to the published model, counts match the published totals,
DeepSeek's two config formats of the same model agree to the parameter, `qiusuo inspect` describes each without
weights and says what fits, and configs that are not model configs are refused naming what is wrong."""

import json
import shutil

import pytest
from published_checkpoints import FIXTURES

from qiusuo.cli import main as cli
from qiusuo.config import ModelConfig
from qiusuo.hf.config_json import config_from_json
from qiusuo.hf.inspect import parse_bytes
from qiusuo.hf.load import read_config
from qiusuo.infer.generation_config import read_generation_config
from qiusuo.io import CheckpointError
from qiusuo.model.count import count_params


def load(name: str) -> dict:
    return json.loads((FIXTURES / name).read_text(encoding="utf-8"))


# fixture -> (model_type, published total, active per token, whether that active figure counts the embedding), in
# billions as the model cards round them. DeepSeek's cards leave the embedding lookup out of "activated" (V3's
# README_WEIGHTS: 36.7B = our 37.55B less its 0.93B embedding); Moonshot's "A3B" keeps it in.
PUBLISHED = {
    "deepseek-v3/config.json": ("deepseek_v3", 671, 37, False),  # README_WEIGHTS: 671B main model
    "deepseek-v2/config.json": ("deepseek_v2", 236, 21, False),  # DeepSeek-V2: 236B total, 21B activated
    "kimi-k2/config.json": ("kimi_k2", 1026, 32, False),  # Kimi-K2: "1T total" (1.03T), "32B activated"
    "moonlight-16b-a3b/config.json": ("deepseek_v3", 16, 3, True),  # Moonlight-16B-A3B
    "deepseek-inference/config_16B.json": ("deepseek_v2", 15.7, 2.4, False),  # V2-Lite: 15.7B, 2.4B activated
    "deepseek-inference/config_236B.json": ("deepseek_v2", 236, 21, False),
    "deepseek-inference/config_671B.json": ("deepseek_v3", 671, 37, False),
    "deepseek-inference/config_v3.1.json": ("deepseek_v3", 671, 37, False),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_parses_to_the_published_model(name):
    model_type, total_b, active_b, with_embedding = PUBLISHED[name]
    cfg = config_from_json(load(name))
    assert cfg.model_type == model_type
    n = count_params(cfg)
    active = n["active"] - (0 if with_embedding else cfg.vocab_size * cfg.hidden_size)
    assert n["total"] == pytest.approx(total_b * 1e9, rel=0.005)  # the cards' rounding
    assert active == pytest.approx(active_b * 1e9, rel=0.04)


def test_exact_counts_and_the_two_formats_agree():
    """DeepSeek publishes V2 and V3 twice, as Hugging Face config.json and as its inference config: the same model,
    to the parameter, and to the figures this project has always quoted."""
    pairs = [("deepseek-v3/config.json", "deepseek-inference/config_671B.json", 671_026_404_352, 37_552_282_624),
             ("deepseek-v2/config.json", "deepseek-inference/config_236B.json", 235_741_434_880, 21_375_800_320)]
    for hub, inference, total, active in pairs:
        a, b = ModelConfig.from_hf(load(hub)), ModelConfig.from_deepseek_inference(load(inference))
        assert count_params(a) == count_params(b) and (count_params(a)["total"], count_params(a)["active"]) == (total, active)
        for field in ("hidden_size", "num_hidden_layers", "n_routed_experts", "n_group", "topk_group", "topk_method",
                      "scoring_func", "norm_topk_prob", "routed_scaling_factor", "q_lora_rank", "max_position_embeddings"):
            assert getattr(a, field) == getattr(b, field), (hub, field)
        assert a.yarn["factor"] == b.yarn["factor"]
    # one published difference: config_236B.json omits V2's `mscale` 0.707 (config_16B.json has it), so DeepSeek's
    # inference code scales V2's attention by mscale 1.0 where the hub config (and transformers) use 0.707
    v3 = [ModelConfig.from_hf(load("deepseek-v3/config.json")),
          ModelConfig.from_deepseek_inference(load("deepseek-inference/config_671B.json"))]
    assert v3[0].softmax_scale == pytest.approx(v3[1].softmax_scale, rel=1e-12)
    v2 = [ModelConfig.from_hf(load("deepseek-v2/config.json")),
          ModelConfig.from_deepseek_inference(load("deepseek-inference/config_236B.json"))]
    assert (v2[0].yarn["mscale_all_dim"], v2[1].yarn["mscale_all_dim"]) == (0.707, 1.0)
    lite = ModelConfig.from_deepseek_inference(load("deepseek-inference/config_16B.json"))
    assert count_params(lite)["total"] == 15_706_484_224 and lite.yarn["mscale_all_dim"] == 0.707
    # V3's MTP module: 11.6B of its own (the card's 685B = 671B + 14B with MTP's embedding and head copies)
    v3 = ModelConfig.from_hf(load("deepseek-v3/config.json"))
    assert count_params(v3, include_mtp=True)["total"] - count_params(v3)["total"] == 11_610_067_968


def test_kimi_k2_is_the_v3_architecture():
    cfg = ModelConfig.from_hf(load("kimi-k2/config.json"))
    assert (cfg.model_type, cfg.topk_method, cfg.scoring_func, cfg.n_routed_experts) == ("kimi_k2", "noaux_tc",
                                                                                          "sigmoid", 384)
    assert count_params(cfg)["total"] == 1_026_408_209_408
    hf = cfg.to_hf()
    assert hf["model_type"] == "kimi_k2" and hf["architectures"] == ["DeepseekV3ForCausalLM"]
    assert ModelConfig.from_hf(hf) == cfg
    assert ModelConfig.from_hf({**load("kimi-k2/config.json"), "model_type": "deepseek_v3"}).replace(
        model_type="kimi_k2") == cfg  # the same model under V3's name
    gen = read_generation_config(FIXTURES / "kimi-k2")
    assert gen.eos_token_ids == (163586,) and gen.sampling == {}  # <|im_end|>, not config.json's [EOS] 163585


@pytest.mark.parametrize("bad,fragment", [
    ({}, "no model_type"),
    ({"hidden_size": 64, "num_hidden_layers": 2}, "no model_type"),
    ({"model_type": "llama", "hidden_size": 64}, "model_type='llama'"),
    ("deepseek-inference/config_671B.json", "DeepSeek's inference config"),
    ("drop:hidden_size", "lacks hidden_size"),
    ("drop:moe_intermediate_size", "lacks moe_intermediate_size"),
])
def test_not_a_model_config_is_refused_naming_what_is_wrong(bad, fragment):
    if isinstance(bad, str) and bad.startswith("drop:"):
        bad = {k: v for k, v in load("deepseek-v3/config.json").items() if k != bad[5:]}
    elif isinstance(bad, str):
        bad = load(bad)
    with pytest.raises(ValueError, match=fragment):
        ModelConfig.from_hf(bad)
    with pytest.raises(ValueError, match="unknown key"):
        ModelConfig.from_deepseek_inference({**load("deepseek-inference/config_671B.json"), "n_layer": 3})


def test_quantization_config_is_checked(tmp_path):
    shutil.copy(FIXTURES / "deepseek-v3" / "config.json", tmp_path / "config.json")
    read_config(tmp_path)  # DeepSeek's own FP8 declaration
    for qc, fragment in [({"quant_method": "awq", "bits": 4}, "quant_method"),
                         ({"quant_method": "compressed-tensors", "format": "pack-quantized"}, "no config_groups"),
                         ({"quant_method": "compressed-tensors", "format": "float-quantized"}, "format"),
                         ({"quant_method": "fp8", "scale_fmt": "e4m3"}, "scale_fmt")]:
        (tmp_path / "config.json").write_text(json.dumps({**load("deepseek-v3/config.json"), "quantization_config": qc}))
        with pytest.raises(CheckpointError, match=fragment):
            read_config(tmp_path)


FORMATS = {"bf16", "fp8", "fp8+fp4-experts", "int8", "int4"}  # what `qiusuo serve --quantize` runs


def inspect_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert cli(["inspect", *map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_config_only_folders_before_downloading(tmp_path, capsys):
    """DeepSeek-V3 without its 163 shards: parameters, MTP, bytes per format, the cache, what fits."""
    folder = tmp_path / "v3"
    folder.mkdir()
    shutil.copy(FIXTURES / "deepseek-v3" / "config.json", folder)
    d = inspect_json(capsys, folder, "--memory", "24GB", "--context", "4096", "--batch", "2")
    assert not d["weights_present"] and d["model_type"] == "deepseek_v3" and d["mtp_layers"] == [61]
    assert (d["params_total"], d["params_active"], d["params_mtp"]) == (671_026_404_352, 37_552_282_624,
                                                                       11_610_067_968)
    w = d["weight_bytes"]
    assert w["bf16"] > 2 * 682e9 and 0.5 < w["fp8"] / w["bf16"] < 0.51 and w["fp8+fp4-experts"] < 0.65 * w["fp8"]
    assert 0.5 < w["int8"] / w["bf16"] < 0.51 and 0.28 < w["int4"] / w["bf16"] < 0.3  # (4.5 bits, the rest bf16)
    assert d["cache_bytes_per_token"] == 70_272 and d["cache_bytes"] == 70_272 * 4096 * 2
    assert d["memory"] == 24 * 10**9 and not any(d["fits"].values()) and set(d["fits"]) == FORMATS
    big = inspect_json(capsys, folder, "--memory", "1.5TB", "--context", "4096")
    assert all(big["fits"].values())
    lite = inspect_json(capsys, FIXTURES / "deepseek-inference" / "config_16B.json", "--memory", "40GB",
                        "--context", "32768")
    assert lite["config_format"] == "deepseek-inference" and lite["fits"]["bf16"]  # "a single 40GB GPU" (card)
    assert cli(["inspect", str(folder), "--memory", "24GB"]) == 0
    text = capsys.readouterr().out
    for frag in ("config only", "671.03B total", "layers 61 (declared in config.json)", "fp8+fp4-experts",
                 "70,272 bytes per token", "bf16 does not fit"):
        assert frag in text, (frag, text)


@pytest.mark.parametrize("name", ["deepseek-v2", "kimi-k2", "moonlight-16b-a3b"])
def test_inspect_every_published_config(name, capsys):
    d = inspect_json(capsys, FIXTURES / name, "--memory", "80GiB")
    cfg = config_from_json(load(f"{name}/config.json"))
    assert d["params_total"] == count_params(cfg)["total"] and set(d["fits"]) == FORMATS
    assert d["cache_bytes_per_token"] == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2
    assert d["fits"]["bf16"] == (name == "moonlight-16b-a3b")  # 32 GB of bf16 weights fit 80 GiB; 1T and 236B do not


def test_bad_input_is_one_line_on_the_command_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notjson").mkdir()
    (tmp_path / "notjson" / "config.json").write_text("{nope")
    cases = [(["inspect", str(tmp_path / "empty")], "config.json: not found"),
             (["inspect", str(tmp_path / "nowhere")], "no such folder or file"),
             (["inspect", str(tmp_path / "notjson")], "not valid JSON"),
             (["inspect", str(FIXTURES / "kimi-k2"), "--memory", "lots"], "give a size such as 24GB"),
             (["convert", str(tmp_path / "empty"), str(tmp_path / "out")], "config.json"),
             (["generate", "--model", str(tmp_path / "empty"), "--prompt", "x"], "config.json")]
    for argv, fragment in cases:
        capsys.readouterr()
        assert cli(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert fragment in err and "Traceback" not in err and len(err.splitlines()) == 1, (argv, err)
    assert parse_bytes("24GB") == 24 * 10**9 and parse_bytes("80GiB") == 80 * 2**30 and parse_bytes("1e9") == 10**9
