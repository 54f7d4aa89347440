"""A minimal safetensors reader and writer that streams tensor by tensor.

Why not `safetensors.safe_open`: it memory-maps the file, and every page read through a mapping stays in the
process's resident set until the mapping closes, so loading a single-file model into freshly allocated parameters
peaks at about 2x the model's size. Reading each tensor with `readinto` straight into its destination leaves the
page cache to the kernel (not our RSS) and peaks at ~1x (figure in tests/hf/test_memory.py and docs/checkpoints.md).
The format is 8 bytes of little-endian header length, a JSON header `{name: {dtype, shape, data_offsets}}`, then
the data; both sides are checked here so a truncated or corrupt file names itself and the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from qiusuo.io import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E8M0": torch.float8_e8m0fnu,  # ue8m0 scales
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class Entry:
    """One tensor in a safetensors file: where its bytes are, and what they mean."""

    file: Path
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, Entry], dict[str, str]]:
    """Tensor entries and `__metadata__` of a safetensors file; every offset is checked against the file size."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: {size} bytes is too short for a safetensors file (truncated or empty)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{path}: header claims {n} bytes but the file has {size}: truncated or not safetensors")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    entries = {}
    base = 8 + n
    for name, h in header.items():
        try:
            dtype = DTYPES[h["dtype"]]
            shape = tuple(int(x) for x in h["shape"])
            start, end = (int(x) for x in h["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has an unreadable header entry {h!r}") from None
        want = math.prod(shape) * dtype.itemsize
        if end - start != want or start < 0:
            raise CheckpointError(f"{path}: tensor {name!r} spans {end - start} bytes but {h['dtype']}{list(shape)} "
                                  f"needs {want}: corrupt file")
        if base + end > size:
            raise CheckpointError(f"{path}: tensor {name!r} ends at byte {base + end} but the file has only {size} "
                                  f"bytes: the file is truncated (re-download or re-save it)")
        entries[name] = Entry(path, name, dtype, shape, base + start, base + end)
    return entries, meta


def read_into(f, e: Entry, out: torch.Tensor) -> torch.Tensor:
    """Read entry `e` from the open file `f` into the CPU tensor `out` (same dtype, contiguous), no extra copy."""
    buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
    if buf is None:
        return out
    f.seek(e.start)
    got = f.readinto(memoryview(buf))
    if got != e.nbytes:
        raise CheckpointError(f"{e.file}: tensor {e.name!r}: read {got} of {e.nbytes} bytes (file changed or truncated)")
    return out


def read_tensor(f, e: Entry) -> torch.Tensor:
    return read_into(f, e, torch.empty(e.shape, dtype=e.dtype))


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file tensor by tensor (views of shared storage are fine: each is written as its own
    bytes). The header is padded to 8 bytes as the reference implementation does. Not fsynced here: files are
    written inside `qiusuo.io.atomic_dir`, which syncs the whole folder before it takes its name."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            if t.numel():
                t = t.detach().to("cpu").contiguous()
                f.write(memoryview(t.view(-1).view(torch.uint8).numpy()))
