"""FP8 blocks: the error bound of `qiusuo.hf.fp8` holds element by element, on shapes that are not multiples of 128,
across magnitudes (subnormal range included), and through a save_hf(fp8=True) -> load_model round trip.

Bound (scale s = block amax / 448; e4m3 has 3 mantissa bits and subnormals spaced 2^-9 below 2^-6):
    |dequant(quant(w)) - w| <= 2^-4 * |w| + 2^-10 * s   per element
"""

import json

import pytest
import torch

import qiusuo
from qiusuo.hf.fp8 import BLOCK, dequantize_blocks, quantize_blocks


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
        if name.endswith(("_proj.weight", "_proj_with_mqa.weight")) and ".mlp.gate." not in name:
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
