"""`qiusuo bench structured`: what constrained decoding (`qiusuo/infer/constraint.py`) costs per decoding step, at
each batch size: the engine decoding the same number of tokens free and held to a JSON schema, in the same run.
Prints per-step time free, constrained with the masks computed in place and with them computed while the model runs
(`constraint.Masker`), and the time spent computing masks and advancing the grammars (`constraint.allowed` and
`constraint.advance`, timed inside the engine) as a share of the in-place constrained step.

The schema never completes within `--new-tokens` (an array of at least 10,000 records of a bounded string, an
integer range, a boolean and an enum), so every row decodes exactly as many constrained steps as the free run
decodes tokens, through all of JSON's lexical states. Prompts are fresh random ids per run (no prefix-cache hits).
The default tokenizer is a BPE of the bench preset's 8,192 tokens trained on qiusuo's own source (masks cost more
with more tokens: `--tokenizer DIR` measures a checkpoint's, the model's vocabulary widened to it).

`--libraries` compares the grammar engines on that tokenizer: llguidance (used) and xgrammar (when installed):
building the tokenizer's index, compiling a set of schemas, one mask per step on a seeded random walk through each,
and whether a schema keyword the library does not implement is refused or silently ignored (output that would not
validate).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from qiusuo.bench.common import add_device_args, add_model_args, setup
from qiusuo.config import get_config
from qiusuo.model.transformer import Transformer

RECORD = {"type": "object", "additionalProperties": False, "required": ["name", "n", "ok", "tag"],
          "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer", "minimum": 0,
                                                                             "maximum": 999},
                         "ok": {"type": "boolean"}, "tag": {"enum": ["alpha", "beta", "gamma"]}}}
ENDLESS = {"type": "array", "minItems": 10_000, "items": RECORD}  # never completes within --new-tokens

# --libraries: schemas both engines should compile, and keywords whose violation shows refusal or silence
COMPILES = [
    RECORD, ENDLESS,
    {"type": "object", "required": ["x", "e"], "properties": {
        "x": {"anyOf": [{"type": "string", "pattern": "^[a-z]{2,5}$"}, {"type": "number", "minimum": 0}]},
        "e": {"enum": ["a", 1, None]}}},
    {"$defs": {"node": {"type": "object", "properties": {"v": {"type": "integer"}, "kids": {
        "type": "array", "items": {"$ref": "#/$defs/node"}}}, "required": ["v"]}}, "$ref": "#/$defs/node"},
    {"type": "object", "properties": {"a": {"oneOf": [{"type": "integer"}, {"type": "string"}]},
                                      "d": {"type": "string", "format": "date"}}, "required": ["a", "d"]},
    {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "items": False},
    {"type": "object", "patternProperties": {"^k": {"type": "integer"}}, "additionalProperties": False},
    {"type": "object", "properties": {"a": {"allOf": [{"type": "integer"}, {"minimum": 2}]}}, "required": ["a"]},
]
KEYWORDS = {  # keyword -> (schema, JSON text it forbids)
    "not": ({"type": "object", "properties": {"a": {"not": {"type": "integer"}}}, "required": ["a"]}, '{"a": 1}'),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]"),
    "if/then": ({"type": "object", "if": {"properties": {"a": {"const": 1}}, "required": ["a"]},
                 "then": {"required": ["b"]}}, '{"a": 1}'),
    "dependentRequired": ({"type": "object", "dependentRequired": {"a": ["b"]}}, '{"a": 1}'),
    "minProperties": ({"type": "object", "minProperties": 2}, '{"a": 1}'),
}


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_device_args(p)
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: --model's, else "
                   "an 8,192-token BPE trained on qiusuo's source)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="sequences decoded together")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence (>= 2)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--libraries", action="store_true", help="also compare llguidance and xgrammar on the tokenizer")


def source_tokenizer(vocab_size: int = 8192):
    """A byte-level BPE of `vocab_size` tokens trained on qiusuo's own source files: a realistic mask workload at
    the bench preset's vocabulary, reproducible without downloads."""
    from qiusuo.data.tokenizer import Tokenizer

    root = Path(__file__).resolve().parents[1]
    texts = [f.read_text(encoding="utf-8") for f in sorted(root.rglob("*.py"))]
    return Tokenizer.train(texts, vocab_size=vocab_size)


def _tokenizer(args: argparse.Namespace):
    folder = args.tokenizer or args.model
    if folder:
        from qiusuo.hf.load import load_tokenizer

        return load_tokenizer(folder)
    return source_tokenizer(get_config(args.preset).vocab_size)


