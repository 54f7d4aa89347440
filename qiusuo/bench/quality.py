"""Quality per compute, measured: run configs trained for the same wall-clock budget on the same data, compared
by held-out bits per byte on the whole validation split (`qiusuo bench quality`). By default the arms are a MoE
and its dense twin (the same active parameters per token); `--arm NAME=CONFIG[,section.key=value...]` compares
any set instead (AdamW vs Muon, with and without mHC or hash layers, fp32 vs bf16: `CONFIG` is a run preset or
TOML; `twin:NAME` is the dense twin of arm NAME).

The dense twin is derived from the MoE config (`dense_twin`), not hand-written: every layer becomes a dense MLP
whose width makes the active MLP parameters equal (shared + top-k routed experts + router, averaged over the
layers), with attention, embeddings and head unchanged. So any MoE size (`--model.preset=bench`) gets its own twin.

Why interleaved: the two runs live in one process and take optimizer steps in turn, each step charged to the
model that took it, always stepping the one that has spent less time. On a shared machine the load changes
from minute to minute; two runs back to back would give one of them the quiet minutes. Interleaving exposes
both to the same machine, and both stop when their own budget is spent. Evaluation is not charged (it reads
the same validation tokens for both); the learning-rate schedule of each run follows its own charged time.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from qiusuo.config import ModelConfig
from qiusuo.model.count import count_params
from qiusuo.train.config import RunConfig, add_config_args, load_run_config, overrides


def dense_twin(cfg: ModelConfig) -> dict:
    """Overrides that turn the MoE `cfg` into a dense model with (almost) the same active parameters per token:
    all layers dense, width = the active MLP parameters of the MoE model (dense layers, shared and top-k routed
    experts, routers) spread evenly over the layers. Rounding leaves a gap below one MLP column per layer."""
    from qiusuo.model.block import mlp_kind

    if not cfg.is_moe:
        raise ValueError("dense_twin needs a MoE config (n_routed_experts > 0); the model is already dense")
    if cfg.is_v4:
        raise ValueError("DeepSeek-V4 has no dense layers; compare it with another config as an --arm")
    D, L = cfg.hidden_size, cfg.num_hidden_layers
    active_mlp = 0
    for i in range(L):
        if mlp_kind(cfg, i) != "dense":
            width = ((cfg.n_shared_experts or 0) + cfg.num_experts_per_tok) * cfg.moe_intermediate_size
            active_mlp += 3 * D * width + cfg.n_routed_experts * D  # SwiGLU experts + router
        else:
            active_mlp += 3 * D * cfg.intermediate_size
    return dict(intermediate_size=max(1, round(active_mlp / (3 * D * L))), first_k_dense_replace=L,
                n_routed_experts=None, n_shared_experts=None, num_experts_per_tok=None, n_group=None, topk_group=None,
                mlp_layer_types=None)


@dataclass
class Arm:
    """One side of the comparison: its trainer, the time charged to it, and its validation curve."""

    name: str
    trainer: object  # qiusuo.train.trainer.Trainer
    seconds: float = 0.0  # training time charged so far (evaluation excluded)
    next_eval: float = 0.0
    curve: list = field(default_factory=list)  # {"seconds", "step", "tokens", "loss", "bpb"}
    done: bool = False

    def record(self, batches: int | None) -> dict:
        ev = self.trainer.evaluate(batches)
        point = {"seconds": self.seconds, "step": self.trainer.step, "tokens": self.trainer.step * self.trainer.tokens_per_step,
                 "loss": ev.loss, "bpb": ev.bpb}
        self.curve.append(point)
        return point


def run_config(base: str, settings: dict, data_dir: str, out_dir: Path, minutes: float, steps: int | None,
               model_overrides: dict | None = None) -> RunConfig:
    """The base run config (a preset name or TOML) with the user's `--section.key` settings, this data, this
    budget."""
    cfg = load_run_config(base, settings)
    cfg.data.dir = data_dir
    cfg.run.out_dir = str(out_dir)
    cfg.run.progress = False
    cfg.train.minutes = minutes
    cfg.train.steps = steps if steps is not None else 10**9
    if model_overrides:
        cfg.model.overrides.update(model_overrides)
    cfg.validate()
    return cfg


def compare(configs: dict[str, RunConfig], eval_every_s: float, eval_batches: int | None,
            progress: bool = True) -> dict:
    """Train every arm for its budget (minutes and/or steps, from its run config), interleaved; evaluate each on
    the validation split every `eval_every_s` charged seconds, and on the whole split at the end."""
    from qiusuo.train.trainer import Trainer

    arms = [Arm(name, Trainer(cfg)) for name, cfg in configs.items()]
    first_cfg = next(iter(configs.values()))
    budget = 60 * first_cfg.train.minutes if first_cfg.train.minutes > 0 else math.inf
    max_steps = first_cfg.train.steps
    for arm in arms:
        arm.record(eval_batches)
        arm.next_eval = eval_every_s
    total = len(arms) * (budget if math.isfinite(budget) else max_steps)
    title = " vs ".join(configs)
    with tqdm(total=round(total), unit="s" if math.isfinite(budget) else "step", desc=title, file=sys.stderr,
              dynamic_ncols=True, disable=not progress) as bar:
        while not all(a.done for a in arms):
            arm = min((a for a in arms if not a.done), key=lambda a: (a.seconds, a.name))
            t = arm.trainer
            start = time.perf_counter()
            m = t.train_step()
            arm.seconds += time.perf_counter() - start
            t.elapsed = arm.seconds  # the schedule's progress is this arm's charged time
            arm.done = arm.seconds >= budget or t.step >= max_steps
            if arm.seconds >= arm.next_eval and not arm.done:
                arm.record(eval_batches)
                arm.next_eval += eval_every_s
            bar.n = min(round(sum(a.seconds for a in arms) if math.isfinite(budget) else sum(a.trainer.step for a in arms)), bar.total)
            bar.set_postfix({a.name: f"{a.curve[-1]['bpb']:.3f}" for a in arms}, refresh=False)
            bar.set_description(f"{title} ({arm.name} loss {m['ce']:.3f})", refresh=False)
            bar.refresh()
    for arm in arms:
        arm.record(None)  # the whole validation split
    t0 = arms[0].trainer
    result = {"device": str(t0.device), "unigram_bpb": t0.unigram_bpb(), "arms": list(configs),
              "budget_seconds": budget if math.isfinite(budget) else None, "max_steps": max_steps}
    for arm in arms:
        t = arm.trainer
        params = count_params(t.model_cfg)
        result[arm.name] = {"params_total": params["total"], "params_active": params["active"], "steps": t.step,
                            "tokens": t.step * t.tokens_per_step, "seconds": arm.seconds,
                            "tokens_per_s": t.step * t.tokens_per_step / max(arm.seconds, 1e-9),
                            "final_bpb": arm.curve[-1]["bpb"], "curve": arm.curve}
    return result


def plot(result: dict, path: Path) -> Path:
    """bits per byte against charged training seconds (left) and training tokens (right), with the unigram line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in result["arms"]:
        r = result[name]
        label = f"{name}: {r['params_active'] / 1e6:.2f}M active / {r['params_total'] / 1e6:.2f}M total"
        for ax, x in zip(axes, ("seconds", "tokens")):
            ax.plot([p[x] for p in r["curve"]], [p["bpb"] for p in r["curve"]], "o-", ms=3, label=label)
    for ax, x in zip(axes, ("training seconds (same budget for both)", "training tokens")):
        ax.axhline(result["unigram_bpb"], color="gray", ls="--", label=f"unigram {result['unigram_bpb']:.3f}")
        ax.set(xlabel=x, ylabel="validation bits per byte")
        ax.legend()
    fig.suptitle(" vs ".join(result["arms"]) + " at the same wall-clock budget")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def add_args(p: argparse.ArgumentParser) -> None:
    p.usage = "qiusuo bench quality [--config PRESET_OR_TOML] [--minutes M] [--section.key VALUE ...]"
    p.add_argument("--data", default="runs/data", help="prepared data (`qiusuo prepare`); the default corpus is prepared there if missing")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget PER MODEL (the run takes about twice this plus evaluation)")
    p.add_argument("--steps", type=int, default=None, help="also stop each model after this many optimizer steps")
    p.add_argument("--eval-every", type=float, default=30.0, help="charged training seconds between validation points")
    p.add_argument("--eval-batches", type=int, default=8, help="validation batches per intermediate point (the final point reads the whole split)")
    p.add_argument("--out", default="runs/quality", help="folder for quality.json and quality.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=CONFIG[,section.key=value...]",
                   help="an arm to compare (repeat); CONFIG is a run preset or TOML, `twin:NAME` the dense twin of "
                        "arm NAME; --section.key flags apply to every arm (default: the MoE of --config and its "
                        "dense twin)")
    # the base run config of both models (its model is the MoE) and --section.key VALUE for both (--optim.lr=2e-3)
    add_config_args(p, "pretrain-demo")


