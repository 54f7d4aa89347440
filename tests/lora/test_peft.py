"""peft's format both ways on transformers' DeepseekV3: peft loads an adapter qiusuo wrote (attention projections,
fused routed experts as `target_parameters`, a router and norms as `modules_to_save`) onto transformers' model with
the logits qiusuo computes, and qiusuo reads what peft writes, in transformers 5's fused layout and in the
per-expert layout of transformers 4; adapters that do not fit are refused naming the tensor."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import qiusuo
from qiusuo.io import CheckpointError
from qiusuo.lora.apply import add_lora, extra_trainable, freeze_base, merge_lora
from qiusuo.lora.layers import lora_layers
from qiusuo.lora.peft import attach, load_adapter, read_adapter, save_adapter
from test_layers import randomise  # tests/lora/test_layers.py

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

TOL = 1e-4
BASE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
            first_k_dense_replace=1, num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
            v_head_dim=8, n_routed_experts=8, n_shared_experts=1, max_position_embeddings=256, q_lora_rank=16,
            n_group=4, topk_group=2, num_experts_per_tok=2, norm_topk_prob=True, routed_scaling_factor=2.5,
            initializer_range=0.15, bos_token_id=0, eos_token_id=1)
ATTENTION = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**BASE)).eval()
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "e_score_correction_bias", None) is not None:
                m.e_score_correction_bias.normal_(0, 0.2)
    out = tmp_path_factory.mktemp("base")
    model.save_pretrained(out)
    return out


def hf(base_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()


def tokens(n=24):
    return torch.randint(0, BASE["vocab_size"], (3, n), generator=torch.Generator().manual_seed(1))




def test_peft_loads_our_adapter_with_our_logits(base_dir, tmp_path):
    ours = qiusuo.load_model(base_dir)
    add_lora(ours, rank=4, alpha=8, targets="attention,experts")
    randomise(ours, seed=2, std=0.1)
    freeze_base(ours, router=True, norms=True)
    extras = extra_trainable(ours, router=True, norms=True)
    with torch.no_grad():
        for p in extras.values():
            p.add_(0.05 * torch.randn_like(p))
    save_adapter(ours, tmp_path / "ad", base=str(base_dir), extras=extras)
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["target_parameters"] == sorted(EXPERTS) and set(cfg["target_modules"]) == set(ATTENTION)
    assert cfg["r"] == 4 and cfg["rank_pattern"] == {r".*\.mlp\.experts\.gate_up_proj": 8}
    names = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert "base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight" in names  # gate_up, wrapped first
    assert names["base_model.model.model.layers.1.mlp.experts.lora_B.weight"].shape == (32, 4 * 8)  # down: (D, r*E)
    pm = peft.PeftModel.from_pretrained(hf(base_dir), tmp_path / "ad").eval()
    x = tokens()
    with torch.no_grad():
        diff = (pm(x).logits - ours(x)).abs().max().item()
        moved = (hf(base_dir)(x).logits - ours(x)).abs().max().item()
    assert diff <= TOL and moved > 0.05, (diff, moved)


@pytest.mark.parametrize("layout", ["v5", "v4-names"])
def test_we_load_what_peft_writes(base_dir, tmp_path, layout):
    """v5: experts as `target_parameters`; v4-names: gate_proj/up_proj/down_proj in `target_modules`, which peft
    itself converts for transformers 5 (experts' gate_up at rank 2r, alpha 2 alpha: `rank_pattern`)."""
    ref = hf(base_dir)
    kw = dict(target_modules=ATTENTION, target_parameters=EXPERTS) if layout == "v5" else \
        dict(target_modules=ATTENTION + ["gate_proj", "up_proj", "down_proj"])
    pm = peft.get_peft_model(ref, peft.LoraConfig(r=4, lora_alpha=8, **kw))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.1)
    pm.save_pretrained(tmp_path / "ad")
    ours = qiusuo.load_model(base_dir)
    assert attach(ours, {"mine": tmp_path / "ad"}) == ["mine"]
    r_gate_up = 4 if layout == "v5" else 8  # peft's conversion: 2r on the fused gate_up
    assert ours.layers[1].mlp.experts.gate_up_A.shape == (1, 8, r_gate_up, 32)
    x = tokens()
    with torch.no_grad():
        diff = (pm.eval()(x).logits - ours(x)).abs().max().item()
    assert diff <= TOL, diff


