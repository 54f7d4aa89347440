"""`qiusuo bench serve`: a load test of the OpenAI-compatible server on 127.0.0.1: N concurrent streaming clients,
bounded in requests and time; output tokens/s, time to first token and inter-token latency percentiles.

Runs on the `bench` preset with random weights unless given `--model DIR` (speed does not depend on the weights'
values). Prompts are random token ids, different per request, so the prefix cache cannot turn one into a hit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import torch

from qiusuo.bench.common import DTYPES, add_device_args, add_model_args, load_model, load_tokenizer, setup


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_device_args(p)
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    p.add_argument("--requests", type=int, default=64, help="requests in total, spread over the clients")
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop starting new requests after this long")


def _pct(xs: list[float], q: float) -> float:
    """The q-quantile of `xs` (nearest rank; NaN when empty)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


async def _client(url: str, name: str, jobs: asyncio.Queue, deadline: float, new: int, stats: dict) -> None:
    """One streaming client: takes prompts from `jobs` until none is left or `deadline` has passed, one request at
    a time, and adds its tokens, errors, times to first token and inter-token gaps to `stats`."""
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


def run(args: argparse.Namespace) -> dict:
    """Serve the model, run the clients, print and return the figures (tokens/s, TTFT and ITL percentiles)."""
    from qiusuo.infer.engine import Engine
    from qiusuo.infer.server import create_app, serve_in_thread

    device = setup(args)
    model = load_model(args, device).to(DTYPES[args.dtype])
    tok = load_tokenizer(args)
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
          f"in {wall:.1f} s on {device}, {args.dtype}, {args.model or args.preset}")
    print(f"output {out['output_tokens_per_s']:.1f} tokens/s; time to first token p50/p90/p99 "
          f"{out['ttft_p50_ms']:.0f}/{out['ttft_p90_ms']:.0f}/{out['ttft_p99_ms']:.0f} ms; inter-token latency "
          f"p50/p90/p99 {out['itl_p50_ms']:.1f}/{out['itl_p90_ms']:.1f}/{out['itl_p99_ms']:.1f} ms")
    return out
