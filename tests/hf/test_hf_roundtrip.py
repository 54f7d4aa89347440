"""qiusuo -> Hugging Face layout -> qiusuo: bitwise in fp32 (MTP and routing bias included), shards, dtypes, names,
the loaded model trains, and the command-line `convert` / `inspect`."""

import json
import logging

import pytest
import torch
from safetensors import safe_open

import qiusuo
from qiusuo import Transformer, get_config
from qiusuo.hf import from_hf_state_dict, load_model, save_hf, to_hf_state_dict


def random_model(seed=0, **overrides) -> Transformer:
    """A tiny model whose every tensor, the routing bias included, is random (nothing left at its init value)."""
    torch.manual_seed(seed)
    model = Transformer(get_config("tiny", **overrides))
    with torch.no_grad():
        for name, t in model.state_dict().items():
            t.copy_(torch.randn_like(t) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def assert_same_state(a: Transformer, b: Transformer):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("overrides", [
    {},  # V3: q_lora, MTP, noaux_tc bias
    {"tie_word_embeddings": True, "q_lora_rank": None, "num_nextn_predict_layers": 2},
    {"model_type": "deepseek_v2", "topk_method": "group_limited_greedy", "num_nextn_predict_layers": 0},
])
def test_round_trip_bitwise(tmp_path, overrides):
    model = random_model(**overrides)
    save_hf(model, tmp_path / "m", progress=False)
    loaded = load_model(tmp_path / "m", progress=False)
    assert not loaded.training
    assert_same_state(model, loaded)
    if model.cfg.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.embed_tokens.weight
    # non-persistent state is rebuilt, not left as to_empty garbage
    assert torch.equal(loaded.rotary.inv_freq, model.rotary.inv_freq)
    x = torch.randint(0, model.cfg.vocab_size, (2, 12))
    assert torch.equal(model.eval()(x), loaded(x))


def test_hub_names_and_config(tmp_path):
    model = random_model()
    cfg = model.cfg
    save_hf(model, tmp_path / "m", progress=False)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:  # the reference reader opens our files
        names = set(f.keys())
        L, E, I = cfg.num_hidden_layers, cfg.n_routed_experts, cfg.moe_intermediate_size
        gate_up = model.state_dict()["layers.1.mlp.experts.gate_up_proj"]
        assert torch.equal(f.get_tensor("model.layers.1.mlp.experts.3.gate_proj.weight"), gate_up[3, :I])
        assert torch.equal(f.get_tensor("model.layers.1.mlp.experts.3.up_proj.weight"), gate_up[3, I:])
        assert torch.equal(f.get_tensor(f"model.layers.{L}.shared_head.head.weight"), model.lm_head.weight)
        assert torch.equal(f.get_tensor(f"model.layers.{L}.embed_tokens.weight"), model.embed_tokens.weight)
        assert torch.equal(f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias"),
                           model.layers[1].mlp.gate.e_score_correction_bias)
    assert f"model.layers.1.mlp.experts.{E - 1}.down_proj.weight" in names
    assert f"model.layers.{L}.shared_head.norm.weight" in names and f"model.layers.{L}.eh_proj.weight" in names
    assert not any("gate_up_proj" in n for n in names)
    assert names == set(to_hf_state_dict(model))
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert conf["architectures"] == ["DeepseekV3ForCausalLM"] and conf["model_type"] == "deepseek_v3"
    assert conf["torch_dtype"] == "float32"
    assert (tmp_path / "m" / "generation_config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_from_hf_state_dict_in_memory():
    a, b = random_model(seed=1), random_model(seed=2)
    from_hf_state_dict(b, to_hf_state_dict(a))
    assert_same_state(a, b)


def test_shards_bf16_and_replace(tmp_path):
    model = random_model()
    save_hf(model, tmp_path / "m", progress=False)  # replaced below: the folder swaps atomically
    save_hf(model, tmp_path / "m", dtype="bfloat16", max_shard_bytes=100_000, progress=False)
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and not (tmp_path / "m" / "model.safetensors").exists()
    assert all((tmp_path / "m" / f).stat().st_size <= 100_000 + 8192 for f in files)  # + header
    loaded = load_model(tmp_path / "m", progress=False)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    # the routing bias stays float32: it moves in steps far below bf16's resolution near its value
    assert loaded.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32
    ref = {k: v.to(torch.bfloat16) if v.dtype == torch.float32 and "e_score" not in k else v
           for k, v in model.state_dict().items()}
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k
    as32 = load_model(tmp_path / "m", dtype=torch.float32, progress=False)
    assert as32.embed_tokens.weight.dtype == torch.float32


def test_mtp_skipped_with_a_log_line(tmp_path, caplog):
    model = random_model()
    save_hf(model, tmp_path / "m", progress=False)
    with caplog.at_level(logging.INFO, logger="qiusuo.hf"):
        loaded = load_model(tmp_path / "m", load_mtp=False, progress=False)
    assert len(loaded.mtp) == 0 and loaded.cfg.num_nextn_predict_layers == 0
    assert "skipping 1 MTP layer" in caplog.text
    x = torch.randint(0, model.cfg.vocab_size, (1, 9))
    assert torch.equal(model.eval()(x), loaded(x))


def test_loaded_model_trains(tmp_path):
    save_hf(random_model(), tmp_path / "m", progress=False)
    model = load_model(tmp_path / "m", progress=False).train()
    torch.manual_seed(0)
    x = torch.randint(0, model.cfg.vocab_size, (4, 16))
    labels = torch.cat([x[:, 1:], torch.full((4, 1), -100)], dim=1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loss0 = model(x, labels=labels).loss
    loss0.backward()
    opt.step()
    with torch.no_grad():
        loss1 = model(x, labels=labels).loss
    assert loss1 < loss0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert "embed_tokens.weight" in changed and "layers.1.mlp.experts.gate_up_proj" in changed
    assert "mtp.0.eh_proj.weight" in changed


def test_public_api():
    assert qiusuo.load_model is load_model and qiusuo.save_hf is save_hf
