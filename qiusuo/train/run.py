"""`qiusuo train --config PRESET_OR_TOML [--section.key=value ...] [--resume DIR]`."""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import sys

from qiusuo.data.sources import DataError
from qiusuo.train.checkpoint import CheckpointError, resolve
from qiusuo.train.config import all_keys, key_help, load_run_config, preset_names


def add_args(p: argparse.ArgumentParser) -> None:
    p.usage = "qiusuo train --config PRESET_OR_TOML [--section.key VALUE ...] [--resume DIR]"
    p.add_argument("--config", default=None,
                   help=f"run preset ({', '.join(preset_names())}) or a TOML file; with --resume and no --config, the "
                        "checkpoint's own run.toml")
    p.add_argument("--resume", default=None, help="continue from a run folder (its latest complete checkpoint) or one checkpoint folder")
    add_override_args(p)


def _error_with_hint(p: argparse.ArgumentParser, message: str):
    """argparse's error, plus the closest real key for a mistyped `--section.key` (Python 3.11's argparse does not
    suggest). Bound on the instance because cli.py builds the parser."""
    hints = []
    if message.startswith("unrecognized arguments:"):
        for arg in message.split(":", 1)[1].split():
            key = arg.removeprefix("--").partition("=")[0]
            near = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.5) if arg.startswith("--") else []
            hints += [f"--{key}: did you mean --{near[0]}?"] if near else []
    argparse.ArgumentParser.error(p, "; ".join([message, *hints]))


def add_override_args(p: argparse.ArgumentParser) -> None:
    """One `--section.key VALUE` option per run config key, so `--help` lists them all with their defaults.
    Unset keys stay out of the namespace (SUPPRESS); `overrides(args)` collects the set ones."""
    p.error = functools.partial(_error_with_hint, p)
    g = p.add_argument_group("run config keys (override the --config file; e.g. --optim.lr=3e-4)")
    for key, default, why in key_help():
        shown = "" if default is None else f" (default: {default!r})"
        g.add_argument(f"--{key}", dest=key, metavar="V", default=argparse.SUPPRESS, help=f"{why}{shown}")


def overrides(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if "." in k}


def main(args: argparse.Namespace) -> int:
    from qiusuo.train.distributed import Distributed, DistributedError, collective_failure, launched_by_torchrun
    from qiusuo.train.trainer import Trainer, TrainingDiverged

    dist = None
    try:
        source = args.config
        if source is None:
            if args.resume is None:
                print("qiusuo train: pass --config PRESET_OR_TOML (or --resume DIR)", file=sys.stderr)
                return 2
            source = resolve(args.resume) / "run.toml"
        cfg = load_run_config(source, overrides(args))
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
