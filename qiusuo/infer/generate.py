"""`qiusuo generate`: continue a prompt on the engine, streaming the text to the terminal."""

from __future__ import annotations

import argparse
import json
import sys

from qiusuo.infer.generation_config import read_generation_config
from qiusuo.infer.load import add_engine_args, engine_from_args
from qiusuo.infer.output import Delta
from qiusuo.infer.sampling import SamplingParams


def add_sampling_args(p: argparse.ArgumentParser, temperature: float, top_p: float) -> None:
    """The sampling options of `generate` and `chat`: a flag given wins, then the checkpoint's generation_config.json
    (R1 ships temperature 0.6, top_p 0.95), then the command's own default (which differs between the two)."""
    own = {"temperature": temperature, "top_p": top_p, "top_k": 0, "max_tokens": 256}
    p.set_defaults(command_sampling=own)
    later = "default: generation_config.json's, else {}"
    p.add_argument("--max-tokens", type=int, default=None, help="new tokens at most per reply (" + later.format(256) + ")")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (" + later.format(temperature) + ")")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (" + later.format(top_p) + ")")
    p.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens, 0: all (" + later.format(0) + ")")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed, same output)")


def sampling_params(args: argparse.Namespace, checkpoint: dict | None = None) -> SamplingParams:
    """Flags given, over `checkpoint` (`GenerationConfig.sampling`), over the command's defaults."""
    given = {k: getattr(args, k) for k in ("max_tokens", "temperature", "top_p", "top_k") if getattr(args, k) is not None}
    return SamplingParams(**{**args.command_sampling, **(checkpoint or {}), **given}, seed=args.seed)


def start(args: argparse.Namespace):
    """(sampling parameters, engine) for a terminal command, or None after printing why the settings are bad
    (checked before the model loads)."""
    try:
        params = sampling_params(args, read_generation_config(args.model).sampling)
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
    p.add_argument("--json-schema", default=None, metavar="FILE",
                   help="hold the output to this JSON schema (a .json file) by constrained decoding")
    p.add_argument("--regex", default=None, help="hold the output to this regular expression")


def output_grammar(args: argparse.Namespace):
    """The constraint `--json-schema` / `--regex` ask for (None: free text); ValueError says what is wrong."""
    from qiusuo.infer import constraint

    if args.json_schema and args.regex:
        raise ValueError("--json-schema and --regex: give one")
    if args.regex:
        return constraint.regex(args.regex, "--regex")
    if not args.json_schema:
        return None
    try:
        with open(args.json_schema, encoding="utf-8") as f:
            schema = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"--json-schema {args.json_schema}: cannot read a JSON schema from it ({e})") from None
    return constraint.json_schema(schema, f"--json-schema {args.json_schema}")


def main(args: argparse.Namespace) -> int:
    try:
        grammar = output_grammar(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = start(args)
    if started is None:
        return 2
    params, engine = started
    params.grammar = grammar
    if grammar is not None:
        try:
            engine.grammars.compile(grammar)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    prompt = args.prompt
    if args.template:  # the prompt is the user's text: encode_chat never turns markers typed in it into control ids
        prompt = engine.tokenizer.encode_chat([{"role": "user", "content": prompt}])
    out = engine.generate([prompt], params, progress=print_delta)[0]
    print(f"\n[{out.usage.completion_tokens} tokens, finish: {out.outputs[0].finish_reason}]", file=sys.stderr)
    return 0
