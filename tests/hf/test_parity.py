"""Parity with transformers both ways: hub checkpoints written by `save_pretrained` load into qiusuo with the same
logits and greedy continuation, and what `qiusuo.save_hf` writes loads into `AutoModelForCausalLM` with the same
logits. Tiny random configs cover both families and every routing/attention variant the hub uses.

transformers' DeepseekV2 ignores `norm_topk_prob` (it never renormalises the top-k weights), so V2 cases use
`norm_topk_prob=False`, which is what its checkpoints (V2, V2-Lite) ship with; V3 covers both settings."""

import pytest
import torch

import qiusuo
from qiusuo.model.moe import moe_routers

transformers = pytest.importorskip("transformers")


TOL = 1e-4
BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=8, n_shared_experts=1,
            max_position_embeddings=256, initializer_range=0.15, bos_token_id=0, eos_token_id=1)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
YARN_V2 = {**YARN, "mscale": 0.707, "mscale_all_dim": 0.707}

CASES = {
    "v3-qlora-groups-norm-untied": ("v3", dict(q_lora_rank=16, n_group=4, topk_group=2, num_experts_per_tok=2,
                                               norm_topk_prob=True, routed_scaling_factor=2.5)),
    "v3-noqlora-nonorm-yarn-tied": ("v3", dict(q_lora_rank=None, n_group=2, topk_group=1, num_experts_per_tok=2,
                                               norm_topk_prob=False, routed_scaling_factor=1.5, rope_parameters=YARN,
                                               tie_word_embeddings=True)),
    # more experts per token than kept groups: otherwise group-limited selection equals plain top-k
    "v2-grouped-yarn-untied": ("v2", dict(q_lora_rank=None, topk_method="group_limited_greedy", n_group=2,
                                          topk_group=1, num_experts_per_tok=3, norm_topk_prob=False,
                                          routed_scaling_factor=2.0, rope_parameters=YARN_V2)),
    "v2-greedy-qlora-tied": ("v2", dict(q_lora_rank=16, topk_method="greedy", n_group=1, topk_group=1,
                                        num_experts_per_tok=2, norm_topk_prob=False, routed_scaling_factor=1.0,
                                        tie_word_embeddings=True)),
}


def hf_model(family: str, **kw):
    torch.manual_seed(0)
    if family == "v3":
        cfg = transformers.DeepseekV3Config(**BASE, **kw)
        model = transformers.DeepseekV3ForCausalLM(cfg)
    else:
        cfg = transformers.DeepseekV2Config(**BASE, **kw)
        model = transformers.DeepseekV2ForCausalLM(cfg)
    with torch.no_grad():  # transformers initialises the routing bias to zero: make it matter
        for m in model.modules():
            if getattr(m, "e_score_correction_bias", None) is not None:
                m.e_score_correction_bias.normal_(0, 0.2)
    return model.eval()


def greedy_hf(model, x, n):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.generate(x, max_new_tokens=n, do_sample=False, min_new_tokens=0)


@pytest.mark.parametrize("case", list(CASES))
def test_hub_checkpoint_loads_with_identical_logits_and_greedy_text(case, tmp_path):
    family, kw = CASES[case]
    ref = hf_model(family, **kw)
    ref.save_pretrained(tmp_path)
    ours = qiusuo.load_model(tmp_path)
    assert ours.cfg.model_type == f"deepseek_{family}" and not ours.training
    assert ours.cfg.tie_word_embeddings == bool(kw.get("tie_word_embeddings", False))
    assert (ours.cfg.yarn is not None) == ("rope_parameters" in kw)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, BASE["vocab_size"], (3, 24), generator=g)
    with torch.no_grad():
        diff = (ref(x).logits - ours(x)).abs().max().item()
    assert diff <= TOL, f"{case}: max |logits diff| {diff:.2e}"
    prompt = x[:2, :8]
    with torch.no_grad():
        expect = greedy_hf(ref, prompt, 32)
    got = ours.generate(prompt, 32)
    assert torch.equal(got, expect), f"{case}: greedy continuations differ"


