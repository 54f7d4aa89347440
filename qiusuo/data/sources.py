"""Text sources: files, folders, `.jsonl` and `.parquet`, read into `Document`s in a fixed order.

Why the defaults are what they are:
- The default corpus is the running interpreter's own standard library (`.py` files): it is on every machine,
  needs no download, is ~12 MB of real, varied text, and is deterministic for a given Python build.
- Documents are whole files (or one `.jsonl` line / `.parquet` row), read as bytes and decoded as strict UTF-8,
  so the text is exactly what is on disk (no newline translation) and `bytes` in the manifests is honest for
  bits-per-byte.
- The train/validation split hashes each document's *key* (its path relative to the source, or
  `file:index` for rows), so it does not depend on the order or number of other documents, and a file is never
  in both splits.
- Hidden folders (`.git`, `.venv`) and `__pycache__` are never walked.
- Everything is sorted; two runs over the same tree give the same documents in the same order.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sysconfig
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# folders never read from the default (stdlib) source: installed packages and the test suites, which hold
# deliberately odd files (bad encodings, huge generated data) that do not look like the code we want to model
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"})


class DataError(ValueError):
    """A problem with the input corpus; the message names the file and what to do about it."""


class NotTextError(DataError):
    """A file that is binary or not UTF-8: skipped inside folders, an error when named explicitly."""


@dataclass(frozen=True)
class Document:
    """One training document. `key` decides the split (stable across machines: no absolute paths)."""

    key: str
    text: str


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, include: Sequence[str], exclude_dirs: frozenset[str]) -> list[Path]:
    """Files under `root` matching any `include` glob (on the file name or the relative path), sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in exclude_dirs and not d.startswith("."))
        for name in filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if not include or any(fnmatch.fnmatchcase(name, g) or fnmatch.fnmatchcase(rel, g) for g in include):
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; check that it exists and is readable") from e


def _decode(path: Path, data: bytes) -> str:
    """Strict UTF-8 text, or DataError naming the file: NUL bytes or bad UTF-8 mean it is not text."""
    if b"\0" in data:
        raise NotTextError(f"{path} is a binary file (it contains NUL bytes); pass text files, or a folder with --include")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise NotTextError(f"{path} is not UTF-8 text (invalid byte at offset {e.start}); convert it to UTF-8 or leave it out") from e


def _jsonl_documents(path: Path, key: str, field: str) -> Iterator[Document]:
    text = _decode(path, _read_bytes(path))
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); each line must be one JSON object") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object with field {field!r}, got {type(row).__name__}")
        if field not in row:
            raise DataError(f"{path}:{lineno}: field {field!r} is missing; the line has keys {sorted(row)}; choose one with --jsonl-field")
        value = row[field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno}: field {field!r} is a {type(value).__name__}, not a string")
        yield Document(f"{key}:{lineno}", value)


def _parquet_documents(path: Path, key: str, column: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"cannot read {path} as parquet: {e}") from e
    names = pf.schema_arrow.names
    if column not in names:
        raise DataError(f"{path}: column {column!r} is missing; the file has columns {names}; choose one with --parquet-column")
    index = 0
    for batch in pf.iter_batches(columns=[column]):
        for value in batch.column(0).to_pylist():
            if value is not None and not isinstance(value, str):
                raise DataError(f"{path}: row {index} of column {column!r} is a {type(value).__name__}, not a string")
            yield Document(f"{key}:{index}", value or "")
            index += 1


def _file_documents(path: Path, key: str, jsonl_field: str, parquet_column: str) -> Iterator[Document]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        yield from _jsonl_documents(path, key, jsonl_field)
    elif suffix == ".parquet":
        yield from _parquet_documents(path, key, parquet_column)
    else:
        yield Document(key, _decode(path, _read_bytes(path)))


def iter_documents(
    sources: Sequence[str | os.PathLike] | None = None,
    include: Sequence[str] | None = None,
    jsonl_field: str = "text",
    parquet_column: str = "text",
) -> Iterator[Document]:
    """Documents from `sources` in a fixed order; the stdlib's `.py` files when `sources` is empty.

    Empty (whitespace-only) documents are dropped: they carry no signal and would only add separators.
    In a folder, binary files are skipped with one warning that counts them (folders often hold images or
    build outputs); a binary file named explicitly is an error, since the user asked for it.
    """
    if not sources:
        roots = [(stdlib_dir(), list(include or ["*.py"]), STDLIB_EXCLUDED_DIRS)]
    else:
        roots = [(Path(s), list(include or []), frozenset({"__pycache__"})) for s in sources]
    for root, globs, exclude_dirs in roots:
        if root.is_dir():
            skipped = []
            for path in _walk(root, globs, exclude_dirs):
                key = path.relative_to(root).as_posix()
                try:
                    docs = list(_file_documents(path, key, jsonl_field, parquet_column))
                except NotTextError:
                    skipped.append(key)
                    continue
                yield from (d for d in docs if d.text.strip())
            if skipped:
                warnings.warn(f"skipped {len(skipped)} binary or non-UTF-8 file(s) under {root}, e.g. {skipped[0]}; narrow the folder with --include", stacklevel=2)
        elif root.exists():
            yield from (d for d in _file_documents(root, root.name, jsonl_field, parquet_column) if d.text.strip())
        else:
            raise DataError(f"source {root} does not exist; pass a file or folder path")


def split_score(key: str, seed: int) -> float:
    """A uniform number in [0, 1) from the key alone: which split a document lands in never depends on others."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(docs: Sequence[Document], val_fraction: float, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """(train, val) by hash of each key. Small corpora where no key falls under `val_fraction` still get one
    validation document (the lowest score), so evaluation always has something to read."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if len(docs) < 2:
        raise DataError(f"the corpus has {len(docs)} non-empty document(s); at least 2 are needed for a train/validation split")
    scores = [split_score(d.key, seed) for d in docs]
    is_val = [s < val_fraction for s in scores]
    if not any(is_val):
        is_val[min(range(len(docs)), key=scores.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(docs)), key=scores.__getitem__)] = False
    train = [d for d, v in zip(docs, is_val) if not v]
    val = [d for d, v in zip(docs, is_val) if v]
    return train, val
