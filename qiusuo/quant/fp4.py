"""FP4 experts as DeepSeek-V4 checkpoints ship them (`quantization_config.expert_dtype: "fp4"`): e2m1 values, two
per byte, with one scale per 32 inputs of each row.

Layout, for a (R, C) weight (out features, in features); checked against transformers 5.24
`integrations/finegrained_fp8.py`, which reads these checkpoints, and DeepSeek's DeepGEMM (github.com/deepseek-ai/
DeepGEMM, `deep_gemm/include/deep_gemm/common/math.cuh`), which writes e2m1 in its kernels:
- packed: int8 (R, C/2). Byte j of a row holds column 2j in its low nibble and column 2j+1 in its high nibble
  (`Fp8Dequantize._unpack_fp4`: `stack([lut[u8 & 0xF], lut[u8 >> 4]], -1).reshape(..., 2 * cols)`; DeepGEMM's
  `cvt_pack_f32_to_e2m1x2(a, b)`: "lower nibble = a, upper = b"). `FP8Experts(expert_dtype="fp4")` allocates it with
  `_alloc_expert_proj(weight_dtype=int8, weight_k_div=2, ...)`: (E, out, in // 2) for stacked experts.
- codes: e2m1, bit 3 the sign, bits 2-1 the exponent, bit 0 the mantissa: 0..7 = 0, 0.5, 1, 1.5, 2, 3, 4, 6 and
  8..15 the same negated (8 is -0), transformers' `_FP4_E2M1_LUT`.
- scale: (R, C/32), float8_e8m0fnu for `scale_fmt: "ue8m0"` (what V4 ships) or float32 (`_alloc_expert_proj(...,
  sf_gran_n=1, sf_gran_k=32)`: one scale per row and per 32 inputs); `w[r, c] = e2m1(code[r, c]) * scale[r, c // 32]`.
  C must be a multiple of 32 (DeepSeek's shapes are); other widths raise rather than invent a partial group.

Quantisation (`quantize_fp4`). Rounding is to the nearest e2m1 value, ties to the even code (mantissa bit 0: a tie
between 1 and 1.5 goes to 1, between 4 and 6 to 4), saturating at 6: the rule of PTX `cvt.rn.satfinite.e2m1x2.f32`,
the conversion DeepGEMM's kernels use (transformers 5.24 has no FP4 quantiser; DeepSeek's own offline quantiser is not
public). Scale per group, amax its largest |w|:
- ue8m0: the smallest power of two s0 with amax <= 6 * s0 (DeepGEMM's `get_e2m1_sf_and_sf_inv`:
  2^ceil(log2(amax / 6))), halved when the group max would round to 3 at s0, i.e. amax < 3.5 * s0. Without the halving
  quantisation has no fixed point: a group whose max code is 3 dequantises to max 3 * s0 = 6 * (s0 / 2) and re-quantises
  at s0 / 2 with every code changed. At s0 / 2 no element is worse off: up to 3 * s0 the grid at s0 / 2 contains the
  grid at s0, and elements in (3, 3.5) * s0 land on 3 * s0 at either scale (at s0 / 2 by saturating (6, 7) to 6).
  So s lies in (amax / 7, amax / 3.5], and scaled values |w| / s < 7 saturate to 6.
- float32: amax / 6 (floored at 2^-126, the smallest normal float, so that re-quantising tiny groups is exact).
- all-zero groups: scale 1. ue8m0 scales are floored at 2^-126 too, then halving may reach e8m0's smallest, 2^-127.

Error bound, element by element, x = |w| / s the scaled magnitude. The gaps between consecutive e2m1 magnitudes are
0.5 on [0, 2] (0.5 is e2m1's one subnormal), 1 on [2, 4] and 2 on [4, 6]; rounding to nearest errs by at most half
the gap, and saturation of (6, 7) (halved ue8m0 scales only) by less than 1:

    |w - dequant(quant(w))| <= h(x) * s,   h = 0.25 for x <= 2,  0.5 for 2 < x <= 4,  1 for x > 4

which is <= 0.25 * max(|w|, s): 1 mantissa bit gives a relative error of at most 2^-2 above s, an absolute one of
at most s / 4 below it. Per group: |error| <= s <= amax / 3.5 with ue8m0 (1.7x the float32 figure), <= amax / 6 with
float32 scales.

Round trip: re-quantising the dequantised values gives back the packed codes and the scales bit for bit, for both
scale formats (`qiusuo convert` relies on it). With ue8m0, code * s is exact in float32 and in bf16 (which has
float32's exponent range). With float32 scales the dequantised values are float32 products, and the round trip holds
through float32: the group max comes back as fl(6 * s), and fl(fl(6 * s) / 6) = s for every s = fl(amax / 6), a
fact tests/quant/test_fp4.py checks exhaustively over one binade (all 2^23 mantissas; powers of two scale it to every
other). Groups written by other quantisers with max code 3 (not our canonical form) come back with the same values
under another encoding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from qiusuo.quant.fp8 import SCALE_FORMATS, decode_scale, ue8m0_scale

GROUP = 32  # inputs per scale
BAND = 128  # rows dequantised at a time
E2M1_MAX = 6.0
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
_BYTE_VALUES = torch.stack((E2M1[torch.arange(256) & 15], E2M1[torch.arange(256) >> 4]), -1)  # (256, 2) low, high
PACKED_DTYPES = (torch.int8, torch.uint8, torch.float4_e2m1fn_x2)


def round_e2m1(a: torch.Tensor) -> torch.Tensor:
    """a >= 0 (float32) -> the nearest e2m1 magnitude, ties to the even code, saturating at 6."""
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0))  # the grid's spacing around a
    return (torch.round(a / step) * step).clamp_(max=E2M1_MAX)  # torch.round breaks ties to even multiples


def encode_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Scaled values (float32) -> e2m1 codes (uint8, same shape); -0 and negatives that round to 0 get code 8."""
    code = torch.searchsorted(E2M1[:8].to(x.device), round_e2m1(x.abs()))  # exact magnitude -> its code 0..7
    return (code | torch.signbit(x).long() << 3).to(torch.uint8)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """codes (..., C) uint8 -> (..., C/2) int8: column 2j in the low nibble of byte j, 2j+1 in the high one."""
    if codes.shape[-1] % 2:
        raise ValueError(f"FP4 packs two values per byte along the last dim, which has odd size {codes.shape[-1]}: "
                         "pad it to an even size")
    return (codes[..., 0::2] | codes[..., 1::2] << 4).view(torch.int8)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """packed (..., C/2) int8/uint8 -> codes (..., C) uint8, the inverse of `pack_e2m1`."""
    u = _as_bytes(packed)
    return torch.stack((u & 15, u >> 4), -1).flatten(-2)


