"""Write a `Transformer` as a Hugging Face folder that transformers, vLLM and SGLang load: per-expert hub names,
MTP layers and the routing bias included, shards plus an index above `max_shard_bytes`, optional FP8 blocks.

The folder appears atomically: everything is written and fsynced in a temporary sibling directory that is then
renamed into place, so a crash leaves the previous folder (or none), never a mix.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from torch import nn
from tqdm.auto import tqdm

from qiusuo.hf.fp8 import BLOCK, is_quantizable, quantize_blocks, scale_shape
from qiusuo.hf.load import INDEX, SINGLE, parse_dtype
from qiusuo.hf.names import hf_layout
from qiusuo.hf.st import write_file

DEFAULT_SHARD_BYTES = 5 * 2**30
FP8_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}


def unwrap(model: nn.Module) -> nn.Module:
    """The `Transformer` inside `torch.compile` (`_orig_mod`) or DDP (`module`) wrappers."""
    while not hasattr(model, "cfg"):
        model = getattr(model, "_orig_mod", None) or getattr(model, "module")
    return model


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (the directory entry itself is data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_hf(model: nn.Module, path: str | Path, tokenizer=None, fp8: bool = False, dtype=None,
            max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True) -> Path:
    """Write `model` to the folder `path` (replaced if it exists) in Hugging Face layout.

    dtype: cast floating tensors on the way out (default: keep the model's). fp8: store the projection matrices as
    float8_e4m3fn with a float32 `weight_scale_inv` per 128x128 block (error bound in `qiusuo.hf.fp8`).
    tokenizer: anything with `save(dir)` (a `qiusuo.data.Tokenizer`) to write its files alongside.
    """
    model = unwrap(model)
    cfg = model.cfg
    path = Path(path)
    dtype = parse_dtype(dtype)
    sd = model.state_dict()
    layout = hf_layout(model)

    # plan: (name, source view, quantise?) with the bytes each takes on disk, then greedy shards in layout order
    items = []
    for name, slot in layout.items():
        t = slot.view(sd[slot.ours])
        out_dtype = dtype if dtype is not None and t.is_floating_point() and "e_score_correction_bias" not in name \
            else t.dtype
        q = fp8 and is_quantizable(name, t)
        nbytes = t.numel() + 4 * (scale_shape(tuple(t.shape))[0] * scale_shape(tuple(t.shape))[1]) if q \
            else t.numel() * out_dtype.itemsize
        items.append((name, t, out_dtype, q, nbytes))
    shards: list[list] = [[]]
    size = 0
    for it in items:
        if shards[-1] and size + it[4] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(it)
        size += it[4]
    n = len(shards)
    file_names = [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        weight_map = {}
        with tqdm(total=sum(it[4] for it in items), unit="B", unit_scale=True, desc=f"save {path.name}",
                  disable=not progress) as bar:
            for file, shard in zip(file_names, shards):
                tensors = {}
                for name, t, out_dtype, q, nbytes in shard:
                    if q:
                        tensors[name], tensors[name + "_scale_inv"] = quantize_blocks(t)
                    else:
                        tensors[name] = t.to(out_dtype)
                for name in tensors:
                    weight_map[name] = file
                write_file(tmp / file, tensors)
                bar.update(sum(it[4] for it in shard))
        if n > 1:
            _write_json(tmp / INDEX, {"metadata": {"total_size": sum(it[4] for it in items)}, "weight_map": weight_map})
        param_dtype = dtype or next(model.parameters()).dtype
        config = cfg.to_hf() | {"torch_dtype": str(param_dtype).removeprefix("torch.")}
        if fp8:
            config["quantization_config"] = dict(FP8_CONFIG)
        _write_json(tmp / "config.json", config)
        gen = {"_from_model_config": True}
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(cfg, key) is not None:
                gen[key] = getattr(cfg, key)
        _write_json(tmp / "generation_config.json", gen)
        if tokenizer is not None:
            tokenizer.save(tmp)
        fsync_dir(tmp)
        old = path.parent / f".{path.name}.old-{os.getpid()}"
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
        fsync_dir(path.parent)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path

