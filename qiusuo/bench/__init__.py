"""`qiusuo bench NAME`: every benchmark, each measuring against a reference in the same run.

    train     training tokens/s and MFU vs transformers              qiusuo/bench/train.py
    decode    `Transformer.generate` decoding tokens/s vs transformers  qiusuo/bench/decode.py
    engine    serving engine decoding tokens/s vs transformers       qiusuo/bench/decode.py
    serve     load test: concurrent streaming clients on the server  qiusuo/bench/serve.py
    quality   MoE vs dense, same active parameters, same wall clock  qiusuo/bench/quality.py
    context   long context: V3 vs V4 decode speed and cache size     qiusuo/bench/context.py
    speculative  MTP speculative decoding vs plain decoding          qiusuo/bench/speculative.py
    quant     packed-weight decoding vs the roofline and llama.cpp   qiusuo/bench/quant.py
    structured  constrained decoding's mask cost per step, free vs JSON  qiusuo/bench/structured.py

Shared flags live in `common.py`. This module only dispatches; a benchmark's exit code is the command's.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, add-args function, run function, help). A run function returns an exit code (int) or its
# figures (a dict: success).
BENCHES: dict[str, tuple[str, str, str, str]] = {
    "train": ("qiusuo.bench.train", "add_args", "run", "training tokens/s and MFU vs transformers (bench config)"),
    "decode": ("qiusuo.bench.decode", "add_decode_args", "run_decode",
               "decoding tokens/s with the latent cache vs transformers"),
    "engine": ("qiusuo.bench.decode", "add_engine_args", "run_engine",
               "serving engine decode tokens/s vs transformers"),
    "quality": ("qiusuo.bench.quality", "add_args", "run", "MoE vs dense, same active params, same wall clock"),
    "serve": ("qiusuo.bench.serve", "add_args", "run", "load test: concurrent clients against the server"),
    "context": ("qiusuo.bench.context", "add_args", "run", "long context: V3 vs V4 decode speed and cache size"),
    "speculative": ("qiusuo.bench.speculative", "add_args", "run",
                    "MTP speculative decoding vs plain: tokens/s and acceptance"),
    "quant": ("qiusuo.bench.quant", "add_args", "run",
              "packed weights (int4, int8, fp8, mxfp4, bf16) decoding vs the bandwidth roofline and llama.cpp"),
    "structured": ("qiusuo.bench.structured", "add_args", "run",
                   "constrained decoding: mask time per step as a share of the step, free vs a JSON schema"),
}


class _OwnErrors(argparse.ArgumentParser):
    """A benchmark's parser that reports its own unknown options. argparse otherwise hands a sub-command's
    unknown options to the top parser, whose error names neither the benchmark's usage nor the closest
    `--section.key` (the hint `bench quality` installs on its own parser)."""

    def parse_known_args(self, args=None, namespace=None):
        ns, extra = super().parse_known_args(args, namespace)
        if extra:
            self.error("unrecognized arguments: " + " ".join(extra))
        return ns, extra


def add_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="bench", metavar="NAME", required=True, parser_class=_OwnErrors)
    for name, (module, add, _, help_) in BENCHES.items():
        sp = sub.add_parser(name, help=help_, description=help_, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        getattr(importlib.import_module(module), add)(sp)


def main(args: argparse.Namespace) -> int:
    """The benchmark's exit code; 2 with a one-line message for a bad setting (an unknown size, a device that
    is not there, a model folder that does not load: ValueError, CheckpointError, FileNotFoundError)."""
    module, _, run, _ = BENCHES[args.bench]
    try:
        rc = getattr(importlib.import_module(module), run)(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"qiusuo bench {args.bench}: {e}", file=sys.stderr)
        return 2
    return rc if isinstance(rc, int) else 0
