"""Packed expert banks in memory-mapped files (`load_model(mmap=True)`, `--mmap`): the page cache holds the routed
experts, so a model larger than free RAM starts and runs (slowly: pages come back from disk as tokens route to
them), as llama.cpp's default mmap lets it.

Why a file of our own and not the checkpoint's: a bank is one (E, rows, ...) tensor the kernels index by expert,
while checkpoints store one tensor per expert matrix (and often another format). The first load writes each
packed bank into `<cache>/packed/<key>/<module>.bin` through a shared mapping (the pages are the file's, written
back by the kernel, reclaimable under pressure; never anonymous memory). A `manifest.json` written last records the
source files' sizes and modification times and every bank's format and shape; a later load with the same source
and formats maps the files and reads none of those tensors from the checkpoint at all.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from qiusuo.quant.modules import QuantExperts
from qiusuo.runtime import cache_dir

MANIFEST = "manifest.json"


def _signature(files: list[Path]) -> list:
    return [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(set(files))]


def folder_for(source: Path, spec: str) -> Path:
    key = hashlib.sha256(f"{source.resolve()}|{spec}".encode()).hexdigest()[:16]
    return cache_dir() / "packed" / key


def _banks(model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Module path -> {buffer name: tensor} of every packed expert bank."""
    return {path: {n: b for n, b in m.named_buffers(recurse=False) if b is not None}
            for path, m in model.named_modules() if isinstance(m, QuantExperts)}


def _describe(model: nn.Module) -> dict:
    return {path: {n: [str(t.dtype), list(t.shape)] for n, t in bufs.items()} for path, bufs in _banks(model).items()}


def map_banks(model: nn.Module, source_files: list[Path], folder: Path) -> bool:
    """Give every packed expert bank of `model` (allocated, not yet filled) file-backed buffers under `folder`.
    Returns True when `folder` already holds them for these very source files and formats (nothing to read), False
    when they are fresh files the loader must fill (then call `seal` after loading)."""
    folder.mkdir(parents=True, exist_ok=True)
    want = {"source": _signature(source_files), "banks": _describe(model)}
    ready = False
    try:
        ready = json.loads((folder / MANIFEST).read_text()) == want
    except (OSError, ValueError):
        pass
    if not ready:
        (folder / MANIFEST).unlink(missing_ok=True)  # whatever was there is rewritten below
    for path, bufs in _banks(model).items():
        m = model.get_submodule(path)
        for name, t in bufs.items():
            file = folder / f"{path}.{name}.bin"
            nbytes = t.numel() * t.element_size()
            if not ready:
                with open(file, "wb") as f:
                    f.truncate(nbytes)
            mapped = torch.from_file(str(file), shared=True, size=nbytes, dtype=torch.uint8)
            setattr(m, name, mapped.view(t.dtype).view(t.shape))
    return ready


def seal(model: nn.Module, source_files: list[Path], folder: Path) -> None:
    """After a load filled the mapped banks, write the manifest (last), so an interrupted load never leaves a
    folder a later load would trust. (The banks' pages already are the files' contents, in the page cache.)"""
    (folder / MANIFEST).write_text(json.dumps({"source": _signature(source_files), "banks": _describe(model)}))
