"""`qiusuo bench decode`: decoding tokens/s with the latent cache (`Transformer.generate`, eager and compiled)
against transformers' `generate` on the same model (same config, weights, prompt, dtype) in the same run."""

from __future__ import annotations

import argparse

import torch

from qiusuo.config import get_config
from qiusuo.model.transformer import Transformer
from qiusuo.perf.common import device_sync, median_time, transformers_twin


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="bench", help="model size from the registry")
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="sequences decoded together")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per sequence")
    p.add_argument("--repeats", type=int, default=3, help="timed generations per measurement (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and cache dtype")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--no-reference", action="store_true", help="skip the transformers reference")


def run(args: argparse.Namespace) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    cfg = get_config(args.preset, num_nextn_predict_layers=0)
    model = Transformer(cfg).to(device).eval()
    twin = None if args.no_reference else transformers_twin(model, dtype)
    model.to(dtype)
    new = args.new_tokens
    print(f"device {device}, {args.dtype}, config {args.preset}: prompt {args.prompt_len} + {new} new tokens, "
          f"latent cache {cfg.cache_bytes_per_token(torch.finfo(dtype).bits // 8)} bytes/token", flush=True)
    results = {}
    for B in args.batch:
        x = torch.randint(0, cfg.vocab_size, (B, args.prompt_len), device=device)
        runs = {"qiusuo": lambda: model.generate(x, new)}
        if not args.no_compile:
            model.generate(x, new, compile=True)  # compile outside the timing
            runs["qiusuo+compile"] = lambda: model.generate(x, new, compile=True)
        if twin is not None:
            runs["transformers"] = lambda: twin.generate(x, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        for who, fn in runs.items():
            with torch.inference_mode():
                t = median_time(fn, repeats=args.repeats, warmup=1, sync=device_sync(device))
            results[(who, B)] = B * new / t
            print(f"batch {B:3d} {who:15s} {results[(who, B)]:9.1f} tokens/s", flush=True)
        if twin is not None:
            for who in runs:
                if who != "transformers":
                    print(f"batch {B:3d} {who} / transformers: {results[(who, B)] / results[('transformers', B)]:.2f}x", flush=True)
    return {f"{w}/{b}": v for (w, b), v in results.items()}
