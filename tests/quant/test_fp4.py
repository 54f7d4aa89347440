"""FP4 (e2m1, two per byte, one scale per 32 inputs of a row) against slow twins and transformers' reader.

- Layout: bytes and scales written by hand dequantise to `e2m1(code) * scale[r, c // 32]` looked up element by element,
  with each code's value computed from its sign/exponent/mantissa bits (not from our table).
- Rounding: `encode_e2m1` equals a brute-force nearest-of-16 search with ties to the even code, saturating at 6.
- Scales: ue8m0 is the smallest power of two s0 with amax <= 6 * s0 (DeepGEMM's bit-level formula, reimplemented
  here), halved exactly when the group max would round to 3 at s0; float32 is amax / 6.
- Error bound of `qiusuo.quant.fp4`, element by element, x = |w| / s:
      |dequant(quant(w)) - w| <= h(x) * s,  h = 0.25 (x <= 2), 0.5 (x <= 4), 1 (x > 4)
- Round trip: quantise(dequantise(quantise(w))) == quantise(w) bit for bit; values survive for any codes.
- transformers' `Fp8Dequantize._dequantize_one` reads what we write to the same values.
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from qiusuo.quant.fp4 import (BAND, E2M1, GROUP, dequantize_fp4, dequantize_fp4_, encode_e2m1, pack_e2m1,
                           quantize_fp4, round_e2m1, unpack_e2m1)

FORMATS = ["ue8m0", "float"]


def e2m1_value(code: int) -> float:
    """The format's definition: bit 3 sign, bits 2-1 exponent (bias 1), bit 0 mantissa; exponent 0 is subnormal."""
    e, m = (code >> 1) & 3, code & 1
    mag = m * 0.5 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)
    return -mag if code & 8 else mag


VALUES = torch.tensor([e2m1_value(c) for c in range(16)])


