"""A run folder: what a run writes there, claiming one for a new run without overwriting another, and finding
the run folder a `--resume` path belongs to.

Layout (`qiusuo train`, `sft`, `grpo`, `demo`): run.toml (the exact config, every path absolute), metrics.jsonl,
plots (*.png), tensorboard/, checkpoints/step_N/ (`qiusuo.train.checkpoint`), model/ (the exported final model;
adapter/ instead for a run that trains LoRA adapters).

Why refuse rather than overwrite: a second `qiusuo train` into the demo's folder used to replace its model,
metrics and plots silently (the plots then joined two runs in one line). A new run into a folder that holds
another refuses unless asked (`--overwrite`, which removes only the files a run writes), and `--resume DIR`
continues in DIR itself, wherever the command runs from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# what a run writes at the top of its folder: the names `--overwrite` removes (nothing else is touched)
RUN_FILES = ("run.toml", "metrics.jsonl", "checkpoints", "model", "adapter", "tensorboard", "loss.png", "lr.png",
             "throughput.png", "expert_load.png", "reward.png", "grpo.png")
MARKERS = ("run.toml", "metrics.jsonl", "checkpoints", "model")  # any of these: the folder holds a run


def holds_run(path: str | os.PathLike) -> bool:
    path = Path(path)
    return any((path / name).exists() for name in MARKERS)


def describe(path: Path) -> str:
    """A few words on the run in `path`: its last logged step, for the refusal message."""
    steps = []
    try:
        for line in (path / "metrics.jsonl").read_text().splitlines()[-50:]:
            steps.append(json.loads(line).get("step", 0))
    except (OSError, ValueError):
        pass
    return f"a run (last logged step {max(steps)})" if steps else "a run"


def claim(path: str | os.PathLike, overwrite: bool, flag: str = "--overwrite") -> Path:
    """Make `path` the folder of a new run: created if missing; if it holds another run, `ValueError` naming the
    ways on (continue it, write elsewhere, replace it), or with `overwrite` the old run's files removed first."""
    path = Path(path)
    if holds_run(path):
        if not overwrite:
            raise ValueError(f"{path} already holds {describe(path)}; continue it with --resume {path}, write this "
                             f"run elsewhere with --run.out_dir=NEW_FOLDER, or replace it with {flag}")
        for name in RUN_FILES:
            p = path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()
    path.mkdir(parents=True, exist_ok=True)
    return path


def fresh(path: str | os.PathLike) -> Path:
    """`path`, or the first of `path-2`, `path-3`, ... that holds no run (the demo's choice: a second demo keeps
    the first one's results)."""
    path = Path(path)
    n = 2
    candidate = path
    while holds_run(candidate):
        candidate = path.with_name(f"{path.name}-{n}")
        n += 1
    return candidate


def of_resume(path: str | os.PathLike) -> Path:
    """The run folder a `--resume` argument belongs to: a run folder itself, its `checkpoints` folder, or one of
    its `checkpoints/step_N` folders (a checkpoint copied out on its own is its own folder)."""
    path = Path(path)
    if path.name == "checkpoints":
        return path.parent
    if path.parent.name == "checkpoints":
        return path.parent.parent
    return path