@pytest.mark.parametrize("case", ["v3-qlora-groups-norm-untied", "v2-grouped-yarn-untied", "v3-noqlora-nonorm-yarn-tied"])
def test_save_hf_loads_in_transformers_with_identical_logits(case, tmp_path):
    family, kw = CASES[case]
    kw = dict(kw)
    rp = kw.pop("rope_parameters", None)
    cfg = qiusuo.ModelConfig(model_type=f"deepseek_{family}", **BASE, **kw, num_nextn_predict_layers=1,
                             rope_scaling=rp and {k: v for k, v in rp.items() if k != "rope_theta"})
    torch.manual_seed(0)
    ours = qiusuo.Transformer(cfg).eval()
    for r in moe_routers(ours):
        r.e_score_correction_bias.normal_(0, 0.2)
    qiusuo.save_hf(ours, tmp_path / "out")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(ref).__name__ == ("DeepseekV3ForCausalLM" if family == "v3" else "DeepseekV2ForCausalLM")
    x = torch.randint(0, BASE["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        diff = (ref(x).logits - ours(x)).abs().max().item()
    assert diff <= TOL, f"{case}: max |logits diff| {diff:.2e}"


@pytest.mark.parametrize("case", ["v3-noqlora-nonorm-yarn-tied", "v2-grouped-yarn-untied"])
def test_tolerance_is_not_vacuous(case, tmp_path):
    """Each routing/rotary feature the cases cover moves the logits far beyond TOL when we get it wrong on purpose."""
    family, kw = CASES[case]
    hf_model(family, **kw).save_pretrained(tmp_path)
    x = torch.randint(0, BASE["vocab_size"], (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        good = qiusuo.load_model(tmp_path)(x)
    cfg = qiusuo.load_model(tmp_path).cfg
    wrong = {"norm_topk_prob": not cfg.norm_topk_prob, "routed_scaling_factor": 1.0 + cfg.routed_scaling_factor,
             "topk_group": cfg.n_group, "rope_scaling": None}
    for field, value in wrong.items():
        model = qiusuo.Transformer(cfg.replace(**{field: value}))
        model.load_state_dict(qiusuo.load_model(tmp_path).state_dict())
        with torch.no_grad():
            assert (model.eval()(x) - good).abs().max() > 100 * TOL, field
    if cfg.topk_method == "noaux_tc":
        model = qiusuo.load_model(tmp_path)
        for r in moe_routers(model):
            r.e_score_correction_bias.zero_()
        with torch.no_grad():
            assert (model(x) - good).abs().max() > 100 * TOL, "e_score_correction_bias"


def test_latent_norms_take_rmsnorms_default_eps(tmp_path):
    """Issue 26: `q_a_layernorm` and `kv_a_layernorm` use RMSNorm's default eps, 1e-6, as transformers and DeepSeek's
    inference code build them, not the model's `rms_norm_eps` (1e-5 in Moonlight's, Kimi-K2.5's and GLM's configs).
    The latents are made small (their projections scaled down) so that the eps is not drowned by their variance."""
    family, kw = CASES["v3-qlora-groups-norm-untied"]
    ref = hf_model(family, **kw, rms_norm_eps=1e-5)
    with torch.no_grad():
        for layer in ref.model.layers:
            layer.self_attn.q_a_proj.weight.mul_(0.01)
            layer.self_attn.kv_a_proj_with_mqa.weight.mul_(0.01)
    ref.save_pretrained(tmp_path)
    ours = qiusuo.load_model(tmp_path)
    assert ours.cfg.rms_norm_eps == 1e-5
    x = torch.randint(0, BASE["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (ref(x).logits - ours(x)).abs().max().item()
    assert diff <= TOL, f"max |logits diff| {diff:.2e}"
