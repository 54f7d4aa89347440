"""FP8 block quantisation as in DeepSeek's checkpoints: `float8_e4m3fn` weights with one scale per 128x128 block
(edge blocks partial), so that `w ~= q * scale_inv` blockwise. The scale is float32 (V3, `scale_fmt: "float"`) or
ue8m0 (V4, `scale_fmt: "ue8m0"`: `float8_e8m0fnu`, an exponent-only byte, the power of two 2^(byte - 127); some
checkpoints ship the same bytes as uint8, which `decode_scale` reads alike).

Scales. float: s = amax / 448, so the block's largest element lands on e4m3's largest finite value 448 = 1.75 * 2^8.
ue8m0 (`ue8m0_scale`): the smallest power of two s0 with amax <= 448 * s0 (so every scaled value fits e4m3's range;
transformers' `Fp8Quantize` and DeepGEMM's `get_e4m3_sf_and_sf_inv` round up the same way), halved when the block max
would round to a code <= 224 at s0. Without that halving the result is not a fixed point: dequantised, such a block
has max 224 * s0 = 448 * (s0 / 2), which re-quantises at s0 / 2 with every code doubled, so an FP8 checkpoint would
not survive load -> save bit for bit. At s0 / 2 no element is worse off: up to 224 * s0 the grid at s0 / 2 contains
the grid at s0, and the few elements in (224, 232] * s0 go to 224 * s0 at either scale (at s0 / 2 by saturating
(448, 464] to 448). So s lies in [amax / 464, amax / 232): up to ~1.93x the float scale, never more than 2x.

Error bound (what `quantize_blocks` guarantees and tests/quant/test_fp8.py checks, for both formats). e4m3 keeps 3
mantissa bits, so a scaled value in the normal range (|x| >= 2^-6) is rounded to nearest with relative error <= 2^-4
(half an ulp of 2^-3; the saturated (448, 464] range of ue8m0 errs by at most 16 <= 2^-4 * 448); below that,
subnormals are spaced 2^-9 apart, an absolute error <= 2^-10. Back in weight units, with s the block's scale:

    |w - dequant(quant(w))| <= 2^-4 * |w| + 2^-10 * s

and so, for every element of a block, |error| <= 2^-4 * amax * (1 + 2^-6 / 448) ~= 0.0625 * amax with float scales,
<= 2^-4 * amax * (1 + 2^-6 / 232) with ue8m0 (s < amax / 232: only the subnormal term grows, by under 2x).

Round trip: `quantize_blocks(dequantize_blocks(q, s), scale_fmt=...)` gives back q and s bit for bit for every
(q, s) this module writes, in both formats: what `qiusuo convert` relies on. With ue8m0, q * s is exact in float32
and in bf16 (4 significant bits times a power of two). With float32 scales q * s is rounded to float32; the round trip
holds through float32 because the block max comes back as fl(448 * s) and fl(fl(448 * s) / 448) = s for every
s = fl(amax / 448) (tests/quant/test_fp8.py checks all 2^23 mantissas of one binade).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

BLOCK = 128
E4M3_MAX = 448.0
SCALE_FORMATS = ("float", "ue8m0")


def scale_shape(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, int]:
    rows, cols = shape
    return math.ceil(rows / block), math.ceil(cols / block)


def decode_scale(s: torch.Tensor) -> torch.Tensor:
    """Any stored scale -> float32: float dtypes and float8_e8m0fnu by value, uint8 as raw e8m0 bytes 2^(b - 127)
    (a uint8 read by value would be off by a factor of 2^(127 - b), silently)."""
    if s.dtype == torch.uint8:
        return s.view(torch.float8_e8m0fnu).float()
    if not s.is_floating_point():
        raise ValueError(f"a scale of dtype {s.dtype} is neither a float, float8_e8m0fnu nor uint8 e8m0 bytes: "
                         "check that this tensor is the weight's scale (weight_scale_inv / scale)")
    return s.float()


def ue8m0_scale(amax: torch.Tensor, fmax: float, to_grid: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Per-group power-of-two scale as float8_e8m0fnu (shape of amax): the smallest 2^e with amax <= fmax * 2^e,
    halved when the group max would round (`to_grid`, on the scaled format's grid) to <= fmax / 2 there, which makes
    quantisation idempotent (module docstring). Floored at 2^-126 (halving may then reach e8m0's smallest, 2^-127);
    all-zero groups get 1, as in transformers' `Fp8Quantize`."""
    byte = lambda e: (e + 127).to(torch.uint8).view(torch.float8_e8m0fnu)  # 2^e, e in [-127, 127]
    pow2 = lambda e: byte(e).float()
    x = (amax / fmax).clamp_min(2.0**-126)  # a normal float, so its exponent bits are floor(log2)
    bits = x.view(torch.int32)
    e = (bits >> 23) - 127 + ((bits & 0x7FFFFF) != 0).int()  # ceil(log2(x)), exact (DeepGEMM's fast_log2_ceil)
    e = e + (fmax * pow2(e) < amax).int()  # fl(amax / fmax) may have rounded below a power of two
    e = e - (to_grid(amax / pow2(e)) <= fmax / 2).int()  # e >= -126 before, so 2^e stays in e8m0's range
    return byte(torch.where(amax > 0, e, 0))


