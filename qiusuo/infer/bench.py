"""Serving benchmarks, wired into `qiusuo bench` by `qiusuo/bench.py`:

- `qiusuo bench engine` (`add_decode_args` / `run_decode`): decoding tokens/s of the serving `Engine` (paged
  latent cache, continuous batching, per-request sampling and detokenisation all included) at batch 1 and 32,
  against transformers' `generate` on the same model (same config, weights, dtype, prompt lengths) in the same run.
- `qiusuo bench serve` (`add_serve_args` / `run_serve`): a load test of the OpenAI-compatible server on
  127.0.0.1: N concurrent streaming clients, bounded in requests and time; output tokens/s, time to first token
  and inter-token latency percentiles.

Both run on the `bench` preset with random weights unless given `--model DIR` (speed does not depend on the
weights' values). Prompts are random token ids, different per row and per repeat, so the prefix cache cannot
turn a repeat into a cache hit.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import time

import torch

from qiusuo.config import get_config
from qiusuo.infer.engine import Engine
from qiusuo.infer.sampling import SamplingParams
from qiusuo.model.transformer import Transformer
from qiusuo.perf.common import device_sync, median_time


def _bench_tokenizer():
    """A small BPE tokenizer with our special tokens. Ids past its vocabulary decode to nothing, which keeps the
    engine's per-step detokenisation in the measurement without needing a trained 8k vocabulary."""
    from qiusuo.data.tokenizer import Tokenizer

    text = ["The quick brown fox jumps over the lazy dog; continuous batching joins and leaves. "] * 8
    return Tokenizer.train(text, vocab_size=320)


def _model_and_tokenizer(args: argparse.Namespace):
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if args.model:
        import qiusuo

        return qiusuo.load_model(args.model, dtype=dtype, device=device), qiusuo.load_tokenizer(args.model)
    torch.manual_seed(0)
    model = Transformer(get_config(args.preset, num_nextn_predict_layers=0)).to(device).eval()
    return model, _bench_tokenizer()


def _twin(model, dtype: torch.dtype):
    """transformers' model with our weights (through our HF export); random weights of the same shape if the
    export is unavailable (decoding speed does not depend on the values)."""
    from qiusuo.perf.common import transformers_twin

    try:
        return transformers_twin(model, dtype), "same weights"
    except Exception as e:  # noqa: BLE001 - the reference must not sink the benchmark
        from transformers import AutoConfig, AutoModelForCausalLM

        hf = model.cfg.to_hf()
        conf = AutoConfig.for_model(hf.pop("model_type"), **hf)
        twin = AutoModelForCausalLM.from_config(conf, dtype=dtype, attn_implementation="sdpa").eval()
        return twin.to(next(model.parameters()).device), f"random weights ({type(e).__name__}: {e})"


def _common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model folder to load (default: random weights of --preset)")
    p.add_argument("--preset", default="bench", help="model size from the registry when no --model is given")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, ...")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and cache dtype")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default). On a busy "
                   "machine 1 can be ~10x faster: spinning OpenMP workers fight other processes for cores")


def add_decode_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="requests decoded together")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    p.add_argument("--no-reference", action="store_true", help="skip the transformers reference")
    p.add_argument("--no-compile", action="store_true", help="skip the engine with a compiled decoding step "
                   "(compiling each batch shape takes tens of seconds on a CPU, outside the timing)")


def run_decode(args: argparse.Namespace) -> dict:
    model, tok = _model_and_tokenizer(args)
    cfg, dtype, device = model.cfg, getattr(torch, args.dtype), torch.device(args.device)
    twin, how = (None, "") if args.no_reference else _twin(model, dtype)
    model.to(dtype)
    new, L = args.new_tokens, args.prompt_len
    engines = {"qiusuo engine": Engine(model, tok, max_batch=max(args.batch), block_size=16, max_model_len=L + new)}
    if not args.no_compile:
        engines["qiusuo compiled"] = Engine(model, tok, max_batch=max(args.batch), block_size=16,
                                            max_model_len=L + new, compile=True)
    engine = engines["qiusuo engine"]
    print(f"device {device}, {args.dtype}, {args.model or args.preset}: prompt {L} + {new} new tokens; "
          f"latent cache {engine.pool.bytes_per_token} bytes/token (formula "
          f"{cfg.cache_bytes_per_token(torch.finfo(dtype).bits // 8)}); reference: transformers generate, {how}")
    params = SamplingParams(max_tokens=new, temperature=0, ignore_eos=True)
    results: dict[str, float] = {}
    for B in args.batch:
        def ours(engine: Engine):
            prompts = torch.randint(0, cfg.vocab_size, (B, L)).tolist()  # fresh ids: no prefix-cache hits
            outs = engine.generate(prompts, params)
            assert all(len(o.outputs[0].token_ids) == new for o in outs)

        runs = {who: functools.partial(ours, e) for who, e in engines.items()}
        if twin is not None:
            def ref():
                x = torch.randint(0, cfg.vocab_size, (B, L), device=device)
                twin.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                              do_sample=False)
            runs["transformers"] = ref
        for who, fn in runs.items():
            with torch.inference_mode():
                t = median_time(fn, repeats=args.repeats, warmup=1, sync=device_sync(device))
            results[f"{who}/{B}"] = B * new / t
            print(f"batch {B:3d}  {who:15s} {B * new / t:9.1f} tokens/s  ({t:.2f} s per run, median of {args.repeats})")
        if twin is not None:
            for who in engines:
                ratio = results[f"{who}/{B}"] / results[f"transformers/{B}"]
                print(f"batch {B:3d}  {who} / transformers: {ratio:.2f}x")
    return results


