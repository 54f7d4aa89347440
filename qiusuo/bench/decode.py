"""Decoding tokens/s against transformers' `generate` on the same model (same config, weights, dtype, prompt
lengths) in the same run, greedy, every sequence generating exactly `--new-tokens`:

- `qiusuo bench decode`: the model's own decoding over its contiguous latent cache (`Transformer.generate`),
  eager and compiled: the speed of the model code alone.
- `qiusuo bench engine`: the serving `Engine` (paged latent cache, continuous batching, per-request sampling and
  detokenisation all included), eager and with its compiled decoding step: what a server delivers.

Both go through one timing loop (`measure`). Engine prompts are fresh random ids per row and per repeat, so the
prefix cache cannot turn a repeat into a cache hit.
"""

from __future__ import annotations

import argparse
import functools
from typing import Callable

import torch

from qiusuo.bench.common import (DTYPES, add_device_args, add_model_args, load_model, load_tokenizer, setup,
                                 transformers_twin)
from qiusuo.model.count import cache_bytes_per_token
from qiusuo.runtime import device_sync, median_time


def add_args(p: argparse.ArgumentParser, batch: list[int]) -> None:
    """The flags both decoding benchmarks take; `batch`: the default --batch."""
    add_model_args(p)
    add_device_args(p)
    p.add_argument("--batch", type=int, nargs="+", default=batch, help="sequences decoded together")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per sequence")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--no-reference", action="store_true", help="skip the transformers reference")


def add_decode_args(p: argparse.ArgumentParser) -> None:
    add_args(p, batch=[1])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    add_args(p, batch=[1, 32])
    p.add_argument("--no-compile", action="store_true", help="skip the engine with a compiled decoding step "
                   "(compiling each batch shape takes tens of seconds on a CPU, outside the timing)")


def reference(twin, prompts: Callable[[], torch.Tensor], new: int) -> Callable[[], None]:
    """One greedy `generate` of `new` tokens by the transformers twin on `prompts()` (B, T) ids. Its speed depends
    on the ids (its MoE loops over the experts the tokens chose), so `bench decode` hands it the very prompts our
    side decodes; `bench engine` fresh ones per run, as its own side gets."""

    def run():
        x = prompts()
        twin.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new, do_sample=False)

    return run


def measure(runs: dict[str, Callable[[], None]], batch: int, new: int, repeats: int, device: torch.device,
            results: dict[str, float]) -> None:
    """Time each run (median of `repeats` after one warm-up), store `results["who/batch"]` in tokens/s and print
    it, then each run's ratio to "transformers" when that run is among them."""
    for who, fn in runs.items():
        with torch.inference_mode():
            t = median_time(fn, repeats=repeats, warmup=1, sync=device_sync(device))
        results[f"{who}/{batch}"] = batch * new / t
        print(f"batch {batch:3d}  {who:15s} {batch * new / t:9.1f} tokens/s  ({t:.2f} s per run, median of {repeats})",
              flush=True)
    if "transformers" in runs:
        for who in runs:
            if who != "transformers":
                ratio = results[f"{who}/{batch}"] / results[f"transformers/{batch}"]
                print(f"batch {batch:3d}  {who} / transformers: {ratio:.2f}x", flush=True)


def _model_and_twin(args: argparse.Namespace):
    """(device, model in --dtype, twin or None, how the twin was made)."""
    device = setup(args)
    dtype = DTYPES[args.dtype]
    model = load_model(args, device)
    twin, how = (None, "skipped") if args.no_reference else transformers_twin(model, dtype)
    return device, model.to(dtype).eval(), twin, how


def run_decode(args: argparse.Namespace) -> dict[str, float]:
    """`qiusuo bench decode`: {"who/batch": tokens/s} for qiusuo (eager, +compile) and transformers."""
    device, model, twin, how = _model_and_twin(args)
    cfg, new, L = model.cfg, args.new_tokens, args.prompt_len
    print(f"device {device}, {args.dtype}, config {args.model or args.preset}: prompt {L} + {new} new tokens, "
          f"cache {cache_bytes_per_token(cfg, DTYPES[args.dtype], L + new):.0f} bytes/token; reference: "
          f"transformers generate, {how}", flush=True)
    results: dict[str, float] = {}
    for B in args.batch:
        x = torch.randint(0, cfg.vocab_size, (B, L), device=device)  # (B, L) prompt ids, the same for both sides
        runs = {"qiusuo": lambda: model.generate(x, new)}
        if not args.no_compile:
            model.generate(x, new, compile=True)  # compile outside the timing
            runs["qiusuo+compile"] = lambda: model.generate(x, new, compile=True)
        if twin is not None:
            runs["transformers"] = reference(twin, lambda: x, new)
        measure(runs, B, new, args.repeats, device, results)
    return results


def run_engine(args: argparse.Namespace) -> dict[str, float]:
    """`qiusuo bench engine`: {"who/batch": tokens/s} for the engine (eager, compiled step) and transformers."""
    from qiusuo.infer.engine import Engine
    from qiusuo.infer.sampling import SamplingParams

    device, model, twin, how = _model_and_twin(args)
    cfg, new, L = model.cfg, args.new_tokens, args.prompt_len
    tok = load_tokenizer(args)
    make = functools.partial(Engine, model, tok, max_batch=max(args.batch), block_size=16, max_model_len=L + new)
    engines = {"qiusuo engine": make()}
    if not args.no_compile:
        engines["qiusuo compiled"] = make(compile=True)
    print(f"device {device}, {args.dtype}, {args.model or args.preset}: prompt {L} + {new} new tokens; "
          f"latent cache {engines['qiusuo engine'].pool.bytes_per_token:.0f} bytes/token (formula "
          f"{cache_bytes_per_token(cfg, DTYPES[args.dtype], L + new):.0f}); reference: transformers "
          f"generate, {how}",
          flush=True)
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)

    def ours(engine, B: int) -> None:
        prompts = torch.randint(0, cfg.vocab_size, (B, L)).tolist()  # fresh ids: no prefix-cache hits
        outs = engine.generate(prompts, params)
        assert all(len(o.outputs[0].token_ids) == new for o in outs)

    results: dict[str, float] = {}
    for B in args.batch:
        runs = {who: functools.partial(ours, e, B) for who, e in engines.items()}
        if twin is not None:
            runs["transformers"] = reference(twin, functools.partial(torch.randint, 0, cfg.vocab_size, (B, L),
                                                                     device=device), new)
        measure(runs, B, new, args.repeats, device, results)
    return results