def reference_dequant(packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Element (r, c): the nibble of byte c // 2 (low for even c), times the scale of group c // 32, by index."""
    R, C = packed.shape[0], 2 * packed.shape[1]
    rows, cols = torch.arange(R)[:, None], torch.arange(C)[None, :]
    byte = packed.view(torch.uint8)[rows, cols // 2].int()
    code = torch.where(cols % 2 == 0, byte & 15, byte >> 4)
    s = scale.view(torch.float8_e8m0fnu) if scale.dtype == torch.uint8 else scale
    return VALUES[code] * s.float()[rows, cols // GROUP]


def brute_codes(x: torch.Tensor) -> torch.Tensor:
    """Nearest of all 16 codes; ties to the even code (mantissa bit 0), then to the sign of x (so -0.1 -> -0)."""
    codes = torch.arange(16)
    d = (x[..., None] - VALUES).abs()
    pen = (codes & 1) * 2 + ((codes >> 3) != torch.signbit(x)[..., None].long()).long()
    return torch.where(d == d.min(-1, keepdim=True).values, pen, 99).argmin(-1).to(torch.uint8)


def pow2_ceil(x: torch.Tensor) -> torch.Tensor:
    """2^ceil(log2(x)) for x > 0, exactly (frexp, float64)."""
    m, e = torch.frexp(x.double())
    return torch.ldexp(torch.ones_like(m), torch.where(m == 0.5, e - 1, e)).float()


def expected_scale(amax: torch.Tensor, fmt: str) -> torch.Tensor:
    if fmt == "float":
        return torch.where(amax > 0, (amax / 6).clamp_min(2.0**-126), 1.0)
    s0 = pow2_ceil((amax.double() / 6).clamp_min(2.0**-126))
    half = round_e2m1(amax / s0) <= 3
    return torch.where(amax > 0, torch.where(half, s0 / 2, s0), 1.0)


def deepgemm_scale(amax: torch.Tensor) -> torch.Tensor:
    """DeepGEMM math.cuh `get_e2m1_sf_and_sf_inv`: fast_pow2(fast_log2_ceil(amax * (1.0f / 6.0f)))."""
    bits = (amax * torch.tensor(1 / 6, dtype=torch.float32)).view(torch.int32)
    e = (bits >> 23) - 127 + ((bits & 0x7FFFFF) != 0).int()
    return ((e + 127) << 23).view(torch.float32)


def weights(R: int, C: int, seed: int) -> torch.Tensor:
    """Magnitudes 1e-6..1e3 in one tensor, plus an all-zero row, a huge row, a tiny row, and rows of exact ties."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(R, C, generator=g) * 10 ** (torch.rand(R, C, generator=g) * 9 - 6)
    if R >= 8:
        w[1] = 0
        w[2] *= 1e30
        w[3] *= 1e-30
        ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0])  # every midpoint of the grid
        w[4] = (ties.repeat(C // 8) * torch.tensor([1.0, -1.0]).repeat_interleave(4).repeat(C // 8))[:C]
        w[4, ::GROUP] = 6.0  # group max 6: scale 1, the ties stay ties
        w[5] = w[4] * 2.0**-20
        w[6] = 3.2 * torch.rand(C, generator=g)  # group max in (3, 3.5) (most groups): the halved scale
        w[6, ::GROUP] = 3.2
        w[7, 3:] = 0  # one non-zero element
    return w


def h(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x <= 2, 0.25, torch.where(x <= 4, 0.5, 1.0))


def test_layout_against_hand_written_bytes():
    g = torch.Generator().manual_seed(0)
    packed = torch.randint(-128, 128, (37, 48), generator=g, dtype=torch.int8)  # every byte value, C = 96
    e8m0 = torch.randint(100, 150, (37, 3), generator=g, dtype=torch.uint8)
    for scale in (e8m0.view(torch.float8_e8m0fnu), e8m0, torch.rand(37, 3, generator=g) + 1e-3):
        assert torch.equal(dequantize_fp4(packed, scale), reference_dequant(packed, scale))
    codes = unpack_e2m1(packed)
    assert codes.dtype == torch.uint8 and codes.shape == (37, 96) and int(codes.max()) <= 15
    assert torch.equal(pack_e2m1(codes), packed)
    assert torch.equal(E2M1, VALUES)  # the module's table is the format's definition (-0 included)
    assert torch.equal(torch.signbit(E2M1), torch.signbit(VALUES))


def test_rounding_is_nearest_with_ties_to_even():
    grid = torch.arange(-8 * 64, 8 * 64 + 1) / 64  # multiples of 1/64 through [-8, 8]: every tie and midpoint
    x = torch.cat([grid, torch.randn(10_000) * 3, torch.tensor([-0.0, 0.0, -0.1, 1e-30, -7.0, 100.0])])
    got = encode_e2m1(x)
    assert torch.equal(got, brute_codes(x))
    assert torch.equal(encode_e2m1(torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])),
                       torch.tensor([0, 2, 2, 4, 4, 6, 6], dtype=torch.uint8))  # the even code of each tie


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 32), (7, 64), (33, 96), (130, 128), (9, 1024)])
def test_error_bound_elementwise(fmt, shape):
    R, C = shape
    w = weights(R, C, R * 31 + C)
    packed, scale = quantize_fp4(w, scale_fmt=fmt)
    assert packed.dtype == torch.int8 and packed.shape == (R, C // 2) and scale.shape == (R, C // GROUP)
    assert scale.dtype == (torch.float8_e8m0fnu if fmt == "ue8m0" else torch.float32)
    s = scale.float()
    amax = w.abs().view(R, C // GROUP, GROUP).amax(-1)
    assert torch.equal(s, expected_scale(amax, fmt))
    back = dequantize_fp4(packed, scale)
    s_el = s[torch.arange(R)[:, None], torch.arange(C)[None, :] // GROUP]  # each element's group scale, by index
    err, b = (back - w).abs(), h(w.abs() / s_el) * s_el
    worst = (err / b).max().item()
    assert worst <= 1 + 1e-6, f"worst err/bound {worst:.4f}"
    assert (err <= 0.25 * torch.maximum(w.abs(), s_el) * (1 + 1e-6)).all()  # the relative/absolute form
    assert torch.equal(back[w == 0], w[w == 0])
    if R >= 8:
        assert worst > 0.99  # tight: the ties sit on the bound
        if fmt == "ue8m0":  # amax 3.2: s0 = 1 would round it to 3; halved, 3.2 / 0.5 = 6.4 saturates to 6
            assert (s[6] == 0.5).all() and back[6].abs().max() == 3.0
        assert torch.equal(s[1], torch.ones(C // GROUP))  # all-zero row: scale 1


def test_ue8m0_scale_is_deepgemm_rule_halved_when_the_max_would_round_to_3():
    """Adversarial group maxima: 6 * 2^k and its float neighbours (where ceil(log2) flips), 3.5 * 2^k (the tie that
    decides halving) and 3 * 2^k, for every k whose scale is a normal float."""
    k = torch.arange(-120, 120, dtype=torch.float32)
    edges = torch.cat([6 * 2**k, 3.5 * 2**k, 3 * 2**k])
    amax = torch.cat([edges, torch.nextafter(edges, torch.tensor(0.0)), torch.nextafter(edges, torch.tensor(1e38)),
                      torch.rand(10_000) * 1e3])
    w = torch.zeros(len(amax), GROUP)
    w[:, 0] = amax
    w[:, 1] = -amax / 3  # a second element so that the code pattern is not trivial
    _, scale = quantize_fp4(w)
    s, dg = scale.float()[:, 0], deepgemm_scale(amax)
    half = round_e2m1(amax / dg) <= 3
    assert torch.equal(s, torch.where(half, dg / 2, dg))
    assert torch.equal(half, amax < 3.5 * dg)
    assert half.any() and (~half).any()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(1, 32), (33, 96), (300, 64)])
def test_round_trip_is_bit_exact(fmt, shape):
    w = weights(*shape, seed=shape[0])
    packed, scale = quantize_fp4(w, scale_fmt=fmt)
    dtypes = [torch.float32, torch.bfloat16] if fmt == "ue8m0" else [torch.float32]  # code * 2^e is exact in bf16
    for dtype in dtypes:
        again, scale2 = quantize_fp4(dequantize_fp4(packed, scale, dtype), scale_fmt=fmt)
        assert torch.equal(again, packed), dtype
        assert torch.equal(scale2.view(torch.uint8) if fmt == "ue8m0" else scale2,
                           scale.view(torch.uint8) if fmt == "ue8m0" else scale), dtype


def test_any_codes_keep_their_values_through_a_round_trip():
    """Codes and ue8m0 scales from elsewhere (any byte, max code 3 included): re-quantising the dequantised weight
    gives the same values; the encoding is ours exactly where the group's max code is 4 or 6."""
    g = torch.Generator().manual_seed(3)
    packed = torch.randint(-128, 128, (64, 64), generator=g, dtype=torch.int8)
    packed[:16] &= 0x33  # rows whose codes are at most 1.5 in magnitude (max code 3 or less)
    scale = torch.randint(90, 160, (64, 4), generator=g, dtype=torch.uint8).view(torch.float8_e8m0fnu)
    w = dequantize_fp4(packed, scale)
    again, scale2 = quantize_fp4(w)
    assert torch.equal(dequantize_fp4(again, scale2), w)
    codes, codes2 = unpack_e2m1(packed).view(64, 4, GROUP), unpack_e2m1(again).view(64, 4, GROUP)
    canonical = (codes & 7).amax(-1) >= 6  # max magnitude code 6 or 7, i.e. value 4 or 6
    assert canonical.any() and (~canonical).any()
    assert torch.equal(codes[canonical], codes2[canonical])
    assert torch.equal(scale.view(torch.uint8)[canonical], scale2.view(torch.uint8)[canonical])


def test_float32_scale_is_a_fixed_point_over_a_whole_binade():
    """fl(fl(6 * s) / 6) == s for s = fl(a / 6), every float a in [1, 2): the float32 round trip's premise (powers
    of two carry it to every other binade)."""
    a = torch.arange(0x3F800000, 0x40000000, dtype=torch.int32).view(torch.float32)
    s = a / 6
    assert torch.equal((s * 6) / 6, s)
    assert (round_e2m1(a / s) == 6).all()


def test_dequantize_into_a_preallocated_band_by_band_output():
    w = weights(2 * BAND + 44, 192, seed=5)
    packed, scale = quantize_fp4(w)
    out = torch.full((3, *w.shape), float("nan"), dtype=torch.bfloat16)  # e.g. one expert's slice of a stacked tensor
    view = out[1]
    assert dequantize_fp4_(view, packed, scale) is view
    assert torch.equal(out[1], dequantize_fp4(packed, scale).bfloat16())
    assert out[0].isnan().all() and out[2].isnan().all()


MEMORY_SCRIPT = r"""
import json, os, torch
from qiusuo.quant.fp4 import dequantize_fp4_, quantize_fp4
torch.set_num_threads(1)
R, C = 4096, 2048
packed, scale = quantize_fp4(torch.randn(R, C))
out = torch.zeros(R, C)  # touched, so its pages count before the measurement starts
dequantize_fp4_(out[:256], packed[:256], scale[:256])  # warm-up: allocator arenas
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
rss = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
dequantize_fp4_(out, packed, scale)
peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"scratch_mib": (peak - rss) / 2**20, "out_mib": out.numel() * 4 / 2**20}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads and resets the peak RSS in /proc/self")
def test_dequantize_scratch_is_one_band_not_a_second_copy():
    """Peak resident memory during a 4096 x 2048 dequantisation (32 MiB float32 output) grows by about one band's
    scratch, 128 * 2048 * 6 bytes = 1.5 MiB, not by another output-sized float32 tensor."""
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["scratch_mib"] < 0.25 * r["out_mib"], r


@pytest.mark.parametrize("call,match", [
    (lambda: quantize_fp4(torch.randn(4, 48)), r"multiple of the group size 32, got 48: pad it with zeros to 64"),
    (lambda: quantize_fp4(torch.randn(4, 33), group=1), r"even"),
    (lambda: quantize_fp4(torch.randn(2, 4, 64)), r"one \(rows, cols\) matrix"),
    (lambda: quantize_fp4(torch.randn(4, 64), scale_fmt="e4m3"), r"scale_fmt 'e4m3' is not one of"),
    (lambda: dequantize_fp4(torch.zeros(4, 32), torch.ones(4, 2)), r"stored as int8 .* got torch.float32"),
    (lambda: dequantize_fp4(torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 1)),
     r"scale has shape \(4, 1\); a packed \(4, 32\) weight holds \(4, 64\) values .* \(4, 2\)"),
    (lambda: dequantize_fp4(torch.zeros(4, 32, dtype=torch.int8), torch.ones(2, 4)), r"needs one scale per 32"),
    (lambda: dequantize_fp4(torch.zeros(4, 24, dtype=torch.int8), torch.ones(4, 2)), r"48 inputs .* not a multiple"),
    (lambda: dequantize_fp4(torch.zeros(2, 4, 32, dtype=torch.int8), torch.ones(2, 4, 2)), r"each expert's slice"),
    (lambda: dequantize_fp4(torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 2, dtype=torch.int8)),
     r"neither a float, float8_e8m0fnu nor uint8"),
    (lambda: dequantize_fp4_(torch.empty(4, 32), torch.zeros(4, 32, dtype=torch.int8), torch.ones(4, 2)),
     r"out has shape \(4, 32\), the FP4 weight unpacks to \(4, 64\)"),
    (lambda: pack_e2m1(torch.zeros(3, 5, dtype=torch.uint8)), r"odd size 5"),
])
def test_errors_say_what_is_wrong(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("fmt", FORMATS + ["uint8"])
def test_transformers_dequantises_our_fp4_identically(fmt):
    """transformers 5.24 reads FP4 experts with `Fp8Dequantize._dequantize_one` (int8 -> `_unpack_fp4`, block size
    from the scale grid: (1, 32) here). Same values as ours, for one matrix and for stacked experts (E, R, C/2)."""
    pytest.importorskip("transformers")
    try:
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize
        op = Fp8Dequantize(None)
        op._dequantize_one
    except (ImportError, AttributeError, TypeError) as e:
        pytest.skip(f"transformers' FP8/FP4 dequantiser has another API: {e}")
    experts = [quantize_fp4(weights(40, 256, seed=e), scale_fmt="float" if fmt == "float" else "ue8m0")
               for e in range(3)]
    if fmt == "uint8":
        experts = [(p, s.view(torch.uint8)) for p, s in experts]  # raw e8m0 bytes, as some checkpoints ship them
    for packed, scale in experts:
        assert torch.equal(op._dequantize_one(packed, scale, output_dtype=torch.float32), dequantize_fp4(packed, scale))
    stacked = op._dequantize_one(torch.stack([p for p, _ in experts]), torch.stack([s for _, s in experts]),
                                 output_dtype=torch.float32)
    assert torch.equal(stacked, torch.stack([dequantize_fp4(p, s) for p, s in experts]))
    assert not math.isnan(stacked.sum().item())