def quantize_fp4(w: torch.Tensor, group: int = GROUP, scale_fmt: str = "ue8m0") -> tuple[torch.Tensor, torch.Tensor]:
    """w (R, C) any float dtype -> (packed (R, C/2) int8, scale (R, C/group) float8_e8m0fnu or float32)."""
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt {scale_fmt!r} is not one of {SCALE_FORMATS} (quantization_config.scale_fmt)")
    if w.dim() != 2:
        raise ValueError(f"quantize_fp4 takes one (rows, cols) matrix, got shape {tuple(w.shape)}: quantise stacked "
                         "experts one by one")
    R, C = w.shape
    if C % 2 or C % group:
        raise ValueError(f"FP4 needs the input (last) dim to be even and a multiple of the group size {group}, got "
                         f"{C}: pad it with zeros to {-(-C // math.lcm(2, group)) * math.lcm(2, group)} or keep this "
                         "tensor in bf16/FP8")
    wg = w.float().reshape(R, C // group, group)
    amax = wg.abs().amax(-1)  # (R, G)
    if scale_fmt == "ue8m0":
        scale = ue8m0_scale(amax, E2M1_MAX, round_e2m1)
        s = scale.float()
    else:
        scale = s = torch.where(amax > 0, (amax / E2M1_MAX).clamp_min(2.0**-126), 1.0)
    return pack_e2m1(encode_e2m1(wg / s[..., None]).view(R, C)), scale


def dequantize_fp4_(out: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group: int = GROUP) -> torch.Tensor:
    """Write the (R, C) weight into `out` (any float dtype), 128 rows at a time: peak scratch is one band's int32 byte
    indices and float32 values, 128 * C * 6 bytes (5.3 MiB at C = 7168) whatever R is, never a second full-size
    float32 copy (tests/quant/test_fp4.py measures it). The byte -> (low, high) table is gathered with F.embedding,
    which takes int32 indices; `table[idx]` converts them to int64 first, 10 bytes per value instead of 6 (measured).
    scale: float8_e8m0fnu, uint8 e8m0 bytes or float32 (`decode_scale`)."""
    u = _as_bytes(packed)
    if u.dim() != 2:
        raise ValueError(f"dequantize one (rows, cols/2) FP4 matrix at a time, got shape {tuple(packed.shape)}: "
                         "for stacked experts (E, rows, cols/2) pass each expert's slice and its scale")
    R, C = u.shape[0], 2 * u.shape[1]
    if C % group:
        raise ValueError(f"FP4 weight of {C} inputs per row (packed {tuple(packed.shape)}) is not a multiple of the "
                         f"group size {group}: check the group size (FP4 experts use {GROUP})")
    if tuple(scale.shape) != (R, C // group):
        raise ValueError(f"FP4 scale has shape {tuple(scale.shape)}; a packed {tuple(packed.shape)} weight holds "
                         f"({R}, {C}) values and needs one scale per {group} inputs of each row, ({R}, {C // group}): "
                         "check that the scale belongs to this weight")
    if tuple(out.shape) != (R, C):
        raise ValueError(f"out has shape {tuple(out.shape)}, the FP4 weight unpacks to ({R}, {C})")
    lut = _BYTE_VALUES.to(u.device)
    for r0 in range(0, R, BAND):
        r1 = min(r0 + BAND, R)
        v = F.embedding(u[r0:r1].int(), lut).view(r1 - r0, C // group, group)  # (b, G, group) float32
        out[r0:r1].copy_(v.mul_(decode_scale(scale[r0:r1])[..., None]).view(r1 - r0, C))
        del v  # or the next band's scratch would be allocated while this one is still held
    return out


def dequantize_fp4(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32,
                   group: int = GROUP) -> torch.Tensor:
    """packed (R, C/2), scale (R, C/group) -> w (R, C) in dtype."""
    shape = (*packed.shape[:-1], 2 * packed.shape[-1]) if packed.dim() else ()
    return dequantize_fp4_(torch.empty(shape, dtype=dtype, device=packed.device), packed, scale, group)


def _as_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The packed weight's bytes, after checking that its dtype is one of packed FP4's."""
    if packed.dtype not in PACKED_DTYPES:
        raise ValueError(f"FP4 weights are two e2m1 codes per byte, stored as int8 (or uint8, float4_e2m1fn_x2); got "
                         f"{packed.dtype}: a float tensor is not packed FP4 (quantise it with quantize_fp4)")
    return packed.view(torch.uint8)
