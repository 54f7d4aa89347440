"""Write a `Transformer` as a Hugging Face folder that transformers, vLLM and SGLang load: hub names (per-expert
matrices, MTP modules, the routing bias and V4's hash tables included), shards plus an index above
`max_shard_bytes`, and on request the quantised formats DeepSeek ships: FP8 blocks (V3, V4) and FP4 experts (V4).

The folder appears atomically (`qiusuo.io.atomic_dir`): everything is written into a temporary sibling directory,
fsynced and then renamed into place, so a crash leaves the previous folder (or none), never a mix. `write_hf`
writes the same files into a folder the caller finishes itself (a training checkpoint adds its own files).

Quantised export, what each slot of `hf_layout` says (`Slot.quant`): with fp8, "fp8" and "expert" matrices become
float8_e4m3fn with a scale per 128x128 block; with fp4_experts as well, "expert" matrices become FP4 (int8, two
e2m1 values per byte, a scale per 32 inputs of each row). Scales are float32 (`scale_fmt="float"`, V3's) or ue8m0
powers of two, named `<weight>_scale_inv` (V2/V3) or `<module>.scale` (V4, `names.scale_name`). As DeepSeek stores
them: V3.1's ue8m0 scales are float32 tensors holding powers of two, V4's are `float8_e8m0fnu` bytes; config.json
says `scale_fmt: "ue8m0"` for both and nothing for float32 scales (V3's `quantization_config` has no `scale_fmt`).
What is FP8 follows DeepSeek-V3's checkpoint (`Slot.quant`): every projection of attention, MLPs and experts, the
MTP block's included; not the embedding, output head, routers, norms, routing bias, nor MTP's `eh_proj`.
Load -> save gives back the same bytes (tests/hf/test_v4_checkpoints.py): the dequantised values q * s are exact in
float32, and re-quantising them finds the same scales and codes (`qiusuo.quant.fp8`, `qiusuo.quant.fp4`). With ue8m0
scales q * s is exact in bf16 as well, so a V4-Flash-style folder survives a bf16 load; float32 scales need the
model in float32 (`qiusuo convert --dtype float32`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from qiusuo.quant.fp4 import GROUP, quantize_fp4
from qiusuo.quant.fp8 import BLOCK, SCALE_FORMATS, quantize_blocks, scale_shape
from qiusuo.hf.load import INDEX, SINGLE, parse_dtype
from qiusuo.hf.names import hf_layout, scale_name
from qiusuo.hf.packed import int_config, stored_tensors
from qiusuo.quant.apply import packed_targets
from qiusuo.hf.st import write_file
from qiusuo.io import atomic_dir

DEFAULT_SHARD_BYTES = 5 * 2**30
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}


def unwrap(model: nn.Module) -> nn.Module:
    """The `Transformer` inside `torch.compile` (`_orig_mod`) or DDP (`module`) wrappers."""
    while not hasattr(model, "cfg"):
        model = getattr(model, "_orig_mod", None) or getattr(model, "module")
    return model


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _scale_fmt(model: nn.Module, fp8: bool, fp4_experts: bool, scale_fmt: str | None) -> str:
    """The scale format to write (default: what the family ships, float32 for V2/V3, ue8m0 for V4), after checking
    the quantisation arguments, before anything is written."""
    scale_fmt = scale_fmt or ("ue8m0" if model.cfg.is_v4 else "float")
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt {scale_fmt!r} is not one of {SCALE_FORMATS}")
    if fp4_experts and not model.cfg.is_v4:
        raise ValueError(f"fp4_experts is for deepseek_v4 models (DeepSeek-V4-Flash's format), and this one is "
                         f"{model.cfg.model_type}; leave it False")
    if fp4_experts and not fp8:
        raise ValueError("fp4_experts lives inside DeepSeek-V4's FP8 checkpoint: pass fp8=True as well")
    return scale_fmt


def _float_layout(model: nn.Module) -> dict:
    """`hf_layout` of the model as if no layer were packed (a meta twin: packed layers add scale buffers the hub
    layout has no names for, and their codes keep the float weights' state-dict names)."""
    with torch.device("meta"):
        twin = type(model)(model.cfg)
    return hf_layout(twin)


def _plan(model: nn.Module, dtype, fp8: bool, fp4_experts: bool, scale_fmt: str, max_shard_bytes: int) -> list[list]:
    """Shards of (hub name, source view, output dtype, "fp8" | "fp4" | None | a packed layer's (Format, scale
    view), bytes on disk), greedy in layout order."""
    sd = model.state_dict()
    targets = packed_targets(model)
    scale_bytes = 1 if scale_fmt == "ue8m0" and model.cfg.is_v4 else 4
    items = []
    for name, slot in _float_layout(model).items():
        t = slot.view(sd[slot.ours])
        if slot.ours in targets:  # a packed layer: its codes and scales as they are
            pf, _, sname = targets[slot.ours]
            sc = sd.get(sname)
            if sc is not None:
                sc = sc[slot.expert] if slot.expert is not None else sc
                if slot.rows:
                    s0, s1 = pf.scale_rows(*slot.rows)
                    sc = sc[s0:s1]
            nbytes = t.numel() * t.element_size() + (0 if sc is None else sc.numel() * sc.element_size())
            items.append((name, t, t.dtype, (pf, sc), nbytes))
            continue
        out_dtype = slot.dtype or (dtype if dtype is not None and t.is_floating_point() else t.dtype)
        fmt = "fp4" if fp4_experts and slot.quant == "expert" else "fp8" if fp8 and slot.quant else None
        if fmt == "fp8":
            nbytes = t.numel() + scale_bytes * math.prod(scale_shape(tuple(t.shape)))
        elif fmt == "fp4":
            nbytes = t.numel() // 2 + scale_bytes * t.numel() // GROUP
        else:
            nbytes = t.numel() * out_dtype.itemsize
        items.append((name, t, out_dtype, fmt, nbytes))
    shards: list[list] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it[4] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it[4]
    return shards


def _packed_config(packed: dict, fp8: bool, v4: bool, current: dict | None) -> dict:
    """config.json's `quantization_config` for the packed layers written: DeepSeek's FP8 one for fp8 (and V4's
    mxfp4 experts), compressed-tensors' for int4/int8; the two kinds cannot share one checkpoint."""
    kinds = {f.name for f in packed if f.name != "bf16"}
    ints = {f: m for f, m in packed.items() if f.name in ("int4", "int8")}
    if ints and (kinds - {"int4", "int8"} or fp8):
        raise ValueError(f"packed formats {sorted(kinds | ({'fp8'} if fp8 else set()))} cannot be written as one "
                         f"checkpoint: FP8 is DeepSeek's quantization_config, int4/int8 compressed-tensors'; "
                         f"convert the model to one of the two kinds (--quantize)")
    if ints:
        return {"quantization_config": int_config(ints)}
    if kinds & {"fp8", "mxfp4"} and not fp8:
        qc = dict(FP8_CONFIG)
        out = {"quantization_config": qc}
        if "mxfp4" in kinds:
            qc["expert_dtype"] = out["expert_dtype"] = "fp4"
            qc["scale_fmt"] = "ue8m0"
        return out
    return {}


def save_hf(model: nn.Module, path: str | Path, tokenizer=None, fp8: bool = False, dtype=None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True, fp4_experts: bool = False,
            scale_fmt: str | None = None) -> Path:
    """Write `model` to the folder `path` (replaced if it exists) in Hugging Face layout.

    dtype: cast floating tensors on the way out (default: keep the model's; tensors the hub keeps in float32, such
    as the routing bias and V4's mHC maps, stay float32). fp8: store the projection matrices as float8_e4m3fn with
    a scale per 128x128 block (error bound in `qiusuo.quant.fp8`). fp4_experts (V4, with fp8): routed experts as FP4
    (`qiusuo.quant.fp4`), as DeepSeek-V4-Flash ships them. scale_fmt: "float" or "ue8m0" (default: the family's,
    float32 for V2/V3, ue8m0 for V4). tokenizer: anything with `save(dir)` (a `qiusuo.data.Tokenizer`) to write
    its files alongside.
    """
    path = Path(path)
    scale_fmt = _scale_fmt(unwrap(model), fp8, fp4_experts, scale_fmt)
    with atomic_dir(path) as tmp:
        write_hf(model, tmp, tokenizer=tokenizer, fp8=fp8, dtype=dtype, max_shard_bytes=max_shard_bytes,
                 progress=progress, desc=f"save {path.name}", fp4_experts=fp4_experts, scale_fmt=scale_fmt)
    return path


def write_hf(model: nn.Module, folder: Path, tokenizer=None, fp8: bool = False, dtype=None,
             max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True, desc: str = "save",
             fp4_experts: bool = False, scale_fmt: str | None = None) -> None:
    """`save_hf`'s files (weights, index, config.json, generation_config.json, tokenizer) into the existing
    folder `folder`, without fsync or rename: the caller's `atomic_dir` makes them durable and visible."""
    model = unwrap(model)
    cfg = model.cfg
    scale_fmt = _scale_fmt(model, fp8, fp4_experts, scale_fmt)
    dtype = parse_dtype(dtype)
    shards = _plan(model, dtype, fp8, fp4_experts, scale_fmt, max_shard_bytes)
    n = len(shards)
    file_names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = sum(it[4] for shard in shards for it in shard)
    quantise = {"fp8": quantize_blocks, "fp4": quantize_fp4}
    weight_map = {}
    packed_modules: dict = {}  # Format -> hub module names written packed
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for file, shard in zip(file_names, shards):
            tensors = {}
            for name, t, out_dtype, fmt, _ in shard:
                if isinstance(fmt, tuple):  # a packed layer
                    pf, sc = fmt
                    tensors.update(stored_tensors(name, pf, t, sc, scale_name(model, name), cfg.is_v4))
                    packed_modules.setdefault(pf, []).append(name.removesuffix(".weight"))
                elif fmt:
                    q, scale = quantise[fmt](t, scale_fmt=scale_fmt)
                    tensors[name], tensors[scale_name(model, name)] = q, scale if cfg.is_v4 else scale.float()
                else:
                    tensors[name] = t.to(out_dtype)
            weight_map.update(dict.fromkeys(tensors, file))
            write_file(folder / file, tensors)
            bar.update(sum(it[4] for it in shard))
    if n > 1:
        _write_json(folder / INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    param_dtype = dtype or next(model.parameters()).dtype
    config = cfg.to_hf() | {"torch_dtype": str(param_dtype).removeprefix("torch.")}
    if fp8:
        declared = scale_fmt == "ue8m0" or cfg.is_v4  # V3's config has no scale_fmt; V3.1's and V4's name theirs
        config["quantization_config"] = FP8_CONFIG | ({"scale_fmt": scale_fmt} if declared else {})
    if fp4_experts:  # V4.1 reads it from quantization_config, V4 (and DeepSeek's inference code) from the top level
        config["quantization_config"]["expert_dtype"] = config["expert_dtype"] = "fp4"
    config.update(_packed_config(packed_modules, fp8, cfg.is_v4, config.get("quantization_config")))
    _write_json(folder / "config.json", config)
    gen = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key) is not None:
            gen[key] = getattr(cfg, key)
    _write_json(folder / "generation_config.json", gen)
    if tokenizer is not None:
        tokenizer.save(folder)