def split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside brackets and quotes, so a TOML list value keeps its own commas."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def parse_arm(spec: str) -> tuple[str, str, dict]:
    """`NAME=CONFIG[,section.key=value...]` -> (name, config, {key: value}); values are TOML literals (lists
    included: `model.mlp_layer_types=["dense","hash_moe","moe","moe"]`) or strings."""
    import tomllib

    name, sep, rest = spec.partition("=")
    if not sep or not name or not rest:
        raise ValueError(f"--arm {spec!r}: write NAME=CONFIG[,section.key=value...]")
    config, *pairs = split_top_level(rest)
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--arm {spec!r}: {pair!r} is not section.key=value")
        try:
            settings[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            settings[key] = value
    return name, config, settings


def arm_configs(args: argparse.Namespace, settings: dict, base: str, out: Path, vocab: int) -> dict[str, RunConfig]:
    """The arms' run configs: `--arm`s in order (`twin:NAME` after NAME), or the MoE of `base` and its twin."""
    specs = [parse_arm(a) for a in args.arm] or [("moe", base, {}), ("dense", "twin:moe", {})]
    configs: dict[str, RunConfig] = {}
    for name, config, own in specs:
        if name in configs:
            raise ValueError(f"--arm {name!r} is given twice")
        if config.startswith("twin:"):
            of = config.removeprefix("twin:")
            if of not in configs:
                raise ValueError(f"--arm {name}=twin:{of}: no arm {of!r} before it")
            twin = dense_twin(configs[of].model.build(vocab_size=vocab))
            src = next(c for n, c, _ in specs if n == of)
            own = {**next(o for n, _, o in specs if n == of), **own}
            configs[name] = run_config(src, {**settings, **own}, args.data, out / name, args.minutes, args.steps, twin)
        else:
            configs[name] = run_config(config, {**settings, **own}, args.data, out / name, args.minutes, args.steps)
    return configs


def run(args: argparse.Namespace) -> int:
    """Both arms trained and compared; 2 with a one-line message on stderr for a bad setting or missing data.
    The settings are checked before any data is prepared."""
    from qiusuo.data.sources import DataError

    out, settings, base = Path(args.out), overrides(args), args.config or args.default_config
    try:
        for spec in args.arm:  # settings checked before any data is prepared
            _, config, own = parse_arm(spec)
            if not config.startswith("twin:"):
                run_config(config, {**settings, **own}, args.data, out, args.minutes, args.steps)
        if not args.arm:
            run_config(base, settings, args.data, out, args.minutes, args.steps)
        if not (Path(args.data) / "val" / "manifest.json").is_file():
            from qiusuo.data.prepare import prepare

            print(f"preparing the default corpus in {args.data}", file=sys.stderr)
            prepare(args.data, progress=not args.no_progress)
        vocab = json.loads((Path(args.data) / "train" / "manifest.json").read_text())["vocab_size"]
        configs = arm_configs(args, settings, base, out, vocab)
        result = compare(configs, args.eval_every, args.eval_batches, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, DataError) as e:
        print(f"qiusuo bench quality: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    result["config"] = {"base": base, "overrides": settings, "arms": args.arm or ["moe", "dense (twin)"]}
    (out / "quality.json").write_text(json.dumps(result, indent=2) + "\n")
    png = plot(result, out / "quality.png")
    print(f"{'model':6} {'active':>9} {'total':>9} {'steps':>6} {'tokens':>9} {'tok/s':>7} {'val bpb':>8}")
    for name in result["arms"]:
        r = result[name]
        print(f"{name:6} {r['params_active']:>9,} {r['params_total']:>9,} {r['steps']:>6} {r['tokens']:>9,} "
              f"{r['tokens_per_s']:>7.0f} {r['final_bpb']:>8.4f}")
    print(f"unigram baseline {result['unigram_bpb']:.4f} bits/byte; curves: {png}; data: {out / 'quality.json'}")
    return 0
