"""FP8 checkpoints against references we did not write.

- Format semantics, independent of our quantiser: an FP8 checkpoint written by hand (random e4m3 values, random
  per-block scales, shapes that are not multiples of 128) loads to exactly `w[i, j] = q[i, j] * s[i // 128, j // 128]`
  computed element by element: partial edge blocks use the scale of the block they start in, as in DeepSeek-V3's
  `weight_dequant` kernel.
- Interop: what `save_hf(fp8=True)` writes is dequantised identically by transformers' own FP8 loader (CPU path,
  needs `accelerate`), and the two models give the same logits. Shapes here are multiples of 128 on purpose:
  transformers 5.24's `Fp8Dequantize` derives the block size as rows // scale_rows, which is not the 128x128 grid
  with partial edge blocks that DeepSeek's checkpoints use (it would raise on V3's 576-row kv_a_proj_with_mqa).
"""

import pytest
import torch
from safetensors.torch import load_file, save_file

import qiusuo
from qiusuo.model.moe import moe_routers


BLOCK = 128


def random_fp8(shape, gen):
    """Random finite e4m3 values, subnormals and zeros included (NaN bytes 0x7f/0xff excluded)."""
    raw = torch.randint(0, 256, shape, generator=gen, dtype=torch.int32)
    raw = torch.where((raw & 0x7F) == 0x7F, raw - 1, raw).to(torch.uint8)
    return raw.view(torch.float8_e4m3fn)


def test_hand_written_fp8_checkpoint_dequantises_elementwise(tmp_path):
    cfg = qiusuo.get_config("tiny", hidden_size=160, intermediate_size=300, moe_intermediate_size=136,
                            vocab_size=200, q_lora_rank=None)
    torch.manual_seed(0)
    qiusuo.save_hf(qiusuo.Transformer(cfg), tmp_path / "m", progress=False)
    f = tmp_path / "m" / "model.safetensors"
    tensors = load_file(str(f))
    gen = torch.Generator().manual_seed(1)
    expect = {}
    names = ["model.layers.0.mlp.gate_proj.weight",  # (300, 160): 3 x 2 blocks, both edges partial
             "model.layers.0.mlp.down_proj.weight",  # (160, 300)
             "model.layers.1.mlp.experts.5.up_proj.weight",  # (136, 160)
             "model.layers.1.self_attn.o_proj.weight"]  # (160, 64)
    for name in names:
        R, C = tensors[name].shape
        q = random_fp8((R, C), gen)
        s = torch.rand(-(-R // BLOCK), -(-C // BLOCK), generator=gen) * 1e-2 + 1e-3
        rows, cols = torch.arange(R)[:, None], torch.arange(C)[None, :]
        ref = q.float() * s[rows // BLOCK, cols // BLOCK]  # each element's own block scale, looked up one by one
        tensors[name], tensors[name + "_scale_inv"] = q, s
        expect[name] = ref
    save_file(tensors, str(f), metadata={"format": "pt"})
    model = qiusuo.load_model(tmp_path / "m", dtype=torch.float32, progress=False)
    hub = qiusuo.hf.to_hf_state_dict(model)
    for name, ref in expect.items():
        assert torch.equal(hub[name], ref), name


def test_fp8_export_dequantised_identically_by_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers' FP8 loader needs it
    cfg = qiusuo.get_config("tiny", vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=128,
                            num_attention_heads=2, q_lora_rank=128, kv_lora_rank=128, qk_nope_head_dim=64,
                            qk_rope_head_dim=128, v_head_dim=64, n_routed_experts=4, num_experts_per_tok=2,
                            n_group=2, topk_group=1, routed_scaling_factor=2.0, initializer_range=0.05)
    torch.manual_seed(0)
    model = qiusuo.Transformer(cfg).eval()
    for r in moe_routers(model):
        r.e_score_correction_bias.normal_(0, 0.2)
    qiusuo.save_hf(model, tmp_path / "m", fp8=True, progress=False)
    ours = qiusuo.load_model(tmp_path / "m", dtype=torch.float32, progress=False)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32).eval()
    theirs = ref.state_dict()
    quantised = 0
    for name, t in qiusuo.hf.to_hf_state_dict(ours).items():
        if name in theirs:
            assert torch.equal(theirs[name], t), name
            quantised += name.endswith("_proj.weight") and not torch.equal(t, qiusuo.hf.to_hf_state_dict(model)[name])
    assert quantised > 10  # the comparison covered dequantised matrices, not just pass-through tensors
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (ref(x).logits - ours(x)).abs().max().item()
    assert diff <= 1e-4, f"max |logits diff| {diff:.2e}"


def test_fp8_export_quantises_what_deepseek_v3_ships_in_fp8(tmp_path):
    """DeepSeek-V3's checkpoint stores every projection of attention, MLPs and experts in FP8, including
    kv_a_proj_with_mqa (576 x 7168 with a 5 x 56 scale grid: its last row block is partial), and keeps the embedding,
    output head, routers, norms and routing bias in bf16/fp32. Engines (SGLang's fused q_a/kv_a) expect both scales."""
    from safetensors import safe_open

    torch.manual_seed(0)
    qiusuo.save_hf(qiusuo.Transformer(qiusuo.get_config("tiny")), tmp_path / "m", fp8=True, progress=False)
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        fp8 = {k for k in keys if f.get_slice(k).get_dtype() == "F8_E4M3"}
    for k in keys - fp8:
        assert k.endswith("_scale_inv") or not k.endswith(("_proj.weight", "_proj_with_mqa.weight")) \
            or k.endswith("eh_proj.weight"), f"{k} should be FP8"
    for k in fp8:
        assert k + "_scale_inv" in keys
        assert ".mlp.gate." not in k and "embed_tokens" not in k and "head" not in k and "norm" not in k
    assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in fp8
    assert "model.layers.1.mlp.experts.0.gate_proj.weight" in fp8