def test_per_expert_adapters_of_transformers_4_are_fused(base_dir, tmp_path):
    """experts.{e}.gate_proj / up_proj / down_proj (each rank r, its own scale) -> gate_up of rank 2r with B
    block-diagonal: the model equals one whose expert weights are W + s B A per projection, by hand."""
    ours = qiusuo.load_model(base_dir)
    ref = qiusuo.load_model(base_dir)
    g = torch.Generator().manual_seed(3)
    tensors, E, D, I, r = {}, 8, 32, 16, 2
    for layer in (1, 2):
        experts = ref.layers[layer].mlp.experts
        for e in range(0, E, 2):  # every other expert: the rest get zeros
            for proj, (K, N) in (("gate_proj", (D, I)), ("up_proj", (D, I)), ("down_proj", (I, D))):
                A, B = torch.randn(r, K, generator=g) * 0.2, torch.randn(N, r, generator=g) * 0.2
                key = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{proj}"
                tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = A, B
                scale = 3.0 if proj == "up_proj" else 2.0  # alpha_pattern: up's alpha 6 at r 2
                with torch.no_grad():
                    if proj == "down_proj":
                        experts.down_proj[e] += scale * B @ A
                    else:
                        rows = slice(0, I) if proj == "gate_proj" else slice(I, 2 * I)
                        experts.gate_up_proj[e, rows] += scale * B @ A
    (tmp_path / "ad").mkdir()
    save_file(tensors, tmp_path / "ad" / "adapter_model.safetensors")
    (tmp_path / "ad" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": 4, "alpha_pattern": {"up_proj": 6},
         "target_modules": ["gate_proj", "up_proj", "down_proj"]}))
    attach(ours, {"v4": tmp_path / "ad"})
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merge_lora(ours)(x), ref(x), rtol=1e-5, atol=1e-5)


def test_resume_reads_back_exactly(base_dir, tmp_path):
    a = qiusuo.load_model(base_dir)
    add_lora(a, rank=3, alpha=7, targets="attention,experts")
    randomise(a, seed=2, std=0.1)
    save_adapter(a, tmp_path / "ad")
    b = qiusuo.load_model(base_dir)
    add_lora(b, rank=3, alpha=7, targets="attention,experts")
    load_adapter(b, tmp_path / "ad")
    for la, lb in zip(lora_layers(a), lora_layers(b)):
        for (_, A1, B1, s1), (_, A2, B2, s2) in zip(la.pairs(), lb.pairs()):
            assert torch.equal(A1, A2) and torch.equal(B1, B2) and torch.equal(s1, s2)
    c = qiusuo.load_model(base_dir)
    add_lora(c, rank=3, alpha=7, targets="attention")
    with pytest.raises(CheckpointError, match="other layers"):
        load_adapter(c, tmp_path / "ad")


def edit(folder, cfg_change=None, rename=None, reshape=None):
    cfg, tensors = read_adapter(folder)
    cfg.update(cfg_change or {})
    if rename:
        tensors = {k.replace(*rename): v for k, v in tensors.items()}
    if reshape:
        key = next(k for k in tensors if reshape in k)
        tensors[key] = tensors[key][:-1]
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, message", [
    (dict(rename=("self_attn.q_a_proj", "self_attn.q_x_proj")),
     r"tensor 'base_model\.model\.model\.layers\.0\.self_attn\.q_x_proj\.lora_A\.weight' matches no layer"),
    (dict(reshape="layers.0.self_attn.o_proj.lora_B"), r"layers\.0\.self_attn\.o_proj: lora_A \(4, 32\) and lora_B "
                                                       r"\(31, 4\) do not fit this model's"),
    (dict(cfg_change={"r": 8, "rank_pattern": {}}), r"rank 4 in the tensors, 8 in adapter_config\.json"),
    (dict(cfg_change={"use_dora": True}), r"use_dora=True is not supported"),
])
def test_bad_adapters_are_refused_naming_the_tensor(base_dir, tmp_path, change, message):
    ours = qiusuo.load_model(base_dir)
    add_lora(ours, rank=4, alpha=8, targets="attention,experts")
    save_adapter(ours, tmp_path / "ad")
    edit(tmp_path / "ad", **change)
    with pytest.raises((ValueError, CheckpointError), match=message):
        attach(qiusuo.load_model(base_dir), {"x": tmp_path / "ad"})


def test_an_adapter_for_another_base_is_refused(base_dir, tmp_path):
    other = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{**BASE, "n_routed_experts": 4,
                                                                                "n_group": 2, "topk_group": 1}))
    other.save_pretrained(tmp_path / "other")
    theirs = qiusuo.load_model(tmp_path / "other")
    add_lora(theirs, rank=4, alpha=8, targets="experts")
    save_adapter(theirs, tmp_path / "ad")
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts.*do not fit 8 experts' .*another base"):
        attach(qiusuo.load_model(base_dir), {"x": tmp_path / "ad"})
