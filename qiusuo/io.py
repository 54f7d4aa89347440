"""Durable writes and the one checkpoint error: every file or folder qiusuo writes for later (tokenizers, token
shards, model folders, training checkpoints) goes through these helpers, so a crash leaves the old version or the
new one, never half of one.

Why rename: a temporary sibling in the same folder (same filesystem, so `os.replace` is atomic) is written and
fsynced first, then renamed over the real name, then the folder is fsynced, because the directory entry is data
too: without that a power loss can forget the rename.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Iterator


class CheckpointError(ValueError):
    """A checkpoint or model folder that is missing, incomplete, damaged or does not fit the model; the message
    names the file (and the tensor) and what to do. A ValueError: it is bad input, not a bug."""


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file that is already written and closed to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or a new file in `path` durable (the directory entry itself is data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` (str: as UTF-8) to `path`: temporary sibling + fsync + rename + fsync of the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def replace_dir(src: Path, dst: Path) -> None:
    """Rename the finished folder `src` to `dst`. An existing `dst` is first renamed aside and removed only after
    the swap, so at every instant one complete folder carries the name (or, on a first write, none does)."""
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, tmp_name: str | None = None, keep_on_error: bool = False) -> Iterator[Path]:
    """`with atomic_dir(path) as tmp:` write files into the fresh folder `tmp` (plain writes: no fsync needed);
    when the block ends, every file in it and the folder are fsynced and it replaces `path` (`replace_dir`).

    tmp_name: the temporary folder's name beside `path` (default `.NAME.tmp-PID`); training checkpoints use
        `.tmp-step_N-PID`, which `qiusuo.train.checkpoint.resolve` recognises as an interrupted write.
    keep_on_error: leave `tmp` behind when the block raises, as a crash would (checkpoints: so the next
        `--resume` reports it); otherwise it is removed.
    """
    path = Path(path)
    tmp = path.parent / (tmp_name or f".{path.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        for p in sorted(tmp.rglob("*"), reverse=True):  # files before the folders that hold them
            if p.is_dir():
                fsync_dir(p)
            else:
                fsync_file(p)
        fsync_dir(tmp)
        replace_dir(tmp, path)
    except BaseException:
        if not keep_on_error:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
