"""`qiusuo generate`: continue a prompt on the engine, streaming the text to the terminal."""

from __future__ import annotations

import argparse
import sys

from qiusuo.infer.load import add_engine_args, engine_from_args
from qiusuo.infer.output import Delta
from qiusuo.infer.sampling import SamplingParams


def add_sampling_args(p: argparse.ArgumentParser, temperature: float, top_p: float) -> None:
    """The sampling options of `generate` and `chat` (which differ in their defaults)."""
    p.add_argument("--max-tokens", type=int, default=256, help="new tokens at most per reply")
    p.add_argument("--temperature", type=float, default=temperature, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=top_p, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed, same output)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)


def start(args: argparse.Namespace):
    """(sampling parameters, engine) for a terminal command, or None after printing why the settings are bad
    (checked before the model loads)."""
    try:
        params = sampling_params(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    return params, engine_from_args(args, max_batch=1)


def print_delta(d: Delta) -> None:
    sys.stdout.write(d.text)
    sys.stdout.flush()


def add_args(p: argparse.ArgumentParser) -> None:
    add_engine_args(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--template", action="store_true", help="wrap the prompt as one user turn of the chat template")
    add_sampling_args(p, temperature=0.0, top_p=1.0)


def main(args: argparse.Namespace) -> int:
    started = start(args)
    if started is None:
        return 2
    params, engine = started
    prompt = args.prompt
    if args.template:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    out = engine.generate([prompt], params, progress=print_delta)[0]
    print(f"\n[{out.usage.completion_tokens} tokens, finish: {out.outputs[0].finish_reason}]", file=sys.stderr)
    return 0