def _to_e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)  # torch turns |x| > 448 into NaN, not 448


def quantize_blocks(w: torch.Tensor, block: int = BLOCK, scale_fmt: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """w (R, C) any float dtype -> (q (R, C) float8_e4m3fn, scale_inv (ceil(R/128), ceil(C/128)) float32 for
    scale_fmt "float", float8_e8m0fnu for "ue8m0")."""
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt {scale_fmt!r} is not one of {SCALE_FORMATS} (quantization_config.scale_fmt)")
    R, C = w.shape
    br, bc = scale_shape((R, C), block)
    wf = w.float()
    # pad to whole blocks with zeros (they never raise a block's amax), reduce per block, crop back
    padded = torch.nn.functional.pad(wf, (0, bc * block - C, 0, br * block - R))
    amax = padded.view(br, block, bc, block).abs().amax(dim=(1, 3))  # (br, bc)
    if scale_fmt == "ue8m0":
        scale = ue8m0_scale(amax, E4M3_MAX, lambda x: _to_e4m3(x).float())
    else:
        scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))  # all-zero block: any scale works
    full = decode_scale(scale).repeat_interleave(block, 0)[:R].repeat_interleave(block, 1)[:, :C]  # (R, C)
    return _to_e4m3(wf / full), scale


def dequantize_blocks_(out: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Write q * scale_inv into `out` (R, C), one band of 128 rows at a time so the float32 temporary stays
    128 x C, not R x C (a 7168 x 18432 matrix would otherwise need 0.5 GB of scratch). scale_inv: float32,
    float8_e8m0fnu or uint8 e8m0 bytes (`decode_scale`)."""
    R, C = q.shape
    if tuple(scale_inv.shape) != scale_shape((R, C), block):
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a ({R}, {C}) weight in "
                         f"{block}x{block} blocks needs {scale_shape((R, C), block)}")
    s = decode_scale(scale_inv).repeat_interleave(block, 1)[:, :C]  # (br, C)
    for b, r0 in enumerate(range(0, R, block)):
        r1 = min(r0 + block, R)
        out[r0:r1].copy_(q[r0:r1].float() * s[b])
    return out


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_blocks_(torch.empty(q.shape, dtype=dtype, device=q.device), q, scale_inv)


def is_quantizable(name: str, t: torch.Tensor) -> bool:
    """The tensors DeepSeek-V3 stores in FP8: the 2D projection matrices of attention, MLPs and experts. The
    embedding, output head, router, norms and the routing bias stay in the model dtype. V3.2's indexer: `wq_b`
    and `wk` are FP8, `weights_proj` is not (transformers' `_keep_in_fp32_modules`)."""
    if ".indexer." in name:
        return t.dim() == 2 and name.endswith((".wq_b.weight", ".wk.weight"))
    return t.dim() == 2 and name.endswith(("_proj.weight", "_proj_with_mqa.weight")) and ".mlp.gate." not in name
