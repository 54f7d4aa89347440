"""`qiusuo inspect PATH`: a checkpoint's description (`qiusuo.hf.inspect.describe`: what it holds and what fits,
from config.json and the safetensors headers alone), and with `--load` its load as `qiusuo serve` does it, measured
against that prediction (`qiusuo.infer.load.measure_load`).

A command of its own above both packages, like `qiusuo.demo`: the checkpoint code describes, the engine loads, and
neither imports the other's side. The engine is imported only when `--load` asks for it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from qiusuo.hf.inspect import describe, parse_bytes, report


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="model folder (config.json, with or without its safetensors), or a config.json file")
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    p.add_argument("--memory", default=None, help="memory to fit into, e.g. 24GB (10^9 bytes), 80GiB (2^30), 1.5TB")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence for the cache (default: the model's "
                                                              "max_position_embeddings)")
    p.add_argument("--batch", type=int, default=1, help="sequences cached at once")
    p.add_argument("--kv-cache-dtype", default="bf16", choices=["bf16", "fp8"], help="the cache's precision for its "
                   "bytes per token (fp8: keys in FP8, rotary parts in bf16, as `serve --kv-cache-dtype fp8`)")
    p.add_argument("--dtype", default=None, help="dtype of the parts not kept packed (default: bf16 for the table; "
                   "float32 for --load, the CPU serving default)")
    p.add_argument("--load", action="store_true", help="also load it as `qiusuo serve` would (CPU) and report the "
                   "load time, peak and resident memory against the prediction")
    p.add_argument("--quantize", default="native", metavar="SPEC", help="with --load: what stays packed (as serve)")


def main(args: argparse.Namespace) -> int:
    if args.batch < 1 or (args.context is not None and args.context < 1):
        raise ValueError("--context and --batch must be positive")
    memory = parse_bytes(args.memory) if args.memory is not None else None
    d = describe(args.path, context=args.context, batch=args.batch, memory=memory, dtype=args.dtype,
                 kv_cache_dtype=args.kv_cache_dtype)
    if args.load:
        from qiusuo.infer.load import measure_load  # torch and the engine: only when asked

        if not d["weights_present"]:
            raise ValueError(f"{args.path}: --load needs the weights; this is a config only")
        d["load"] = measure_load(Path(args.path), args.quantize, args.dtype, args.batch, args.context)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    print("\n".join(report(d)))
    return 0
