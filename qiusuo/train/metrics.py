"""Metrics: one JSON object per line in RUN/metrics.jsonl (TensorBoard as well when it is installed), and PNG plots
drawn from that file alone, so `plot_run` works on a finished, crashed or still-running run.

Record kinds: `train` (step, loss, ce, mtp, lr, tokens_per_s, mfu, grad_norm, max_vio per MoE layer, load per MoE
layer and expert summed over the logging interval), `val` (step, loss, bpb), `sample` (step, prompt, text).
"""

from __future__ import annotations

import json
import os
import tomllib
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


def _run_config(run_dir: Path) -> dict:
    """The run's run.toml as a dict ({} when absent or unreadable): the plots read the warmup length and the
    checkpoint interval from it, which metrics.jsonl does not hold."""
    try:
        return tomllib.loads((run_dir / "run.toml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}


def split_validation(val: list[dict], last_step: int | None) -> tuple[list[dict], dict | None]:
    """(periodic validation records, the final one or None). The final evaluation reads the whole split, the
    periodic ones `eval.batches` batches, so the final is its own point, not the end of the periodic line. It is
    the record at the run's last logged step (periodic evaluations skip the last step) that read more tokens than
    the periodic ones: a run plotted while still going can have a periodic record at its latest step too."""
    if not val or val[-1]["step"] != last_step:
        return val, None
    rest = val[:-1]
    if rest and val[-1].get("tokens", 0) <= max(r.get("tokens", 0) for r in rest):
        return val, None  # periodic evaluations of the whole split: one kind of point
    return rest, val[-1]


Points = list[tuple[int, float]]  # (step, value)


def throughput_points(train: list[dict], event_steps: set[int]) -> tuple[Points, Points]:
    """(steady intervals, intervals that also paid for an evaluation, sample or checkpoint), each as (step,
    tokens/s). A train record's tokens/s is measured over the wall time since the previous record, so an
    evaluation run at step e (after that step's record) slows the interval that ends at the next record: those
    are excluded from the line and drawn apart, rather than smoothed (a median would hide a real slowdown just as
    well). The last interval of a run that stopped between log steps (the time budget) has fewer steps: it is
    dropped, as one short interval measures the run's end, not its speed."""
    points = [(r["step"], r["tokens_per_s"]) for r in train]
    if len(train) >= 3:
        gaps = [b["step"] - a["step"] for a, b in zip(train, train[1:])]
        if gaps[-1] < sorted(gaps)[len(gaps) // 2]:
            points = points[:-1]
    steady, slowed = [], []
    prev = 0
    for step, tps in points:
        (slowed if any(prev <= e < step for e in event_steps) else steady).append((step, tps))
        prev = step
    return steady, slowed


def warmup_hidden(train: list[dict], warmup_steps: int) -> bool:
    """Whether the logged lr points cannot show the warmup: fewer than two of them fall within it (the lr is
    logged every `train.log_every` steps, so a warmup shorter than that is at most one point)."""
    return warmup_steps > 0 and sum(r["step"] <= warmup_steps for r in train) < 2


def moe_layer_titles(conf: dict, n: int) -> list[str]:
    """A title per row of expert_load.png: "MoE layer i", with the model layer it is ("model layer 1": the first
    layers are dense) when run.toml's [model] builds a config with `n` MoE layers."""
    from qiusuo.config import get_config

    titles = [f"MoE layer {i}" for i in range(n)]
    if "model" not in conf:  # no run.toml: the model is unknown
        return titles
    model = dict(conf["model"])
    try:
        cfg = get_config(model.pop("preset", "demo"), **model)
    except (KeyError, TypeError, ValueError):
        return titles
    layers = [i for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers) if cfg.is_moe_layer(i)]
    if len(layers) < n:
        return titles
    return [f"{t} (model layer {j}{', MTP' if j >= cfg.num_hidden_layers else ''})" for t, j in zip(titles, layers)]


def plot_run(run_dir: str | os.PathLike, unigram_bpb: float | None = None) -> list[Path]:
    """Draw loss.png (train and validation loss, validation bits per byte against the unigram baseline; the final
    whole-split evaluation as its own point, `split_validation`), lr.png (log-scale steps, so the warmup is not a
    sliver; when the logged points cannot show it the title says so, `warmup_hidden`), throughput.png (intervals
    with an evaluation, sample or checkpoint drawn apart, the partial last one dropped: `throughput_points`) and,
    for MoE models, expert_load.png (per MoE layer, named with its model layer when run.toml says: load/mean per
    expert over time, every expert's row labelled, and MaxVio). Returns the paths written."""
    run_dir = Path(run_dir)
    recs = read(run_dir)
    train = [r for r in recs if r["kind"] == "train"]
    val = [r for r in recs if r["kind"] == "val"]
    if not train:
        return []
    conf = _run_config(run_dir)
    steps = [r["step"] for r in train]
    out = []

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot(steps, [r["ce"] for r in train], label="train", lw=1)
    periodic, final = split_validation(val, steps[-1])
    if periodic:
        a1.plot([r["step"] for r in periodic], [r["loss"] for r in periodic], "o-", color="C1",
                label="validation (periodic, part of the split)")
        a2.plot([r["step"] for r in periodic], [r["bpb"] for r in periodic], "o-", color="C1",
                label="model (periodic, part of the split)")
    if final is not None:
        for ax, key in ((a1, "loss"), (a2, "bpb")):
            ax.plot([final["step"]], [final[key]], "*", ms=13, color="C3", label=f"final, whole split {final[key]:.3f}")
    if unigram_bpb is not None:
        a2.axhline(unigram_bpb, color="gray", ls="--", label=f"unigram {unigram_bpb:.3f}")
    a1.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    a2.set(xlabel="step", ylabel="bits per byte", title="validation bits per byte")
    for ax in (a1, a2):
        if ax.get_legend_handles_labels()[0]:  # a run not evaluated yet has nothing on the right
            ax.legend()
    out.append(_save(fig, run_dir / "loss.png"))

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [r["lr"] for r in train], ".-")
    ax.set_xscale("log")
    warmup = int(conf.get("schedule", {}).get("warmup_steps", 0))
    title = "learning rate"
    if warmup_hidden(train, warmup):
        every = conf.get("train", {}).get("log_every", steps[0])
        title += f"\nwarmup ({warmup} steps) not shown: the lr is logged every {every} steps"
    elif warmup:
        ax.axvline(warmup, color="gray", ls=":", label=f"end of warmup (step {warmup})")
        ax.legend()
    ax.set(xlabel="step (log scale)", ylabel="learning rate", title=title)
    out.append(_save(fig, run_dir / "lr.png"))

    events = {r["step"] for r in recs if r["kind"] in ("val", "sample")}
    ckpt_every = int(conf.get("checkpoint", {}).get("every", 0))
    events |= set(range(ckpt_every, steps[-1] + 1, ckpt_every)) if ckpt_every > 0 else set()
    steady, slowed = throughput_points(train, events)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if steady:
        ax.plot(*zip(*steady), ".-", label="tokens/s per logging interval")
    if slowed:
        ax.plot(*zip(*slowed), "x", color="gray", label="interval with an evaluation, sample or checkpoint")
    ax.set(xlabel="step", ylabel="tokens/s", title="training throughput", ylim=(0, None))
    ax.legend(loc="lower right", fontsize=8)
    out.append(_save(fig, run_dir / "throughput.png"))

    loads = [r for r in train if r.get("load")]
    if loads:
        L, E = len(loads[0]["load"]), len(loads[0]["load"][0])
        fig, axes = plt.subplots(L, 1, figsize=(9, min(max(2.6, 0.16 * E + 1), 11.3) * L), squeeze=False)
        tick = -(-E // 64)  # every expert's row labelled up to 64 experts; beyond, every tick-th (they would overlap)
        titles = moe_layer_titles(conf, L)
        for i, ax in enumerate(axes[:, 0]):
            load = np.array([r["load"][i] for r in loads], dtype=float).T  # (E, time)
            rel = load / np.maximum(load.mean(0, keepdims=True), 1e-9)
            s = [r["step"] for r in loads]
            im = ax.imshow(rel, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                           extent=(s[0], s[-1], -0.5, rel.shape[0] - 0.5))
            fig.colorbar(im, ax=ax, label="load / mean", pad=0.08)
            ax.set_yticks(range(0, E, tick), [str(e) for e in range(0, E, tick)], fontsize=8 if E <= 32 else 5)
            tw = ax.twinx()
            tw.plot(s, [r["max_vio"][i] for r in loads], color="white", lw=1.5)
            tw.plot(s, [r["max_vio"][i] for r in loads], color="red", lw=0.8, label="MaxVio")
            tw.set_ylabel("MaxVio", color="red")
            tw.set_ylim(0, None)
            ax.set(ylabel="expert", title=f"{titles[i]}: expert load over time (MaxVio in red)")
        axes[-1, 0].set_xlabel("step")
        out.append(_save(fig, run_dir / "expert_load.png"))
    return out