def _model(args: argparse.Namespace, vocab: int, device: torch.device) -> Transformer:
    if args.model:
        from qiusuo.hf.load import load_model

        return load_model(args.model, dtype=args.dtype, device=device).eval()
    torch.manual_seed(0)
    cfg = get_config(args.preset, num_nextn_predict_layers=0)
    return Transformer(get_config(args.preset, num_nextn_predict_layers=0,
                                  vocab_size=max(cfg.vocab_size, vocab))).to(device).eval()


class _Timed:
    """Wraps a function of `constraint`, summing the seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *a, **kw):
        t = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t


def run(args: argparse.Namespace) -> dict[str, float]:
    from qiusuo.infer import constraint
    from qiusuo.infer.engine import Engine
    from qiusuo.infer.sampling import SamplingParams

    device = setup(args)
    tok = _tokenizer(args)
    model = _model(args, tok.vocab_size, device)
    V, L, new = model.cfg.vocab_size, args.prompt_len, args.new_tokens
    if new < 2:
        raise ValueError(f"--new-tokens must be at least 2 (decoding steps follow the first token), got {new}")
    engine = Engine(model, tok, max_batch=max(args.batch), max_model_len=L + new)
    grammar = constraint.json_schema(ENDLESS)
    t = time.perf_counter()
    engine.grammars.compile(grammar)
    print(f"device {device}, {args.dtype}, {args.model or args.preset + ' (random weights)'}, vocabulary {V} "
          f"({tok.vocab_size} in the tokenizer); prompt {L} + {new} new tokens, sampled (temperature 1, seeded); "
          f"tokenizer index + schema compiled in {time.perf_counter() - t:.2f} s", flush=True)
    timers = {name: _Timed(getattr(constraint, name)) for name in ("allowed", "advance")}
    decode = engine.runner.decode = _Timed(engine.runner.decode)
    results: dict[str, float] = {}
    try:
        for name, timer in timers.items():
            setattr(constraint, name, timer)
        for B in args.batch:
            kinds = {"free": (None, True), "in_place": (grammar, False), "constrained": (grammar, True)}
            times: dict[str, list[float]] = {k: [] for k in kinds}
            mask: dict[str, list[float]] = {k: [] for k in kinds}
            for r in range(args.repeats + 1):  # the kinds interleaved, so a busy moment costs each alike
                for kind, (g, overlap) in kinds.items():
                    engine.runner.masker.overlap = overlap
                    prompts = torch.randint(0, tok.vocab_size, (B, L)).tolist()
                    params = [SamplingParams(max_tokens=new, temperature=1.0, seed=i, ignore_eos=True, grammar=g)
                              for i in range(B)]
                    before, t = sum(tm.seconds for tm in timers.values()), decode.seconds
                    outs = engine.generate(prompts, params)
                    if r:  # the first round warms up
                        times[kind].append((decode.seconds - t) / (new - 1))  # decoding steps after the prefill
                        mask[kind].append((sum(tm.seconds for tm in timers.values()) - before) / new)
                    assert all(len(o.outputs[0].token_ids) == new for o in outs), "a row ended early"
            step = {k: statistics.median(v) for k, v in times.items()}
            step |= {k + "_mask": statistics.median(v) for k, v in mask.items()}
            applying = _applying(engine, grammar, B, V)
            cost = step["in_place_mask"] + applying
            share = cost / step["in_place"]
            print(f"batch {B:3d}: decoding step {1e3 * step['in_place']:7.2f} ms constrained with masks in place, "
                  f"{1e3 * step['constrained']:7.2f} ms with masks computed while the model runs; masks "
                  f"{1e3 * step['in_place_mask']:.3f} ms computing and advancing + {1e3 * applying:.3f} ms applying "
                  f"= {100 * share:4.1f}% of the step (free step {1e3 * step['free']:.2f} ms, other tokens)",
                  flush=True)
            results.update({f"b{B}_free_ms": 1e3 * step["free"], f"b{B}_in_place_ms": 1e3 * step["in_place"],
                            f"b{B}_overlapped_ms": 1e3 * step["constrained"], f"b{B}_mask_share": share})
    finally:
        engine.runner.masker.overlap = True
        for name, timer in timers.items():
            setattr(constraint, name, timer.fn)
    if args.libraries:
        compare_libraries(tok, V)
    return results


def _applying(engine, grammar, B: int, V: int) -> float:
    """Seconds the sampler spends applying B rows' masks to their logits (B, V) (`constraint.masked`)."""
    from qiusuo.infer import constraint
    from qiusuo.runtime import median_time

    compiled = engine.grammars.compile(grammar)
    rows = [SimpleNamespace(constraint=compiled.start(), req=SimpleNamespace(stop_ids=set())) for _ in range(B)]
    held, mask = constraint.allowed(rows, V)
    logits = torch.randn(B, V)

    return median_time(lambda: constraint.masked(logits, held, mask), repeats=20)


