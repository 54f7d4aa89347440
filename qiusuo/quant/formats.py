"""Weight formats that stay packed at run time: how a (N out, K in) matrix is stored, quantised and dequantised.

Legend: N output features (rows), K input features, G inputs per scale group, B fp8 block edge.

| format | codes | scales | bits per weight | where it comes from |
|---|---|---|---|---|
| bf16   | bfloat16 (N, K) | none | 16 | any checkpoint |
| int8   | int8 (N, K), w = q * s[n] | float32 (N,) | 8.03 | `--quantize int8`; compressed-tensors `pack-quantized` / `int-quantized`, 8 bits, per channel |
| int4   | uint8 (N, K/2), w = (nibble - 8) * s[n, k // G] | bfloat16 (N, K/G) | 4.5 at G = 32 | `--quantize int4[:G]`; compressed-tensors `pack-quantized`, 4 bits, symmetric groups (Kimi-K2.5's experts) |
| mxfp4  | uint8 (N, K/2), w = e2m1(nibble) * 2^(e - 127) | uint8 e8m0 (N, K/32) | 4.25 | DeepSeek-V4's experts as shipped (`qiusuo.quant.fp4`) |
| fp8    | float8_e4m3fn (N, K), w = q * s[n // B, k // B] | float32 (ceil(N/B), ceil(K/B)) | 8.0 | DeepSeek-V3/V3.2/V4 as shipped (`qiusuo.quant.fp8`) |

Nibbles: byte j of a row holds column 2j in its low half and 2j + 1 in its high half, for int4 and mxfp4 alike.
That is DeepSeek's FP4 layout and, read as bytes, compressed-tensors' `pack-quantized` int32 words (eight 4-bit
values, value i at bits 4i, stored unsigned as q + 8), so both load without repacking. The kernels
(`qiusuo.quant.kernels`) read exactly these layouts.

int4 rounds like llama.cpp's Q4_0: the group's largest-magnitude weight m gets the scale d = m / -8 (rounded to
bfloat16 first, so codes are chosen for the scale that is stored) and codes round(w / d) + 8 clipped to [0, 15]: the
extreme weight is exact and the grid spans -8d..7d. int8 is symmetric per output channel, d = max|w| / 127.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qiusuo.quant.fp4 import dequantize_fp4, pack_e2m1, quantize_fp4
from qiusuo.quant.fp8 import BLOCK, decode_scale, dequantize_blocks, quantize_blocks, scale_shape

NAMES = ("bf16", "int8", "int4", "mxfp4", "fp8")
INT4_GROUPS = (32, 64, 128)


@dataclass(frozen=True)
class Format:
    """How one matrix is stored. `group`: int4's inputs per scale (mxfp4: always 32); `block`: fp8's block edge."""

    name: str
    group: int = 0
    block: int = 0

    def __str__(self) -> str:
        return f"int4:{self.group}" if self.name == "int4" and self.group != 32 else self.name

    @property
    def packed(self) -> bool:
        """Codes two per byte (int4, mxfp4)."""
        return self.name in ("int4", "mxfp4")

    def bits(self, N: int, K: int) -> float:
        """Bits per weight of an (N, K) matrix, scales included."""
        return 8 * self.nbytes(N, K) / (N * K)

    def nbytes(self, N: int, K: int) -> int:
        (qs, qd), scale = self.shapes(N, K)
        total = math.prod(qs) * qd.itemsize
        if scale is not None:
            total += math.prod(scale[0]) * scale[1].itemsize
        return total

    def check(self, N: int, K: int, what: str) -> None:
        """ValueError naming `what` when an (N, K) matrix cannot be stored in this format."""
        need = self.group if self.name in ("int4", "mxfp4") else 0
        if need and K % need:
            raise ValueError(f"{what}: {K} inputs per row is not a multiple of {self}'s group of {need}; keep it in "
                             f"another format (e.g. int8 or bf16) or pick a group that divides {K}")

    def shapes(self, N: int, K: int) -> tuple[tuple[tuple[int, ...], torch.dtype], tuple[tuple[int, ...], torch.dtype] | None]:
        """((codes shape, dtype), (scale shape, dtype) or None) of an (N, K) matrix."""
        if self.name == "bf16":
            return ((N, K), torch.bfloat16), None
        if self.name == "int8":
            return ((N, K), torch.int8), ((N,), torch.float32)
        if self.name == "int4":
            return ((N, K // 2), torch.uint8), ((N, K // self.group), torch.bfloat16)
        if self.name == "mxfp4":
            return ((N, K // 2), torch.uint8), ((N, K // 32), torch.uint8)
        return ((N, K), torch.float8_e4m3fn), (scale_shape((N, K), self.block), torch.float32)

    def scale_rows(self, r0: int, r1: int) -> tuple[int, int]:
        """The scale rows that weight rows [r0, r1) use; fp8 needs them on block edges (a ValueError otherwise)."""
        if self.name != "fp8":
            return r0, r1
        if r0 % self.block:
            raise ValueError(f"fp8 rows [{r0}, {r1}) of a fused matrix do not start on a {self.block}-row block edge")
        return r0 // self.block, -(-r1 // self.block)

    # ------------------------------------------------------------------ quantise / dequantise
    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """w (N, K) any float dtype -> (codes, scale) in this format's layout."""
        N, K = w.shape
        self.check(N, K, f"a ({N}, {K}) matrix")
        if self.name == "bf16":
            return w.to(torch.bfloat16).contiguous(), None
        wf = w.float()
        if self.name == "int8":
            amax = wf.abs().amax(-1)  # (N,)
            scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
            return (wf / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8), scale
        if self.name == "int4":
            G = self.group
            wg = wf.view(N, K // G, G)
            m = wg.gather(-1, wg.abs().argmax(-1, keepdim=True))[..., 0]  # (N, K/G) signed extreme
            d = (m / -8).to(torch.bfloat16)
            df = d.float()
            inv = torch.where(df != 0, 1 / df, torch.zeros_like(df))
            codes = (wg * inv[..., None]).round_().add_(8).clamp_(0, 15).to(torch.uint8).view(N, K)
            return pack_e2m1(codes).view(torch.uint8), torch.where(df != 0, d, torch.ones_like(d))
        if self.name == "mxfp4":
            packed, scale = quantize_fp4(wf, 32, "ue8m0")
            return packed.view(torch.uint8), scale.view(torch.uint8)
        return quantize_blocks(wf, self.block, "float")

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
        """(codes, scale) of one matrix -> float32 (N, K): the plain reference every fast path is held against."""
        if self.name == "bf16":
            return q.float()
        if self.name == "int8":
            return q.float() * decode_scale(scale)[:, None]
        if self.name == "int4":
            N = q.shape[0]
            u = q.view(torch.uint8)
            codes = torch.stack((u & 15, u >> 4), -1).view(N, -1).float() - 8  # (N, K)
            return (codes.view(N, -1, self.group) * scale.float()[..., None]).view(N, -1)
        if self.name == "mxfp4":
            return dequantize_fp4(q.view(torch.int8), scale.view(torch.uint8))
        return dequantize_blocks(q, scale)


def parse(spec: str | Format) -> Format:
    """`bf16`, `int8`, `int4`, `int4:G` (G in 32, 64, 128), `mxfp4`, `fp8` -> a Format; ValueError naming the choices."""
    if isinstance(spec, Format):
        return spec
    name, _, arg = str(spec).strip().lower().partition(":")
    if name not in NAMES:
        raise ValueError(f"unknown weight format {spec!r}; use one of {', '.join(NAMES)} (int4:G with G in "
                         f"{', '.join(map(str, INT4_GROUPS))})")
    if name == "int4":
        try:
            group = int(arg or 32)
        except ValueError:
            group = -1
        if group not in INT4_GROUPS:
            raise ValueError(f"int4 group {arg!r}: use one of {', '.join(map(str, INT4_GROUPS))} (inputs per scale)")
        return Format("int4", group=group)
    if arg:
        raise ValueError(f"weight format {spec!r}: {name} takes no ':' argument")
    if name == "mxfp4":
        return Format("mxfp4", group=32)
    if name == "fp8":
        return Format("fp8", block=BLOCK)
    return Format(name)
