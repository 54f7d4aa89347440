"""Metrics: one JSON object per line in RUN/metrics.jsonl (TensorBoard as well when it is installed), and PNG plots
drawn from that file alone, so `plot_run` works on a finished, crashed or still-running run.

Record kinds: `train` (step, loss, ce, mtp, lr, tokens_per_s, mfu, grad_norm, max_vio per MoE layer, load per MoE
layer and expert summed over the logging interval), `val` (step, loss, bpb), `sample` (step, prompt, text).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

FILE = "metrics.jsonl"


class MetricsLog:
    """Appends records to RUN/metrics.jsonl. On resume from step S, lines past S (written by the interrupted
    run after its last checkpoint) are dropped so the log tells one consistent story."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(run_dir) / FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            self.path.write_text("".join(line + "\n" for line in keep))
        self._f = open(self.path, "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional
                pass

    def log(self, kind: str, step: int, **values) -> None:
        self._f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")
        self._f.flush()
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def read(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(run_dir: str | os.PathLike, unigram_bpb: float | None = None) -> list[Path]:
    """Draw loss.png (train and validation loss, validation bits per byte against the unigram baseline), lr.png,
    throughput.png and, for MoE models, expert_load.png (per layer: load/mean per expert over time, and MaxVio).
    Returns the paths written."""
    run_dir = Path(run_dir)
    recs = read(run_dir)
    train = [r for r in recs if r["kind"] == "train"]
    val = [r for r in recs if r["kind"] == "val"]
    if not train:
        return []
    steps = [r["step"] for r in train]
    out = []

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(steps, [r["ce"] for r in train], label="train", lw=1)
    if val:
        a1.plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="validation")
        a2.plot([r["step"] for r in val], [r["bpb"] for r in val], "o-", color="C1", label="model")
    if unigram_bpb is not None:
        a2.axhline(unigram_bpb, color="gray", ls="--", label=f"unigram {unigram_bpb:.3f}")
    a1.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    a2.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    a1.legend()
    a2.legend()
    out.append(_save(fig, run_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["lr"] for r in train])
    ax.set(xlabel="step", ylabel="learning rate", title="learning rate")
    out.append(_save(fig, run_dir / "lr.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["tokens_per_s"] for r in train])
    ax.set(xlabel="step", ylabel="tokens/s", title="training throughput", ylim=(0, None))
    out.append(_save(fig, run_dir / "throughput.png"))

    loads = [r for r in train if r.get("load")]
    if loads:
        L = len(loads[0]["load"])
        fig, axes = plt.subplots(L, 1, figsize=(9, 2.6 * L), squeeze=False)
        for i, ax in enumerate(axes[:, 0]):
            load = np.array([r["load"][i] for r in loads], dtype=float).T  # (E, time)
            rel = load / np.maximum(load.mean(0, keepdims=True), 1e-9)
            s = [r["step"] for r in loads]
            im = ax.imshow(rel, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                           extent=(s[0], s[-1], -0.5, rel.shape[0] - 0.5))
            fig.colorbar(im, ax=ax, label="load / mean", pad=0.08)
            tw = ax.twinx()
            tw.plot(s, [r["max_vio"][i] for r in loads], color="white", lw=1.5)
            tw.plot(s, [r["max_vio"][i] for r in loads], color="red", lw=0.8, label="MaxVio")
            tw.set_ylabel("MaxVio", color="red")
            tw.set_ylim(0, None)
            ax.set(ylabel="expert", title=f"MoE layer {i}: expert load over time (MaxVio in red)")
        axes[-1, 0].set_xlabel("step")
        out.append(_save(fig, run_dir / "expert_load.png"))
    return out
