"""Checkpoints whose weights stay packed in memory: reading any stored form straight into a packed layer
(`qiusuo.quant`), and writing packed layers in the formats other tools read.

Stored forms of one matrix (`Stored.kind`), as they sit in safetensors files:
- "plain": a float tensor (N, K);
- "fp8": float8_e4m3fn (N, K) + a scale per block (`<weight>_scale_inv` or V4's `<module>.scale`), DeepSeek's;
- "fp4": two e2m1 codes per byte (N, K/2) + a scale per 32 inputs, DeepSeek-V4's experts;
- "int": compressed-tensors `pack-quantized`, symmetric integers (`<module>.weight_packed` int32 words holding 8
  four-bit or 4 eight-bit values stored as q + 2^(bits-1), `<module>.weight_scale` (N, K/G) or (N, 1) per channel,
  `<module>.weight_shape`): Kimi-K2.5's INT4 experts, and what `qiusuo convert --quantize int4|int8` writes.

Into a packed layer (`load_into`): when the stored form is the layer's own format (fp8 with the same block, FP4 with
e8m0 scales into mxfp4, int4 with the same group, int8 per channel), bytes and scales are copied as they are; any
other pairing dequantises `BAND` rows at a time and quantises them into the layer, so memory holds the packed model,
one stored tensor and one float band, never a float copy of the model.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from qiusuo.quant.fp4 import dequantize_fp4
from qiusuo.quant.fp8 import decode_scale, dequantize_blocks
from qiusuo.hf.st import Entry
from qiusuo.io import CheckpointError
from qiusuo.quant.formats import Format
from qiusuo.quant.modules import fill_rows

BAND = 128  # rows dequantised at a time when converting between forms (a multiple of the fp8 block)
CT_SUFFIXES = (".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point", ".weight_g_idx")


class Stored(NamedTuple):
    """One matrix as a checkpoint stores it: its kind, the codes/values entry, the scale entry, and for "int" the
    bits and the group (inputs per scale; K for per-channel)."""

    kind: str
    entry: Entry
    scale: Entry | None = None
    bits: int = 0
    group: int = 0


def int_layout(packed: Entry, scale: Entry, shape: tuple[int, int], where: str) -> tuple[int, int]:
    """(bits, group) of a compressed-tensors pack-quantized matrix from its tensors' shapes, checked."""
    N, K = shape
    if packed.dtype != torch.int32 or len(packed.shape) != 2 or packed.shape[0] != N or K % 8:
        raise CheckpointError(f"{where}: weight_packed {packed.dtype} {list(packed.shape)} is not the int32 (N, K*bits/32)"
                              f" of a pack-quantized ({N}, {K}) matrix")
    bits = 32 * packed.shape[1] // K
    if bits not in (4, 8) or packed.shape[1] * 32 != bits * K:
        raise CheckpointError(f"{where}: weight_packed has {packed.shape[1]} int32 words per row for {K} inputs: "
                              f"{32 * packed.shape[1] / K:g} bits per weight; qiusuo reads 4- and 8-bit pack-quantized")
    if len(scale.shape) != 2 or scale.shape[0] != N or K % scale.shape[1]:
        raise CheckpointError(f"{where}: weight_scale has shape {list(scale.shape)}; a ({N}, {K}) matrix needs (N, K/G)"
                              f" for groups of G inputs or (N, 1) per channel")
    group = K // scale.shape[1]
    if bits == 4 and group not in (32, 64, 128):
        raise CheckpointError(f"{where}: 4-bit groups of {group} inputs; qiusuo's int4 kernels take groups of 32, 64 "
                              f"or 128")
    if bits == 8 and group != K:
        raise CheckpointError(f"{where}: 8-bit weights with groups of {group} inputs; qiusuo's int8 is per channel "
                              f"(weight_scale (N, 1))")
    return bits, group


def native_format(s: Stored, block: int) -> Format | None:
    """The packed format a stored matrix keeps at run time under `--quantize native` (None: float)."""
    if s.kind == "fp8":
        return Format("fp8", block=block)
    if s.kind == "fp4" and s.scale.dtype in (torch.uint8, torch.float8_e8m0fnu):
        return Format("mxfp4", group=32)
    if s.kind == "int":
        return Format("int4", group=s.group) if s.bits == 4 else Format("int8")
    return None


def dequantize_stored(s: Stored, q: torch.Tensor, scale: torch.Tensor | None, r0: int, r1: int,
                      block: int) -> torch.Tensor:
    """Rows [r0, r1) of a stored matrix as float32 (r0 a multiple of `block` for fp8)."""
    if s.kind == "plain":
        return q[r0:r1].float()
    if s.kind == "fp8":
        b0, b1 = r0 // block, -(-r1 // block)
        return dequantize_blocks(q[r0:r1], scale[b0:b1]) if block == 128 else \
            q[r0:r1].float() * decode_scale(scale[b0:b1]).repeat_interleave(block, 0)[: r1 - r0].repeat_interleave(
                block, 1)[:, : q.shape[1]]
    if s.kind == "fp4":
        return dequantize_fp4(q[r0:r1], scale[r0:r1])
    codes = unpack_int(q[r0:r1], s.bits).float()  # (n, K)
    n = codes.shape[0]
    return (codes.view(n, -1, s.group) * scale[r0:r1].float()[..., None]).view(n, -1)


