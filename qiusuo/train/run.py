"""`qiusuo train --config PRESET_OR_TOML [--section.key=value ...] [--resume DIR]`."""

from __future__ import annotations

import argparse
import json
import sys

from qiusuo.data.sources import DataError
from qiusuo.train.checkpoint import CheckpointError, resolve
from qiusuo.train.config import add_config_args, load_run_config, overrides


def add_args(p: argparse.ArgumentParser) -> None:
    p.usage = "qiusuo train --config PRESET_OR_TOML [--section.key VALUE ...] [--resume DIR]"
    add_resume_arg(p)
    add_config_args(p, None, {"--steps": ("train.steps", {}), "--minutes": ("train.minutes", {}),
                              "--lr": ("optim.lr", {}), "--data": ("data.dir", {}), "--out": ("run.out_dir", {})})


def add_resume_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", default=None, help="continue from a run folder (its latest complete checkpoint) or one "
                   "checkpoint folder; without --config, with the checkpoint's own run.toml")


def config_source(args: argparse.Namespace, default: str | None = None) -> str:
    """--config; else with --resume the checkpoint's own run.toml; else the command's default preset
    (`default`; None: ValueError, `qiusuo train` needs one of them)."""
    if args.config is not None:
        return args.config
    if args.resume is not None:
        return str(resolve(args.resume) / "run.toml")
    if default is None:
        raise ValueError("pass --config PRESET_OR_TOML (or --resume DIR)")
    return default


def main(args: argparse.Namespace) -> int:
    from qiusuo.train.distributed import Distributed, DistributedError, collective_failure, launched_by_torchrun
    from qiusuo.train.trainer import Trainer, TrainingDiverged

    dist = None
    try:
        cfg = load_run_config(config_source(args), overrides(args))
        if launched_by_torchrun() or cfg.parallel.dp != "none" or cfg.parallel.ep > 1:
            dist = Distributed.from_env(cfg.parallel, cfg.run.device)
        try:
            summary = Trainer(cfg, dist=dist, resume=args.resume).train()
        finally:
            if dist is not None:
                dist.close()
    except (ValueError, FileNotFoundError, DataError, CheckpointError, TrainingDiverged, DistributedError) as e:
        print(f"qiusuo train: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if dist is None or not collective_failure(e):
            raise
        print(f"qiusuo train: rank {dist.rank}: a collective failed: another process died or did not answer within "
              f"parallel.timeout_s={cfg.parallel.timeout_s:g} s; this rank stops. Fix or replace the failed process, "
              f"then relaunch with --resume {cfg.run.out_dir} (its latest checkpoint). ({type(e).__name__}: "
              f"{str(e).strip()[:300]})", file=sys.stderr)
        return 3
    if dist is None or dist.rank == 0:
        print(json.dumps(summary, indent=2))
    return 0