# ---- llguidance against xgrammar ----

def _walk(mask_fn, consume, vocab: int, steps: int, seed: int) -> list[float]:
    """Seconds of each mask on a seeded random walk of at most `steps` allowed tokens."""
    from qiusuo.infer.constraint import unpack

    rng, times = random.Random(seed), []
    for _ in range(steps):
        t = time.perf_counter()
        bits = mask_fn()
        times.append(time.perf_counter() - t)
        ids = unpack(bits, vocab)[0].nonzero().flatten().tolist()
        if not ids or not consume(ids[rng.randrange(len(ids))]):
            break
    return times


def _llguidance(tok, vocab: int):
    import llguidance
    import llguidance.torch as lt

    from qiusuo.infer.constraint import JSON_OPTIONS, Grammars

    t = time.perf_counter()
    ll = Grammars(tok, vocab, {tok.eos_id} - {None}).tokenizer
    setup_s = time.perf_counter() - t

    def compile_(schema):
        m = llguidance.LLMatcher(ll, llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS),
                                 log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def mask(m):
        bits = lt.allocate_token_bitmask(1, vocab)
        lt.fill_next_token_bitmask(m, bits, 0)
        return bits

    def accepts(m, text):
        return all(m.consume_token(i) for i in tok.encode(text, add_bos=False, parse_special=False))

    return setup_s, compile_, mask, lambda m, i: m.consume_token(i) and not m.is_stopped(), accepts


def _xgrammar(tok, vocab: int):
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    t = time.perf_counter()
    info = xgrammar.TokenizerInfo.from_huggingface(PreTrainedTokenizerFast(tokenizer_object=tok._hf),
                                                   vocab_size=vocab, stop_token_ids=[tok.eos_id])
    compiler = xgrammar.GrammarCompiler(info, max_threads=1)
    setup_s = time.perf_counter() - t

    def compile_(schema):
        return xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))

    def mask(m):
        bits = xgrammar.allocate_token_bitmask(1, vocab)
        m.fill_next_token_bitmask(bits, 0)
        return bits

    def accepts(m, text):
        return all(m.accept_token(i) for i in tok.encode(text, add_bos=False, parse_special=False))

    return setup_s, compile_, mask, lambda m, i: m.accept_token(i) and not m.is_terminated(), accepts


def compare_libraries(tok, vocab: int) -> None:
    for name, make in (("llguidance", _llguidance), ("xgrammar", _xgrammar)):
        try:
            setup_s, compile_, mask, consume, accepts = make(tok, vocab)
        except ImportError as e:
            print(f"{name}: not installed ({e}); skipped")
            continue
        compiled, masks, failed = [], [], []
        for i, schema in enumerate(COMPILES):
            t = time.perf_counter()
            try:
                m = compile_(schema)
            except Exception as e:  # noqa: BLE001 - a library's refusal is a figure here
                failed.append(f"schema {i}: {str(e).splitlines()[0][:80]}")
                continue
            compiled.append(time.perf_counter() - t)
            masks += _walk(lambda: mask(m), lambda t_: consume(m, t_), vocab, 64, i)
        verdicts = []
        for kw, (schema, bad) in KEYWORDS.items():
            try:
                m = compile_(schema)
            except Exception:  # noqa: BLE001
                verdicts.append(f"{kw}: refused")
                continue
            verdicts.append(f"{kw}: {'IGNORED (accepts ' + bad + ')' if accepts(m, bad) else 'enforced'}")
        masks.sort()
        print(f"{name}: tokenizer index {setup_s:.2f} s; {len(compiled)}/{len(COMPILES)} schemas compiled, median "
              f"{1e3 * statistics.median(compiled):.1f} ms, worst {1e3 * max(compiled):.1f} ms; mask median "
              f"{1e6 * statistics.median(masks):.0f} us, p90 {1e6 * masks[int(0.9 * len(masks))]:.0f} us, worst "
              f"{1e6 * masks[-1]:.0f} us over {len(masks)} steps")
        for line in failed + verdicts:
            print(f"    {line}")
