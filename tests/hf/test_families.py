"""Every family on DeepSeek's architecture that qiusuo loads (`qiusuo.families.FAMILIES`), against transformers both
ways, through files as users hold them: a checkpoint transformers wrote loads into qiusuo with the same logits, and
what `qiusuo.save_hf` writes (the family's own `model_type`, config spelling and tensor names) loads into the family's
transformers class with the same logits. Tiny random configs, each unlike the others: rms_norm_eps 1e-5 and 1e-6,
tied and untied heads, dense-only and dense-then-MoE layers, with and without a query LoRA, YaRN in Sarvam's original
spelling, Kimi-K2.5's vision wrapper (`language_model.` prefix, vision tensors skipped), GLM-5's interleaved indexer
rotary and shared top-k layers. The DeepSeek-V2/V3/V3.2/V4 rows have their own tests (test_parity.py,
tests/model/test_v32.py, tests/model/test_v4.py). Families whose math differs are refused with the reason."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qiusuo
from qiusuo.config import ModelConfig
from qiusuo.families import FAMILIES, REFUSED
from qiusuo.hf.load import read_config
from qiusuo.io import CheckpointError
from qiusuo.cache.contiguous import ContiguousCache
from qiusuo.model.transformer import Transformer

transformers = pytest.importorskip("transformers")

TOL = 1e-4
MLA = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_position_embeddings=256)
MOE = dict(moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
VISION = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


def _kimi():
    text = dict(MLA, **MOE, model_type="deepseek_v3", q_lora_rank=16, rms_norm_eps=1e-5, n_group=1, topk_group=1,
                first_k_dense_replace=1, routed_scaling_factor=2.827, num_nextn_predict_layers=0)
    return transformers.Kimi_K25Config(text_config=text, vision_config=VISION, projection_hidden_size=16,
                                       tie_word_embeddings=False)


# family -> (transformers config, transformers class)
CASES = {
    # GLM-4.7-Flash: eps 1e-5, grouped routing, a dense first layer spelled as mlp_layer_types, untied
    "glm4_moe_lite": lambda: (transformers.Glm4MoeLiteConfig(
        **MLA, **MOE, q_lora_rank=16, rms_norm_eps=1e-5, n_group=2, topk_group=1, routed_scaling_factor=1.8,
        mlp_layer_types=["dense", "sparse", "sparse"]), transformers.Glm4MoeLiteForCausalLM),
    # Sarvam: no query LoRA, tied, YaRN, every layer MoE after the first
    "sarvam_mla": lambda: (transformers.SarvamMLAConfig(
        **MLA, **MOE, q_lora_rank=None, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters=YARN,
        routed_scaling_factor=2.5), transformers.DeepseekV3ForCausalLM),
    # Youtu-LLM: a dense MLP in every layer, tied, eps 1e-5
    "youtu": lambda: (transformers.YoutuConfig(**MLA, q_lora_rank=16, rms_norm_eps=1e-5, tie_word_embeddings=True),
                      transformers.YoutuForCausalLM),
    # Kimi-K2.5: DeepSeek-V3 inside a vision wrapper
    "kimi_k25": lambda: (_kimi(), transformers.Kimi_K25ForConditionalGeneration),
    # GLM-5: V3.2 with interleaved indexer rotary and layers 1 and 3 reusing the top-k of layers 0 and 2
    "glm_moe_dsa": lambda: (transformers.GlmMoeDsaConfig(
        **dict(MLA, num_hidden_layers=4), **MOE, q_lora_rank=16, rms_norm_eps=1e-5, n_group=1, topk_group=1,
        index_n_heads=16, index_head_dim=8, index_topk=6, index_topk_freq=2, index_skip_topk_offset=1,
        mlp_layer_types=["dense", "sparse", "sparse", "sparse"]), transformers.GlmMoeDsaForCausalLM),
}


@torch.no_grad()
def randomise(state: dict[str, torch.Tensor], seed: int = 0) -> None:
    """Every floating tensor random (routing biases included, so none is inert), norms near 1."""
    gen = torch.Generator().manual_seed(seed)
    for name, t in state.items():
        if t.is_floating_point() and "inv_freq" not in name:
            t.copy_(0.3 * torch.randn(t.shape, generator=gen) + (1.0 if name.endswith("norm.weight") else 0.0))


def as_json(config) -> dict:
    """A transformers config as its config.json holds it (JSON keys are strings: `id2label`)."""
    return json.loads(config.to_json_string())


def ids(seed: int, T: int = 24) -> torch.Tensor:
    return torch.randint(0, 128, (2, T), generator=torch.Generator().manual_seed(seed))


def hub_checkpoint(family: str, folder) -> torch.nn.Module:
    """transformers' model of the family, random, saved in the published naming. transformers 5.25 saves Kimi-K2.5
    as `language_model.model.blocks.N` and `model.mm_projector.*` (its reverse renaming of the vision tower's names
    catches the text layers); the published checkpoint says `layers` and `mm_projector.`, which is what is written."""
    config, cls = CASES[family]()
    torch.manual_seed(0)
    model = cls(config).eval()
    randomise(model.state_dict())
    model.save_pretrained(folder)
    if family == "kimi_k25":
        t = load_file(folder / "model.safetensors")
        save_file({k.replace("language_model.model.blocks.", "language_model.model.layers.")
                   .replace("model.mm_projector.", "mm_projector."): v for k, v in t.items()},
                  folder / "model.safetensors", metadata={"format": "pt"})
    return model


@pytest.mark.parametrize("family", list(CASES))
def test_transformers_checkpoint_loads_with_identical_logits(family, tmp_path):
    ref = hub_checkpoint(family, tmp_path)
    ours = qiusuo.load_model(tmp_path)
    assert ours.cfg.model_type == family and ours.cfg.arch == FAMILIES[family].arch
    x = ids(1)
    with torch.no_grad():
        diff = (ref(input_ids=x).logits - ours(x)).abs().max().item()
    assert diff <= TOL, f"{family}: max |logits diff| {diff:.2e}"


@pytest.mark.parametrize("family", list(CASES))
def test_export_loads_in_transformers_with_identical_logits(family, tmp_path):
    config, cls = CASES[family]()
    ours = Transformer(ModelConfig.from_hf(as_json(config))).eval()
    randomise(ours.state_dict(), seed=3)
    qiusuo.save_hf(ours, tmp_path / "out", progress=False)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == family and written["architectures"] == [FAMILIES[family].architectures]
    names = load_file(tmp_path / "out" / "model.safetensors").keys()
    assert all(n.startswith(FAMILIES[family].prefix) for n in names)
    theirs = cls.from_pretrained(tmp_path / "out").eval()
    x = ids(2)
    with torch.no_grad():
        diff = (theirs(input_ids=x).logits - ours(x)).abs().max().item()
    assert diff <= TOL, f"{family}: max |logits diff| {diff:.2e}"
    assert qiusuo.load_model(tmp_path / "out").cfg == ours.cfg  # and back, config unchanged


def test_family_configs_read_as_transformers_reads_them(tmp_path):
    """What each family's spelling means: GLM's mlp_layer_types, Youtu's missing experts, Kimi-K2.5's wrapper and
    tying, GLM-5's indexer schedule, Sarvam's original remote-code spelling (the same model as transformers')."""
    cfg = ModelConfig.from_hf(CASES["glm4_moe_lite"]()[0].to_dict())
    assert (cfg.first_k_dense_replace, cfg.rms_norm_eps, cfg.scoring_func, cfg.topk_method) == (
        1, 1e-5, "sigmoid", "noaux_tc")
    assert not ModelConfig.from_hf(CASES["youtu"]()[0].to_dict()).is_moe
    kimi = ModelConfig.from_hf(CASES["kimi_k25"]()[0].to_dict())
    assert kimi.wrapper["vision_config"]["hidden_size"] == 16 and not kimi.tie_word_embeddings
    absent = {k: v for k, v in _kimi().to_dict().items() if k != "tie_word_embeddings"}  # transformers' default
    assert ModelConfig.from_hf(absent).tie_word_embeddings
    glm5 = ModelConfig.from_hf(as_json(CASES["glm_moe_dsa"]()[0]))
    assert glm5.indexer_types == ["full", "shared", "full", "shared"] and glm5.index_rope_interleave
    assert glm5.to_hf()["indexer_types"] == glm5.indexer_types and "index_rope_interleave" not in glm5.to_hf()
    # Sarvam-105B's original config.json (remote code): num_experts, num_shared_experts, deepseek_yarn, head_dim
    hub = CASES["sarvam_mla"]()[0].to_dict()
    legacy = {k: v for k, v in hub.items() if k not in ("n_routed_experts", "n_shared_experts", "rope_parameters")}
    legacy.update(num_experts=8, num_shared_experts=1, head_dim=20, rope_theta=10000.0,
                  rope_scaling={k: v for k, v in YARN.items() if k not in ("rope_type", "rope_theta")}
                  | {"type": "deepseek_yarn"})
    assert ModelConfig.from_hf(legacy) == ModelConfig.from_hf(hub)
    (tmp_path / "config.json").write_text(json.dumps(legacy))
    theirs = transformers.AutoConfig.from_pretrained(tmp_path)
    assert ModelConfig.from_hf(theirs.to_dict()) == ModelConfig.from_hf(hub)


def test_glm5_features_matter():
    """GLM-5's two differences from V3.2 move the logits far beyond TOL when ignored: the indexer's interleaved
    rotary, and the shared layers reusing the previous top-k (instead: each layer with its own indexer)."""
    config, cls = CASES["glm_moe_dsa"]()
    torch.manual_seed(0)
    ref = cls(config).eval()
    randomise(ref.state_dict())
    ours = Transformer(ModelConfig.from_hf(as_json(config))).eval()
    ours.load_state_dict({k.removeprefix("model."): v for k, v in ref.state_dict().items() if "inv_freq" not in k})
    x = ids(4, 40)
    with torch.no_grad():
        good = ref(input_ids=x).logits
        assert (ours(x) - good).abs().max() < TOL
        halves = Transformer(ours.cfg.replace(index_rope_interleave=False)).eval()
        halves.load_state_dict(ours.state_dict())
        assert (halves(x) - good).abs().max() > 100 * TOL


def test_glm5_cached_decoding_equals_the_full_forward():
    """Shared layers reuse the full layer's selection on every path: prefill, one token at a time (decoding reads
    only the k latents the full layer picked)."""
    cfg = ModelConfig.from_hf(as_json(CASES["glm_moe_dsa"]()[0]))
    model = Transformer(cfg).eval()
    randomise(model.state_dict(), seed=5)
    x = ids(5, 40)
    with torch.no_grad():
        full = model(x)
        cache = ContiguousCache(model.cache_specs(), 2, 48)
        steps = [model(x[:, :11], cache=cache)] + [model(x[:, t: t + 1], cache=cache) for t in range(11, 40)]
    assert (torch.cat(steps, 1) - full).abs().max() < TOL
    assert [s.key_width for s in model.cache_specs()] == [8, 0, 8, 0]  # shared layers cache no indexer key


def test_refused_families_say_why(tmp_path):
    base = {**MLA, **MOE, "kv_lora_rank": 16}
    for model_type, why in REFUSED.items():
        with pytest.raises(ValueError, match="wrong logits") as e:
            ModelConfig.from_hf({**base, "model_type": model_type})
        assert why in str(e.value) and "glm4_moe_lite" in str(e.value)
        (tmp_path / "config.json").write_text(json.dumps({**base, "model_type": model_type}))
        with pytest.raises(CheckpointError, match=model_type):
            read_config(tmp_path)
    with pytest.raises(ValueError, match="partial_rotary_factor"):
        ModelConfig.from_hf({**CASES["glm4_moe_lite"]()[0].to_dict(), "partial_rotary_factor": 0.5})
    with pytest.raises(ValueError, match="text_config"):
        ModelConfig.from_hf({"model_type": "kimi_k25"})
    with pytest.raises(ValueError, match="indexer_types"):
        ModelConfig.from_hf({**CASES["glm_moe_dsa"]()[0].to_dict(), "indexer_types": ["shared"] * 4})


def test_kimi_k25_int4_experts_reach_the_packed_loader(tmp_path):
    """Kimi-K2.5 ships its routed experts as compressed-tensors INT4 (`weight_packed`, `weight_scale`,
    `weight_shape` under `language_model.model.layers.N.mlp.experts.J.*`, the quantization_config at the top): such
    a folder (written here by `save_hf` from experts packed to int4) loads through the wrapper's prefix into the packed
    int4 experts (`quantize="native"`), equal to the model it was written from."""
    config, _ = CASES["kimi_k25"]()
    cfg = ModelConfig.from_hf(as_json(config)).replace(hidden_size=64, intermediate_size=64, moe_intermediate_size=32)
    model = Transformer(cfg).eval()
    randomise(model.state_dict(), seed=6)
    qiusuo.save_hf(model, tmp_path / "bf16", progress=False)
    packed = qiusuo.load_model(tmp_path / "bf16", quantize="experts=int4", progress=False)
    qiusuo.save_hf(packed, tmp_path / "int4", progress=False)
    written = json.loads((tmp_path / "int4" / "config.json").read_text())
    assert written["model_type"] == "kimi_k25"
    assert written["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "language_model.model.layers.1.mlp.experts.0.gate_proj.weight_packed" in load_file(
        tmp_path / "int4" / "model.safetensors")
    back = qiusuo.load_model(tmp_path / "int4", quantize="native", progress=False)
    assert type(back.layers[1].mlp.experts).__name__ == "QuantExperts"
    with torch.no_grad():
        assert torch.equal(back(ids(7)), packed(ids(7)))
