"""`qiusuo bench NAME`: the benchmark scripts, each measuring against a reference in the same run.
Subcommands live with what they measure; this module only dispatches."""

from __future__ import annotations

import argparse
import importlib

# name -> (module, add-args function, run function, help)
BENCHES: dict[str, tuple[str, str, str, str]] = {
    "train": ("qiusuo.perf.train", "add_args", "run", "training tokens/s and MFU vs transformers (bench config)"),
    "decode": ("qiusuo.perf.decode", "add_args", "run", "decoding tokens/s with the latent cache vs transformers"),
    "engine": ("qiusuo.infer.bench", "add_decode_args", "run_decode", "serving engine decode tokens/s vs transformers"),
    "quality": ("qiusuo.train.quality", "add_quality_args", "run_quality", "MoE vs dense, same active params, same wall clock"),
    "serve": ("qiusuo.infer.bench", "add_serve_args", "run_serve", "load test: concurrent clients against the server"),
}


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="NAME", required=True)
    for name, (module, add, _, help_) in BENCHES.items():
        sp = sub.add_parser(name, help=help_, description=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        getattr(importlib.import_module(module), add)(sp)


def main(args: argparse.Namespace) -> int:
    module, _, run, _ = BENCHES[args.bench]
    getattr(importlib.import_module(module), run)(args)
    return 0
