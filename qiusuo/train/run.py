"""`qiusuo train --config PRESET_OR_TOML [--section.key=value ...] [--resume DIR]`."""

from __future__ import annotations

import argparse
import json
import sys

from qiusuo.data.sources import DataError
from qiusuo.runtime import Interrupted
from qiusuo.train import rundir
from qiusuo.train.checkpoint import CheckpointError, resolve
from qiusuo.train.config import add_config_args, load_run_config, overrides


def add_args(p: argparse.ArgumentParser) -> None:
    p.usage = "qiusuo train --config PRESET_OR_TOML [--section.key VALUE ...] [--resume DIR] [--overwrite]"
    add_resume_arg(p)
    add_overwrite_arg(p)
    add_config_args(p, None, {"--steps": ("train.steps", {}), "--minutes": ("train.minutes", {}),
                              "--lr": ("optim.lr", {}), "--data": ("data.dir", {}), "--out": ("run.out_dir", {})})


def add_resume_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", default=None, help="continue from a run folder (its latest complete checkpoint) or one "
                   "checkpoint folder, writing into that run folder (unless --run.out_dir says otherwise); without "
                   "--config, with the checkpoint's own run.toml; --train.extra_minutes=N (or extra_steps) trains "
                   "longer than the run's budget")


def add_overwrite_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="a new run may replace the run already in its "
                   "run.out_dir (without it, starting there is refused)")


def resume_overrides(args: argparse.Namespace, over: dict) -> dict:
    """The command line's run config overrides; with --resume, `run.out_dir` is the resumed run's own folder unless
    given: the run continues where it lives, whatever the working directory and its recorded config say."""
    if args.resume is not None and "run.out_dir" not in over:
        return {**over, "run.out_dir": str(rundir.of_resume(resolve(args.resume)))}
    return over


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
        cfg = load_run_config(config_source(args), resume_overrides(args, overrides(args)))
        if launched_by_torchrun() or cfg.parallel.dp != "none" or cfg.parallel.ep > 1:
            dist = Distributed.from_env(cfg.parallel, cfg.run.device)
        try:
            summary = Trainer(cfg, dist=dist, resume=args.resume, overwrite=args.overwrite).train()
        finally:
            if dist is not None:
                dist.close()
    except Interrupted as e:
        print(f"qiusuo train: {e}", file=sys.stderr)
        return 130
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
