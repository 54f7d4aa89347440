"""`qiusuo demo`: the whole promise in one command on a laptop.

1. prepare the corpus (default: this Python's standard library) into a BPE tokenizer and token shards, unless
   the data folder already holds them;
2. train the `demo` MoE with the `pretrain-demo` run preset (qiusuo/presets/pretrain-demo.toml) for `--minutes`
   of wall-clock time, with a progress bar;
3. print the validation bits per byte against the unigram baseline of the same data, the plots, generated samples,
   and how to chat with or serve the exported model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from qiusuo.data.sources import DataError
from qiusuo.train import rundir


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="*", help="text files or folders to train on; default: the Python standard library's .py files")
    p.add_argument("--minutes", type=float, default=5.0, help="training wall-clock budget")
    p.add_argument("--out", default="runs/demo", help="run folder: checkpoints, metrics, plots, samples, exported model")
    p.add_argument("--data", default="runs/data", help="token shards folder; prepared here when missing")
    p.add_argument("--config", default="pretrain-demo", help="run preset or TOML file")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: the cores other processes leave free)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out (without it, a second "
                   "demo writes to --out-2, -3, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> dict:
    from qiusuo.data.prepare import prepare
    from qiusuo.train.config import load_run_config
    from qiusuo.train.trainer import Trainer

    start = time.perf_counter()
    data = Path(args.data)
    if args.sources or not (data / "val" / "manifest.json").is_file():
        what = ", ".join(args.sources) if args.sources else "the Python standard library"
        print(f"[1/3] preparing {what} -> {data}", file=sys.stderr)
        prep = prepare(data, sources=args.sources or None, progress=not args.no_progress)
        print(f"      {prep['train']['documents']} train / {prep['val']['documents']} validation documents, "
              f"{prep['train']['tokens']:,} train tokens, {prep['bytes_per_token']:.2f} bytes per token", file=sys.stderr)
    else:
        print(f"[1/3] using the prepared data in {data}", file=sys.stderr)
    out = Path(args.out) if args.overwrite else rundir.fresh(args.out)
    if out != Path(args.out):
        print(f"      {args.out} holds an earlier run: this one writes to {out} (--overwrite replaces it)", file=sys.stderr)
    cfg = load_run_config(args.config, {"data.dir": str(data), "run.out_dir": str(out), "train.minutes": args.minutes,
                                         "run.progress": not args.no_progress, "run.threads": args.threads})
    trainer = Trainer(cfg, overwrite=args.overwrite)
    n_params = sum(p.numel() for p in trainer.model.parameters())
    on = f"{trainer.device}, {trainer.threads} threads" if trainer.threads else str(trainer.device)
    print(f"[2/3] training the {cfg.model.preset} MoE ({n_params / 1e6:.1f}M parameters, "
          f"{trainer.model_cfg.n_routed_experts} experts, top-{trainer.model_cfg.num_experts_per_tok}) for "
          f"{args.minutes:g} minutes on {on}", file=sys.stderr)
    summary = trainer.train()
    summary["wall_seconds"] = time.perf_counter() - start
    summary["threads"] = trainer.threads
    return summary


def report(s: dict) -> str:
    lines = [
        "[3/3] results",
        f"  trained {s['steps']} steps, {s['tokens']:,} tokens in {s['train_seconds']:.0f} s "
        f"(whole demo {s['wall_seconds']:.0f} s)" + (f" on {s['threads']} CPU threads" if s.get("threads") else ""),
        f"  validation bits per byte: {s['val_bpb']:.3f}   unigram baseline on the same data: {s['unigram_bpb']:.3f}"
        + (f"   ({100 * (1 - s['val_bpb'] / s['unigram_bpb']):.0f}% below it)" if s["val_bpb"] < s["unigram_bpb"]
           else "   (not below it yet: train longer)"),
        "  plots: " + ", ".join(s["plots"]),
        "  samples:",
    ]
    for smp in s["samples"]:
        lines.append("    " + json.dumps(smp["prompt"]) + " -> " + json.dumps(smp["text"]))
    m = s["model"]
    lines += [
        f"  model (Hugging Face layout): {m}",
        f"  chat with it:   qiusuo chat --model {m}",
        f"  serve it:       qiusuo serve --model {m}   (OpenAI-compatible, 127.0.0.1)",
        f"  train longer:   qiusuo train --resume {Path(s['checkpoint']).parent.parent} --train.extra_minutes=10",
    ]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from qiusuo.train.trainer import Interrupted, TrainingDiverged

    try:
        summary = run(args)
    except Interrupted as e:
        print(f"qiusuo demo: {e}", file=sys.stderr)
        return 130
    except (DataError, FileNotFoundError, ValueError, TrainingDiverged) as e:
        print(f"qiusuo demo: {e}", file=sys.stderr)
        return 2
    print(report(summary))
    return 0
