"""FP8 blocks: the error bound of `qiusuo.quant.fp8` holds element by element, on shapes that are not multiples of 128,
across magnitudes (subnormal range included), and through a save_hf(fp8=True) -> load_model round trip.

Bound (scale s = block amax / 448; e4m3 has 3 mantissa bits and subnormals spaced 2^-9 below 2^-6):
    |dequant(quant(w)) - w| <= 2^-4 * |w| + 2^-10 * s   per element

The same bound with ue8m0 scales (DeepSeek-V4: a power of two s in [amax / 464, amax / 232)), the bit-exact round
trip quantise(dequantise(q, s)) == (q, s) in both formats, uint8 e8m0 bytes, and transformers' own ue8m0 quantiser
and dequantiser against ours.
"""

import json
from types import SimpleNamespace

import pytest
import torch

import qiusuo
from qiusuo.quant.fp8 import BLOCK, E4M3_MAX, dequantize_blocks, quantize_blocks


def block_scale(s: torch.Tensor, R: int, C: int) -> torch.Tensor:
    """Each element's block scale, by index arithmetic (not the repeat the implementation uses)."""
    return s[torch.arange(R)[:, None] // BLOCK, torch.arange(C)[None, :] // BLOCK]


def bound(w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    return 2.0**-4 * w.abs() + 2.0**-10 * block_scale(s, *w.shape)


@pytest.mark.parametrize("shape", [(1, 1), (127, 129), (128, 128), (300, 260), (5, 1000), (576, 200)])
def test_error_bound_elementwise(shape):
    g = torch.Generator().manual_seed(shape[0] * 7 + shape[1])
    R, C = shape
    # magnitudes from 1e-6 to 1e3 inside one tensor: small values fall in e4m3's subnormal range of their block
    w = torch.randn(R, C, generator=g) * 10 ** (torch.rand(R, C, generator=g) * 9 - 6)
    if R > BLOCK or C > BLOCK:
        w[:BLOCK, :BLOCK] = 0  # an all-zero block (scale 1) beside non-zero ones
    q, s = quantize_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32
    assert s.shape == (-(-R // BLOCK), -(-C // BLOCK))
    assert not torch.isnan(q.float()).any()
    padded = torch.zeros(s.shape[0] * BLOCK, s.shape[1] * BLOCK)
    padded[:R, :C] = w.abs()
    amax = padded.view(s.shape[0], BLOCK, s.shape[1], BLOCK).amax(dim=(1, 3))
    assert torch.equal(s[amax > 0], amax[amax > 0] / 448)  # scale = blockmax / 448
    back = dequantize_blocks(q, s)
    err = (back - w).abs()
    b = bound(w, s)
    worst = (err / b.clamp_min(1e-30)).max().item()
    assert worst <= 1 + 1e-6, f"worst err/bound {worst:.3f}"
    assert torch.equal(back[w == 0], w[w == 0])
    if R * C > 1000:
        assert worst > 0.5  # the bound is tight, not loose by orders of magnitude


def test_fp8_round_trip_through_files(tmp_path):
    """Shapes that are not multiples of 128 (hidden 160, widths 300 and 136): every FP8 weight comes back within the
    bound, everything else bitwise."""
    cfg = qiusuo.get_config("tiny", hidden_size=160, intermediate_size=300, moe_intermediate_size=136, vocab_size=200)
    torch.manual_seed(0)
    model = qiusuo.Transformer(cfg)
    qiusuo.save_hf(model, tmp_path / "m", fp8=True, progress=False)
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert conf["quantization_config"]["weight_block_size"] == [BLOCK, BLOCK]
    loaded = qiusuo.load_model(tmp_path / "m", dtype=torch.float32, progress=False)
    before, after = qiusuo.hf.to_hf_state_dict(model), qiusuo.hf.to_hf_state_dict(loaded)
    n_fp8 = 0
    for name, w in before.items():
        got = after[name]
        fp8 = name.endswith(("_proj.weight", "_proj_with_mqa.weight")) and ".mlp.gate." not in name
        if fp8 and not name.endswith("eh_proj.weight"):  # MTP's eh_proj stays bf16, as in DeepSeek-V3's checkpoint
            n_fp8 += 1
            _, s = quantize_blocks(w)
            assert not torch.equal(got, w), name
            assert ((got - w).abs() <= bound(w, s) * (1 + 1e-6)).all(), name
        else:
            assert torch.equal(got, w), name
    assert n_fp8 > 40
    bf16 = qiusuo.load_model(tmp_path / "m", progress=False)  # FP8 checkpoints default to the config's dtype
    assert bf16.layers[0].mlp.gate_proj.weight.dtype == torch.float32
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        assert torch.isfinite(loaded(x)).all()


def weights(R: int, C: int, seed: int) -> torch.Tensor:
    """As in test_error_bound_elementwise: magnitudes 1e-6..1e3, an all-zero block beside non-zero ones."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(R, C, generator=g) * 10 ** (torch.rand(R, C, generator=g) * 9 - 6)
    if R > BLOCK or C > BLOCK:
        w[:BLOCK, :BLOCK] = 0
    return w


def ue8m0_rule(amax: torch.Tensor) -> torch.Tensor:
    """The smallest power of two s0 with amax <= 448 * s0 (frexp, float64: exact), halved when amax / s0 would round
    to an e4m3 code <= 224; all-zero blocks 1."""
    m, e = torch.frexp((amax.double() / 448).clamp_min(2.0**-126))
    s0 = torch.ldexp(torch.ones_like(m), torch.where(m == 0.5, e - 1, e)).float()
    half = (amax / s0).clamp(max=448).to(torch.float8_e4m3fn).float() <= 224
    return torch.where(amax > 0, torch.where(half, s0 / 2, s0), 1.0)


@pytest.mark.parametrize("shape", [(1, 1), (127, 129), (128, 128), (300, 260), (5, 1000), (576, 200)])
def test_ue8m0_error_bound_elementwise(shape):
    R, C = shape
    w = weights(R, C, shape[0] * 7 + shape[1])
    q, s = quantize_blocks(w, scale_fmt="ue8m0")
    assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float8_e8m0fnu
    assert s.shape == (-(-R // BLOCK), -(-C // BLOCK))
    sf = s.float()
    padded = torch.zeros(s.shape[0] * BLOCK, s.shape[1] * BLOCK)
    padded[:R, :C] = w.abs()
    amax = padded.view(s.shape[0], BLOCK, s.shape[1], BLOCK).amax(dim=(1, 3))
    assert torch.equal(sf, ue8m0_rule(amax))
    nz = amax > 0
    assert (sf[nz] >= amax[nz] / 464).all() and (sf[nz] < amax[nz] / 232).all()
    back = dequantize_blocks(q, s)
    worst = ((back - w).abs() / bound(w, sf).clamp_min(1e-30)).max().item()
    assert worst <= 1 + 1e-6, f"worst err/bound {worst:.3f}"
    assert torch.equal(back[w == 0], w[w == 0])
    if R * C > 1000:
        assert worst > 0.5


def test_ue8m0_halves_the_scale_only_where_the_block_max_would_round_to_224():
    """Block maxima in (224, 232] * s0 (s0 = 2^-1 here: 112 < amax <= 116) would come out as 224 * s0, which a
    re-quantisation reads as 448 * (s0 / 2); they get s0 / 2 from the start. 116.5 rounds to 240 * s0: kept."""
    w = torch.randn(128, 4 * 128, generator=torch.Generator().manual_seed(0))
    for b, top in enumerate([112.5, 116.0, 116.5, 200.0]):
        w[0, b * 128] = top
    q, s = quantize_blocks(w, scale_fmt="ue8m0")
    assert s.float().tolist() == [[0.25, 0.25, 0.5, 0.5]]
    assert q[0, ::128].float().tolist() == [448.0, 448.0, 240.0, 384.0]  # 400 ties to 384


@pytest.mark.parametrize("fmt", ["float", "ue8m0"])
@pytest.mark.parametrize("shape", [(1, 1), (300, 260), (576, 200)])
def test_round_trip_is_bit_exact(fmt, shape):
    q, s = quantize_blocks(weights(*shape, seed=shape[1]), scale_fmt=fmt)
    dtypes = [torch.float32, torch.bfloat16] if fmt == "ue8m0" else [torch.float32]  # q * 2^e is exact in bf16
    for dtype in dtypes:
        q2, s2 = quantize_blocks(dequantize_blocks(q, s, dtype), scale_fmt=fmt)
        assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8)), dtype
        assert torch.equal(s2.view(torch.uint8) if fmt == "ue8m0" else s2,
                           s.view(torch.uint8) if fmt == "ue8m0" else s), dtype


def test_float32_scale_is_a_fixed_point_over_a_whole_binade():
    """fl(fl(448 * s) / 448) == s for s = fl(a / 448), every float a in [1, 2): the float32 round trip's premise."""
    a = torch.arange(0x3F800000, 0x40000000, dtype=torch.int32).view(torch.float32)
    s = a / E4M3_MAX
    assert torch.equal((s * E4M3_MAX) / E4M3_MAX, s)
    assert torch.equal((a / s).clamp(max=E4M3_MAX).to(torch.float8_e4m3fn).float(), torch.full_like(a, E4M3_MAX))


def test_uint8_scales_are_e8m0_bytes():
    """Some checkpoints ship ue8m0 scales as uint8: byte b means 2^(b - 127), not the number b."""
    q, s = quantize_blocks(weights(300, 260, seed=1), scale_fmt="ue8m0")
    assert torch.equal(dequantize_blocks(q, s.view(torch.uint8)), dequantize_blocks(q, s))
    one = torch.ones(1, 1, dtype=torch.float8_e4m3fn)
    assert dequantize_blocks(one, torch.tensor([[130]], dtype=torch.uint8)).item() == 8.0


def test_bad_scale_format_and_dtype_are_named():
    with pytest.raises(ValueError, match="scale_fmt 'e8m0' is not one of"):
        quantize_blocks(torch.ones(4, 4), scale_fmt="e8m0")
    with pytest.raises(ValueError, match="neither a float, float8_e8m0fnu nor uint8"):
        dequantize_blocks(torch.ones(4, 4, dtype=torch.float8_e4m3fn), torch.ones(1, 1, dtype=torch.int32))


def test_ue8m0_against_transformers_quantiser_and_dequantiser():
    """transformers' `Fp8Quantize._quantize_one` (scale_fmt "ue8m0": 2^ceil(log2(amax / 448)), no halving) gives our
    scales, or twice them exactly on the blocks we halve, and our codes wherever the scales agree; its
    `Fp8Dequantize._dequantize_one` reads our (q, s) to our values. Shapes are multiples of 128: its dequantiser
    derives the block size as rows // scale_rows (test_fp8_interop.py)."""
    pytest.importorskip("transformers")
    try:
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize
        config = SimpleNamespace(weight_block_size=[BLOCK, BLOCK], scale_fmt="ue8m0")
        quant = Fp8Quantize(SimpleNamespace(quantization_config=config))._quantize_one
        quant("m.weight", torch.ones(BLOCK, BLOCK))["m.weight_scale_inv"]
        dequant = Fp8Dequantize(None)._dequantize_one
    except (ImportError, AttributeError, TypeError, KeyError) as e:
        pytest.skip(f"transformers' FP8 conversion ops have another API: {e}")
    w = weights(384, 256, seed=2)
    w[128:256, 128:256] = torch.randn(128, 128, generator=torch.Generator().manual_seed(3))
    w[200, 130] = 115.0  # this block's max rounds to 224 at s0 = 0.5: halved by us, not by transformers
    theirs = quant("m.weight", w)
    q_t, s_t = theirs["m.weight"], theirs["m.weight_scale_inv"]
    q, s = quantize_blocks(w, scale_fmt="ue8m0")
    assert s_t.dtype == s.dtype == torch.float8_e8m0fnu
    same = s.float() == s_t.float()
    assert torch.equal(~same, s.float() * 2 == s_t.float()) and (~same).sum() == 1
    agree = same.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)  # (384, 256): elements of agreeing blocks
    assert torch.equal(q.view(torch.uint8)[agree], q_t.view(torch.uint8)[agree])
    assert torch.equal(dequantize_blocks(q_t, s_t), dequant(q_t, s_t, output_dtype=torch.float32))
    assert torch.equal(dequantize_blocks(q, s), dequant(q, s, output_dtype=torch.float32))
