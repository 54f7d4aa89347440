import pytest

from qiusuo.config import PRESETS, ModelConfig, get_config
from qiusuo.model.count import cache_bytes_per_token, count_params


def test_published_parameter_counts():
    v3 = count_params(get_config("deepseek-v3"))
    assert round(v3["total"] / 1e9, 2) == 671.03  # without the MTP layer
    assert round(v3["active"] / 1e9, 2) == 37.55  # embedding and output head counted
    lite = count_params(get_config("deepseek-v2-lite"))
    assert round(lite["total"] / 1e9, 2) == 15.71


def test_mtp_counted_only_when_asked():
    cfg = get_config("tiny")
    assert cfg.num_nextn_predict_layers == 1
    assert count_params(cfg, include_mtp=True)["total"] > count_params(cfg)["total"]


def test_v3_cache_formula():
    cfg = get_config("deepseek-v3")
    assert cfg.latent_dim == 576
    assert cache_bytes_per_token(cfg, "bf16") == 70_272


def test_from_hf_hub_form():
    hub = {**PRESETS["deepseek-v3"], "architectures": ["DeepseekV3ForCausalLM"], "quantization_config": {"fmt": "e4m3"},
           "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}}
    cfg = ModelConfig.from_hf(hub)
    assert cfg.yarn["factor"] == 40 and cfg.topk_method == "noaux_tc" and cfg.scoring_func == "sigmoid"
    assert cfg.softmax_scale > 192 ** -0.5  # mscale^2 applied


SMALL = {"vocab_size": 100, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
         "v_head_dim": 16, "moe_intermediate_size": 32}  # the shape fields every real config.json names


def test_from_hf_transformers5_form():
    d = {"model_type": "deepseek_v3", **SMALL,
         "n_routed_experts": 8, "n_group": 2, "topk_group": 1, "num_experts_per_tok": 2,
         "rope_parameters": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                             "original_max_position_embeddings": 128}}
    cfg = ModelConfig.from_hf(d)
    assert cfg.rope_theta == 5000.0 and cfg.yarn["factor"] == 4.0
    plain = ModelConfig.from_hf({**d, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}})
    assert plain.rope_theta == 7.0 and plain.yarn is None


def test_v2_defaults_to_softmax_greedy():
    cfg = ModelConfig.from_hf({"model_type": "deepseek_v2", **SMALL, "n_routed_experts": 8, "num_experts_per_tok": 2,
                               "n_group": 1, "topk_group": 1})
    assert cfg.scoring_func == "softmax" and cfg.topk_method == "greedy"


@pytest.mark.parametrize("overrides,field", [
    (dict(n_routed_experts=10, n_group=4), "n_group"),
    (dict(topk_group=5, n_group=4), "topk_group"),
    (dict(num_experts_per_tok=17), "num_experts_per_tok"),
    (dict(topk_method="best"), "topk_method"),
    (dict(scoring_func="relu"), "scoring_func"),
    (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(model_type="llama"), "model_type"),
])
def test_invalid_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        get_config("bench", **overrides)


def test_unknown_preset_suggests():
    with pytest.raises(ValueError, match="did you mean 'tiny'"):
        get_config("tinny")


def test_unsupported_model_type_in_hf_config():
    with pytest.raises(ValueError, match="model_type='llama'"):
        ModelConfig.from_hf({"model_type": "llama"})