def add_serve_args(p: argparse.ArgumentParser) -> None:
    _common_args(p)
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=64, help="requests in total, spread over the clients")
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop starting new requests after this long")


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def _client(url: str, name: str, jobs: asyncio.Queue, deadline: float, new: int, stats: dict) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=None) as http:
        while time.perf_counter() < deadline:
            try:
                prompt = jobs.get_nowait()
            except asyncio.QueueEmpty:
                return
            body = {"model": name, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
                    "stream": True}
            t0 = last = time.perf_counter()
            first = None
            async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                if r.status_code != 200:
                    stats["errors"] += 1
                    await r.aread()
                    continue
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    now = time.perf_counter()
                    if chunk.get("usage"):
                        stats["tokens"] += chunk["usage"]["completion_tokens"]
                    elif chunk["choices"]:
                        if first is None:
                            first = now
                            stats["ttft"].append(now - t0)
                        else:
                            stats["itl"].append(now - last)
                        last = now
            stats["done"] += 1


def run_serve(args: argparse.Namespace) -> dict:
    from qiusuo.infer.server import create_app, serve_in_thread

    model, tok = _model_and_tokenizer(args)
    model.to(getattr(torch, args.dtype))
    new, L = args.new_tokens, args.prompt_len
    engine = Engine(model, tok, max_batch=args.clients, block_size=16, max_model_len=L + new)
    name = "bench"
    server, url = serve_in_thread(create_app(engine, name, max_concurrency=args.clients, max_queue=args.requests))
    stats = {"tokens": 0, "done": 0, "errors": 0, "ttft": [], "itl": []}

    async def main() -> float:
        jobs: asyncio.Queue = asyncio.Queue()
        for _ in range(args.requests):
            jobs.put_nowait(torch.randint(0, model.cfg.vocab_size, (L,)).tolist())
        t0 = time.perf_counter()
        await asyncio.gather(*(_client(url, name, jobs, t0 + args.max_seconds, new, stats)
                               for _ in range(args.clients)))
        return time.perf_counter() - t0

    try:
        wall = asyncio.run(main())
    finally:
        server.should_exit = True
        engine.shutdown()
    ms = lambda xs, q: 1000 * _pct(xs, q)  # noqa: E731
    out = {"output_tokens_per_s": stats["tokens"] / wall, "requests": stats["done"], "errors": stats["errors"],
           "ttft_p50_ms": ms(stats["ttft"], 0.5), "ttft_p90_ms": ms(stats["ttft"], 0.9),
           "ttft_p99_ms": ms(stats["ttft"], 0.99), "itl_p50_ms": ms(stats["itl"], 0.5),
           "itl_p90_ms": ms(stats["itl"], 0.9), "itl_p99_ms": ms(stats["itl"], 0.99),
           "itl_mean_ms": 1000 * statistics.fmean(stats["itl"]) if stats["itl"] else float("nan")}
    print(f"{args.clients} clients, {stats['done']} requests ({stats['errors']} errors) of {L} + {new} tokens "
          f"in {wall:.1f} s on {args.device}, {args.dtype}, {args.model or args.preset}")
    print(f"output {out['output_tokens_per_s']:.1f} tokens/s; time to first token p50/p90/p99 "
          f"{out['ttft_p50_ms']:.0f}/{out['ttft_p90_ms']:.0f}/{out['ttft_p99_ms']:.0f} ms; inter-token latency "
          f"p50/p90/p99 {out['itl_p50_ms']:.1f}/{out['itl_p90_ms']:.1f}/{out['itl_p99_ms']:.1f} ms")
    return out
