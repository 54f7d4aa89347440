"""Token shards on disk, and the batches the trainer reads from them.

Layout of one split folder (e.g. `OUT/train/`):
    shard_00000.bin   tokens, uint16 while the vocabulary fits (<= 65536 ids), else uint32; documents are
                      concatenated, each followed by the end-of-text id
    shard_00000.idx   uint64 document boundaries inside that shard: doc i is tokens[idx[i]:idx[i+1]]
                      (its last token is the end-of-text id); len = documents + 1
    manifest.json     documents, tokens, bytes (UTF-8 bytes of the source text, for bits per byte), dtype,
                      shard list, sha256 of the tokenizer.json that made them

Why memmap + fixed windows: a memmap costs no RAM until read and no parse at start-up; the loader cuts the token
stream into non-overlapping windows of T+1 tokens and permutes them per epoch with a seeded generator, so each
token is seen once per epoch and the position in that order is the whole loader state (exact resume).
Windows cross document boundaries on purpose (as in GPT-2/nanoGPT pretraining): the end-of-text id separates
them, and no padding is wasted.

Legend: B = rows per rank, W = world size, G = B * W rows per global batch, T = sequence length.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from qiusuo.io import write_atomic

MANIFEST = "manifest.json"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 halves disk and page-cache use for every vocabulary up to 65536 ids."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def write_shards(
    out_dir: str | os.PathLike,
    docs: Iterable[tuple[list[int], int]],
    *,
    vocab_size: int,
    eos_id: int,
    tokenizer_sha256: str,
    shard_tokens: int = 100_000_000,
) -> dict:
    """Write `(token ids, source UTF-8 byte count)` documents as shards of about `shard_tokens` tokens.

    A document never straddles two shards (a shard closes after the document that fills it), so each shard
    and its `.idx` stand alone. The manifest is written last: a folder with a manifest is complete.
    Returns the manifest.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    shards, buf, bounds = [], [], [0]  # bounds: doc starts within the current shard, then its end
    totals = {"documents": 0, "tokens": 0, "bytes": 0}

    def flush():
        name = f"shard_{len(shards):05d}"
        tokens = np.concatenate(buf).astype(dtype) if buf else np.zeros(0, dtype)
        write_atomic(out / f"{name}.bin", tokens.tobytes())
        write_atomic(out / f"{name}.idx", np.asarray(bounds, dtype=np.uint64).tobytes())
        shards.append({"tokens": f"{name}.bin", "index": f"{name}.idx", "documents": len(bounds) - 1, "num_tokens": int(bounds[-1])})

    for ids, n_bytes in docs:
        doc = np.asarray([*ids, eos_id], dtype=np.int64)  # (n+1,)
        if doc.size and (doc.min() < 0 or doc.max() >= vocab_size):
            raise ValueError(f"token id out of range for vocab_size {vocab_size}")
        buf.append(doc)
        bounds.append(bounds[-1] + doc.size)
        totals["documents"] += 1
        totals["tokens"] += doc.size
        totals["bytes"] += n_bytes
        if bounds[-1] >= shard_tokens:
            flush()
            buf, bounds = [], [0]
    if len(bounds) > 1 or not shards:
        flush()
    manifest = {
        **totals,
        "dtype": dtype.name,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "tokenizer_sha256": tokenizer_sha256,
        "shards": shards,
    }
    write_atomic(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


class TokenShards:
    """A split folder opened read-only: `.tokens` is the whole token stream (N,), `.doc_bounds` (D+1,) the
    global document boundaries."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path} not found; run `qiusuo prepare` to make token shards")
        self.manifest = json.loads(manifest_path.read_text())
        dtype = np.dtype(self.manifest["dtype"])
        parts, bounds, offset = [], [np.zeros(1, np.uint64)], 0
        for shard in self.manifest["shards"]:
            parts.append(np.memmap(self.path / shard["tokens"], dtype=dtype, mode="r") if shard["num_tokens"] else np.zeros(0, dtype))
            idx = np.fromfile(self.path / shard["index"], dtype=np.uint64)
            bounds.append(idx[1:] + np.uint64(offset))
            offset += shard["num_tokens"]
        # one shard (the usual case at our sizes) stays a zero-copy memmap; several are joined in RAM
        self.tokens = parts[0] if len(parts) == 1 else np.concatenate(parts)  # (N,)
        self.doc_bounds = np.concatenate(bounds)  # (D+1,)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_bytes(self) -> int:
        return self.manifest["bytes"]

    @property
    def bytes_per_token(self) -> float:
        """Converts a per-token loss to bits per byte: bpb = loss_nats / ln 2 / bytes_per_token."""
        return self.manifest["bytes"] / max(1, self.manifest["tokens"])

    def document(self, i: int) -> np.ndarray:
        """Tokens of document i, ending with the end-of-text id."""
        return np.asarray(self.tokens[int(self.doc_bounds[i]) : int(self.doc_bounds[i + 1])])


class BatchLoader:
    """Endless `(x, y)` int64 batches of shape (B, T), y = x shifted left by one token.

    The global order is a list of windows (window k = tokens[k*T : k*T + T + 1]); epoch e visits them in a
    permutation seeded by (seed, e), or in order when `shuffle=False`. Step s takes global positions
    [s*G, (s+1)*G) and rank r takes the contiguous rows r*B:(r+1)*B of them, so W ranks of B rows see exactly
    the rows of one rank with W*B, in the same order: data-parallel training matches single-process training.
    The state is only the global position, so a run may even resume with a different world size as long as
    the global batch G is unchanged.
    """

    def __init__(
        self,
        shards: TokenShards,
        batch_size: int,
        seq_len: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.tokens = shards.tokens
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.global_batch = batch_size * world_size
        self.num_windows = (len(self.tokens) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"{shards.path} has {len(self.tokens)} tokens, fewer than one window of seq_len + 1 = {seq_len + 1}")
        self.position = 0  # global windows consumed so far, across epochs
        self._epoch, self._order = -1, None

    @property
    def steps_per_epoch(self) -> int:
        """Full global batches in one pass (a sequential evaluation reads this many)."""
        return self.num_windows // self.global_batch

    def _windows(self, positions: np.ndarray) -> np.ndarray:
        """Window indices at global positions (G,) -> (G,)."""
        epochs, offsets = np.divmod(positions, self.num_windows)
        if not self.shuffle:
            return offsets
        out = np.empty_like(positions)
        for e in np.unique(epochs):  # at most two epochs meet inside one batch
            if e != self._epoch:
                self._epoch, self._order = int(e), np.random.default_rng([self.seed, int(e)]).permutation(self.num_windows)
            out[epochs == e] = self._order[offsets[epochs == e]]
        return out

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.position + self.rank * self.batch_size
        windows = self._windows(np.arange(first, first + self.batch_size))  # (B,)
        self.position += self.global_batch
        rows = windows[:, None] * self.seq_len + np.arange(self.seq_len + 1)  # (B, T+1)
        buf = torch.from_numpy(self.tokens[rows].astype(np.int64))  # (B, T+1)
        return buf[:, :-1], buf[:, 1:]  # (B, T), (B, T)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len, "global_batch": self.global_batch,
                "shuffle": self.shuffle, "num_windows": self.num_windows}

    def load_state_dict(self, state: dict) -> None:
        """Resume exactly; refuses a state from a loader that would cut or order the windows differently."""
        for key in ("seed", "seq_len", "global_batch", "shuffle", "num_windows"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={state[key]!r} but this loader has {getattr(self, key)!r}; resume with the same data settings")
        self.position = int(state["position"])


def unigram_bits_per_byte(train: TokenShards, val: TokenShards, vocab_size: int) -> float:
    """Bits per byte of an add-one smoothed unigram model fit on train, scored on val: the floor any trained
    model must beat, in the same unit as the model's validation bpb."""
    counts = np.bincount(np.asarray(train.tokens), minlength=vocab_size).astype(np.float64) + 1.0  # (V,)
    log2_p = np.log2(counts / counts.sum())  # (V,)
    val_counts = np.bincount(np.asarray(val.tokens), minlength=vocab_size)  # (V,)
    return float(-(val_counts * log2_p).sum() / max(1, val.num_bytes))
