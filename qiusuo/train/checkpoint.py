"""Training checkpoints: atomic, verifiable, and enough to continue a run bit for bit.

Layout: `RUN/checkpoints/step_000500/`
    model.safetensors    weights in the Hugging Face layout, with config.json beside them (a loadable model folder);
                         a run training adapters (`[lora]`) holds them instead, in peft's format
                         (adapter_config.json + adapter_model.safetensors): the frozen base is the run's input folder
    optimizer.pt         AdamW state (tensors and numbers only: loads with `weights_only=True`)
    trainer.pt           step, elapsed seconds, data-loader position, RNG states
    run.toml             the exact run config
    meta.json            step, code version, and the sha256 + size of every file above; written last

Why this shape: a checkpoint is written into `.tmp-step_...`, every file fsynced, the folder renamed into place and
the parent fsynced (`qiusuo.io.atomic_dir`), so a crash leaves either the old set of checkpoints or the new one,
never a half folder under a real name. `meta.json` (last file, with hashes) lets `load` tell a complete
checkpoint from a damaged one even when the damage happened after the rename (a truncated copy, a full disk on
another machine).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import time
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from qiusuo.hf.names import from_hf_state_dict
from qiusuo.hf.save import save_hf, write_hf
from qiusuo.io import CheckpointError, atomic_dir

__all__ = ["CheckpointError", "code_version", "complete_checkpoints", "load", "load_weights", "resolve", "save",
           "save_weights", "verify"]

META = "meta.json"
ADAPTER = "adapter_config.json"
PREFIX = "step_"
PACKAGE = Path(__file__).resolve().parent.parent  # the qiusuo package folder


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _version() -> str:
    """The installed distribution's version (pyproject.toml); "0.1.0" when run from a bare source tree."""
    try:
        return importlib.metadata.version("qiusuo")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0"


def code_version() -> dict:
    """qiusuo's version, the git commit (and whether the tree was dirty) when run from a checkout, and a hash
    of the package's .py files, which identifies the code even outside git."""
    root = PACKAGE
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.py")):
        h.update(str(p.relative_to(root)).encode())
        h.update(p.read_bytes())
    out = {"qiusuo": _version(), "torch": torch.__version__, "source_sha256": h.hexdigest()}
    try:
        git = ["git", "-C", str(root.parent)]
        out["git_commit"] = subprocess.run(git + ["rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        out["git_dirty"] = bool(subprocess.run(git + ["status", "--porcelain", "--", "qiusuo"], capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return out


def save_weights(model: nn.Module, path: Path, tokenizer=None) -> Path:
    """Weights in the Hugging Face layout (`qiusuo.hf.save_hf`: model.safetensors, config.json) as the folder
    `path`, written atomically (replacing one already there): the run's final model, which `qiusuo.load_model`,
    `qiusuo chat` and transformers read. Checkpoints hold the same files (`write_hf` in `save`)."""
    return save_hf(model, path, tokenizer=tokenizer, progress=False)


def load_weights(model: nn.Module, path: Path) -> None:
    """Inverse of `save_weights` into an existing model (routing biases included: they are persistent buffers)."""
    if (path / ADAPTER).is_file():  # a run training adapters over a frozen base (qiusuo.lora.train)
        from qiusuo.lora.peft import load_adapter

        load_adapter(model, path)
        return
    device = str(next(model.parameters()).device)
    tensors = {}
    for f in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(f, device=device))
    try:
        from_hf_state_dict(model, tensors, strict=True)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} does not match the model ({e}); resume with the run config saved in "
                              f"{path}/run.toml") from e


def save(run_dir: str | os.PathLike, step: int, model: nn.Module, optimizer: torch.optim.Optimizer | dict,
         trainer_state: dict, run_toml: str, keep: int) -> Path:
    """Write checkpoint `step` atomically under RUN/checkpoints and keep only the last `keep` written (so never
    this one). Returns its path.
    `optimizer`: the optimizer or its state dict (the distributed trainer passes the gathered full state).
    A write that fails leaves its `.tmp-step_N-PID` folder, as a crash would, for `resolve` to report."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:06d}"
    with atomic_dir(final, tmp_name=f".tmp-{final.name}-{os.getpid()}", keep_on_error=True) as tmp:
        _write_weights(model, tmp)
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(trainer_state, tmp / "trainer.pt")
        (tmp / "run.toml").write_text(run_toml)
        files = {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())}
        meta = {"step": step, "written": time.time(), "code": code_version(), "files": files}
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    for old in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def _write_weights(model: nn.Module, folder: Path) -> None:
    """What trains: the whole model, or with adapters only them (the base never changes, so it is not copied)."""
    from qiusuo.lora import train as lora

    if lora.has_adapters(model):
        lora.write(model, folder)
    else:
        write_hf(model, folder, progress=False)


def _written(path: Path) -> tuple[float, int]:
    """When a checkpoint was written (meta.json's own record, kept by copies; else the file's time), then its step."""
    try:
        meta = json.loads((path / META).read_text())
        return float(meta.get("written", (path / META).stat().st_mtime)), int(meta.get("step", 0))
    except (OSError, ValueError):
        return (path / META).stat().st_mtime, 0


def complete_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders with a meta.json, in the order they were written, oldest first (no hashing: `verify`
    does that). Written order, not step order: a run resumed from an earlier checkpoint writes lower step numbers
    after higher ones, and its new checkpoints are the ones to keep and to resume from."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.name.startswith(PREFIX) and (p / META).is_file()), key=_written)


def verify(path: Path) -> dict:
    """meta.json of a complete, undamaged checkpoint; `CheckpointError` naming the problem otherwise."""
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {META}: its writing was interrupted); "
                              f"resume from an earlier checkpoint in {path.parent}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{meta_path} is damaged ({e}); resume from an earlier checkpoint") from e
    for name, info in meta["files"].items():
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"{p} is missing; the checkpoint is incomplete, resume from an earlier one")
        if p.stat().st_size != info["bytes"] or _sha256(p) != info["sha256"]:
            raise CheckpointError(f"{p} does not match its hash in {META} (truncated or modified); "
                                  f"resume from an earlier checkpoint")
    return meta


def resolve(path: str | os.PathLike) -> Path:
    """`--resume` accepts a run folder (-> its latest written complete checkpoint) or one checkpoint folder. Interrupted
    writes (`.tmp-*` folders) are reported and skipped."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a run folder or one of its checkpoints/step_* folders")
    if (path / "checkpoints").is_dir() or path.name == "checkpoints":
        run_dir = path.parent if path.name == "checkpoints" else path
        partial = sorted(p.name for p in (run_dir / "checkpoints").glob(".tmp-*"))
        done = complete_checkpoints(run_dir)
        if partial:
            warnings.warn(f"{run_dir}/checkpoints holds interrupted checkpoint writes {partial}; they are ignored"
                          + (f", resuming from {done[-1].name}" if done else ""), stacklevel=2)
        if not done:
            raise CheckpointError(f"{run_dir}/checkpoints holds no complete checkpoint to resume from")
        return done[-1]
    return path


def load(path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Verify, then restore weights (and optimizer state); returns the trainer state dict saved with it."""
    path = resolve(path)
    verify(path)
    load_weights(model, path)
    device = next(model.parameters()).device
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=device, weights_only=True))
    state = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    state["path"] = str(path)
    return state