def unpack_int(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """pack-quantized int32 words (n, K*bits/32) -> signed codes int8 (n, K)."""
    u = packed.contiguous().view(torch.uint8)  # little-endian: value i of a word is in byte i*bits//8
    if bits == 8:
        return (u.int() - 128).to(torch.int8)
    return (torch.stack((u & 15, u >> 4), -1).flatten(-2).int() - 8).to(torch.int8)


@torch.no_grad()
def load_into(fmt: Format, codes: torch.Tensor, scales: torch.Tensor | None, r0: int, s: Stored, q: torch.Tensor,
              scale: torch.Tensor | None, block: int) -> None:
    """Write stored matrix (q, scale) of kind `s.kind` into rows [r0, r0 + N) of a packed layer's `codes` (the whole
    matrix of one layer or expert, all its rows) and `scales`. Same format: a byte copy; else band by band."""
    N = q.shape[0]
    if s.kind == "fp8" and fmt.name == "fp8" and fmt.block == block:
        codes[r0:r0 + N].copy_(q.view(codes.dtype))
        b0, b1 = fmt.scale_rows(r0, r0 + N)
        scales[b0:b1].copy_(decode_scale(scale))
        return
    if s.kind == "fp4" and fmt.name == "mxfp4" and scale.dtype in (torch.uint8, torch.float8_e8m0fnu):
        codes[r0:r0 + N].copy_(q.view(torch.uint8))
        scales[r0:r0 + N].copy_(scale.view(torch.uint8))
        return
    if s.kind == "int" and ((fmt.name == "int4" and s.bits == 4 and fmt.group == s.group) or
                            (fmt.name == "int8" and s.bits == 8)):
        u = q.contiguous().view(torch.uint8)
        codes[r0:r0 + N].copy_(u if s.bits == 4 else (u.int() - 128).to(torch.int8))
        scales[r0:r0 + N].copy_(scale.view(N, -1).to(scales.dtype).view(scales[r0:r0 + N].shape))
        return
    for a in range(0, N, BAND):
        b = min(N, a + BAND)
        fill_rows(fmt, codes, scales, dequantize_stored(s, q, scale, a, b, block), r0 + a)


# ---------------------------------------------------------------------------------------------------- writing

def stored_tensors(name: str, fmt: Format, codes: torch.Tensor, scale: torch.Tensor | None, scale_name: str,
                   v4: bool) -> dict[str, torch.Tensor]:
    """The hub tensors of one packed matrix `name` (`<module>.weight`): fp8 and mxfp4 as DeepSeek ships them
    (`scale_name`: `<weight>_scale_inv` or V4's `<module>.scale`), int4/int8 as compressed-tensors pack-quantized
    (`<module>.weight_packed`, `.weight_scale`, `.weight_shape`), bf16 as is."""
    if fmt.name == "bf16":
        return {name: codes}
    if fmt.name == "fp8":
        return {name: codes, scale_name: scale}
    if fmt.name == "mxfp4":
        if not v4:
            raise ValueError(f"{name}: mxfp4 is DeepSeek-V4's expert format and has no place in this model's "
                             f"checkpoint layout; save with int4 or fp8 instead (qiusuo convert --quantize)")
        return {name: codes.view(torch.int8), scale_name: scale.view(torch.float8_e8m0fnu)}
    base = name.removesuffix(".weight")
    N = codes.shape[0]
    u = codes.view(torch.uint8) if fmt.name == "int4" else (codes.int() + 128).to(torch.uint8)
    K = u.shape[1] * (2 if fmt.name == "int4" else 1)
    return {f"{base}.weight_packed": u.contiguous().view(torch.int32),
            f"{base}.weight_scale": scale.view(N, -1),  # in its own dtype (int4 bf16, int8 float32): exact
            f"{base}.weight_shape": torch.tensor([N, K], dtype=torch.int64)}


def _pattern(names: list[str]) -> str:
    """One regular expression for module names that differ only in layer and expert numbers."""
    import re

    forms = sorted({re.sub(r"\\\.\d+(?=\\\.)", r"\\.\\d+", re.escape(n)) for n in names})
    return "re:^(" + "|".join(forms) + ")$"


def int_config(groups: dict[Format, list[str]]) -> dict:
    """compressed-tensors' `quantization_config` for pack-quantized int4/int8 matrices: one config group per format,
    targeting its modules (hub names, `<module>` without `.weight`) by a regular expression."""
    config_groups = {}
    for i, (fmt, modules) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        bits, strategy = (4, "group") if fmt.name == "int4" else (8, "channel")
        config_groups[f"group_{i}"] = {
            "targets": [_pattern(modules)],
            "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": strategy,
                        "group_size": fmt.group if fmt.name == "int4" else None, "dynamic": False,
                        "actorder": None, "observer": "minmax"},
            "input_activations": None, "output_activations": None}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None}
