"""FP4 quantisation-aware training of the routed experts (DeepSeek-V4 trains its experts this way for the last part
of the run, so that the FP4 checkpoint it ships is the model it trained).

`fake_fp4(w)` is, bit for bit, `dequantize_fp4(*quantize_fp4(w))` of the export format (`qiusuo.quant.fp4`: e2m1
values, one ue8m0 power-of-two scale per 32 inputs of each row, round to nearest with ties to the even code,
saturating at 6), computed without packing: sign(w) * round_e2m1(|w| / s) * s. The backward is the straight-through
estimator: the gradient passes to w unchanged. Turned on per model with `set_fp4_qat(model, True)`, which gives each
`Experts` module `fake_fp4` as its weight transform; the trainer does that from `train.fp4_qat_from` of the run on,
so evaluation then scores the FP4 model too.
"""

from __future__ import annotations

import torch
from torch import nn

from qiusuo.quant.fp4 import E2M1_MAX, GROUP, round_e2m1
from qiusuo.quant.fp8 import ue8m0_scale


def fake_fp4_values(w: torch.Tensor) -> torch.Tensor:
    """w (..., C) -> the exported FP4 weight's values, in w's dtype (exact: e2m1 * 2^k fits bf16 and fp32)."""
    C = w.shape[-1]
    if C % GROUP:
        raise ValueError(f"FP4 groups {GROUP} inputs per scale; the input dim {C} is not a multiple of it")
    wg = w.float().reshape(*w.shape[:-1], C // GROUP, GROUP)
    s = ue8m0_scale(wg.abs().amax(-1), E2M1_MAX, round_e2m1).float()[..., None]
    return torch.copysign(round_e2m1(wg.abs() / s), wg).mul_(s).reshape(w.shape).to(w.dtype)


class _FakeFP4(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return fake_fp4_values(w)

    @staticmethod
    def backward(ctx, grad):
        return grad  # straight through


def fake_fp4(w: torch.Tensor) -> torch.Tensor:
    """Fake-quantised w (values of the FP4 export) with straight-through gradients."""
    return _FakeFP4.apply(w)


def set_fp4_qat(model: nn.Module, on: bool) -> int:
    """Switch FP4 fake quantisation of every routed-expert module on or off; returns how many were switched."""
    from qiusuo.model.moe import Experts

    n = 0
    for m in model.modules():
        if isinstance(m, Experts):
            m.weight_transform = fake_fp4 if on else None
            n += 1
    return n
