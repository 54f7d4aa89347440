"""Write a `Transformer` as a Hugging Face folder that transformers, vLLM and SGLang load: per-expert hub names,
MTP layers and the routing bias included, shards plus an index above `max_shard_bytes`, optional FP8 blocks.

The folder appears atomically (`qiusuo.io.atomic_dir`): everything is written into a temporary sibling directory,
fsynced and then renamed into place, so a crash leaves the previous folder (or none), never a mix. `write_hf`
writes the same files into a folder the caller finishes itself (a training checkpoint adds its own files).
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from qiusuo.hf.fp8 import BLOCK, is_quantizable, quantize_blocks, scale_shape
from qiusuo.hf.load import INDEX, SINGLE, parse_dtype
from qiusuo.hf.names import hf_layout
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


def _plan(model: nn.Module, dtype, fp8: bool, max_shard_bytes: int) -> list[list[tuple]]:
    """Shards of (hub name, source view, output dtype, quantise?, bytes on disk), greedy in layout order."""
    sd = model.state_dict()
    items = []
    for name, slot in hf_layout(model).items():
        t = slot.view(sd[slot.ours])
        out_dtype = dtype if dtype is not None and t.is_floating_point() and "e_score_correction_bias" not in name \
            else t.dtype
        q = fp8 and is_quantizable(name, t)
        rows, cols = scale_shape(tuple(t.shape)) if q else (0, 0)
        nbytes = t.numel() + 4 * rows * cols if q else t.numel() * out_dtype.itemsize
        items.append((name, t, out_dtype, q, nbytes))
    shards: list[list[tuple]] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it[4] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it[4]
    return shards


def save_hf(model: nn.Module, path: str | Path, tokenizer=None, fp8: bool = False, dtype=None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> Path:
    """Write `model` to the folder `path` (replaced if it exists) in Hugging Face layout.

    dtype: cast floating tensors on the way out (default: keep the model's). fp8: store the projection matrices as
    float8_e4m3fn with a float32 `weight_scale_inv` per 128x128 block (error bound in `qiusuo.hf.fp8`).
    tokenizer: anything with `save(dir)` (a `qiusuo.data.Tokenizer`) to write its files alongside.
    """
    path = Path(path)
    with atomic_dir(path) as tmp:
        write_hf(model, tmp, tokenizer=tokenizer, fp8=fp8, dtype=dtype, max_shard_bytes=max_shard_bytes,
                 progress=progress, desc=f"save {path.name}")
    return path


def write_hf(model: nn.Module, folder: Path, tokenizer=None, fp8: bool = False, dtype=None,
             max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True, desc: str = "save") -> None:
    """`save_hf`'s files (weights, index, config.json, generation_config.json, tokenizer) into the existing
    folder `folder`, without fsync or rename: the caller's `atomic_dir` makes them durable and visible."""
    model = unwrap(model)
    cfg = model.cfg
    dtype = parse_dtype(dtype)
    shards = _plan(model, dtype, fp8, max_shard_bytes)
    n = len(shards)
    file_names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    total = sum(it[4] for shard in shards for it in shard)
    weight_map = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=not progress) as bar:
        for file, shard in zip(file_names, shards):
            tensors = {}
            for name, t, out_dtype, q, _ in shard:
                if q:
                    tensors[name], tensors[name + "_scale_inv"] = quantize_blocks(t)
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
        config["quantization_config"] = dict(FP8_CONFIG)
    _write_json(folder / "config.json", config)
    gen = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(cfg, key) is not None:
            gen[key] = getattr(cfg, key)
    _write_json(folder / "generation_config.json", gen)
    if tokenizer is not None:
        tokenizer.save(folder)
