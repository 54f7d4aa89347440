"""FP8 block quantisation as in DeepSeek-V3's checkpoints: `float8_e4m3fn` weights with a float32
`weight_scale_inv` per 128x128 block (edge blocks partial), so that `w ~= q * scale_inv` blockwise.

Error bound (what `quantize_blocks` guarantees and tests/hf/test_fp8.py checks). Each block is scaled by
s = amax / 448 so its largest element lands on e4m3's largest finite value, 448 = 1.75 * 2^8. e4m3 keeps 3 mantissa
bits, so a scaled value in the normal range (|x| >= 2^-6) is rounded to nearest with relative error <= 2^-4 (half
an ulp of 2^-3); below that, subnormals are spaced 2^-9 apart, an absolute error <= 2^-10. Back in weight units:

    |w - dequant(quant(w))| <= 2^-4 * |w| + 2^-10 * s,   s = block amax / 448

and so, for every element of a block, |error| <= 2^-4 * amax * (1 + 2^-6 / 448) ~= 0.0625 * amax.
"""

from __future__ import annotations

import math

import torch

BLOCK = 128
E4M3_MAX = 448.0


def scale_shape(shape: tuple[int, ...], block: int = BLOCK) -> tuple[int, int]:
    rows, cols = shape
    return math.ceil(rows / block), math.ceil(cols / block)


def quantize_blocks(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w (R, C) any float dtype -> (q (R, C) float8_e4m3fn, scale_inv (ceil(R/128), ceil(C/128)) float32)."""
    R, C = w.shape
    br, bc = scale_shape((R, C), block)
    wf = w.float()
    # pad to whole blocks with zeros (they never raise a block's amax), reduce per block, crop back
    padded = torch.nn.functional.pad(wf, (0, bc * block - C, 0, br * block - R))
    amax = padded.view(br, block, bc, block).abs().amax(dim=(1, 3))  # (br, bc)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))  # all-zero block: any scale works
    full = scale.repeat_interleave(block, 0)[:R].repeat_interleave(block, 1)[:, :C]  # (R, C)
    q = (wf / full).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_blocks_(out: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """Write q * scale_inv into `out` (R, C), one band of 128 rows at a time so the float32 temporary stays
    128 x C, not R x C (a 7168 x 18432 matrix would otherwise need 0.5 GB of scratch)."""
    R, C = q.shape
    if tuple(scale_inv.shape) != scale_shape((R, C), block):
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}; a ({R}, {C}) weight in "
                         f"{block}x{block} blocks needs {scale_shape((R, C), block)}")
    s = scale_inv.float().repeat_interleave(block, 1)[:, :C]  # (br, C)
    for b, r0 in enumerate(range(0, R, block)):
        r1 = min(r0 + block, R)
        out[r0:r1].copy_(q[r0:r1].float() * s[b])
    return out


def dequantize_blocks(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_blocks_(torch.empty(q.shape, dtype=dtype, device=q.device), q, scale_inv)


def is_quantizable(name: str, t: torch.Tensor) -> bool:
    """The tensors DeepSeek-V3 stores in FP8: the 2D projection matrices of attention, MLPs and experts. The
    embedding, output head, router, norms and the routing bias stay in the model dtype."""
    return t.dim() == 2 and name.endswith(("_proj.weight", "_proj_with_mqa.weight")) and ".mlp.gate." not in name
