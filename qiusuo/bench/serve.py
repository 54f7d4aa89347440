"""`qiusuo bench serve`: the OpenAI-compatible server on 127.0.0.1 under load, bounded in requests and time.

Scenarios (`--scenario`, `all` runs each in turn):
- `load`: N concurrent streaming clients; output tokens/s, time to first token and inter-token latency.
- `hog`: a short greedy request alone, then again while one streaming request with `n=64` long samples holds the
  batch; the ratio is what admission fairness buys.
- `disconnect`: non-streaming long requests whose clients close their sockets after 0.5 s; the CPU seconds the
  process spends and the tokens it generates in the next seconds (work for nobody: should be near zero).
- `shutdown`: a real `qiusuo serve` process with long and short streams in flight gets SIGTERM; the seconds until
  it exits, and how many streams ended with `data: [DONE]`.

Runs on the `bench` preset with random weights unless given `--model DIR` (speed does not depend on the weights'
values). Prompts are random token ids, different per request, so the prefix cache cannot turn one into a hit.
The clients speak HTTP only, so this file also measures an older server (the "before" figures in docs/performance.md and docs/serving.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from qiusuo.bench.common import DTYPES, add_device_args, add_model_args, load_model, load_tokenizer, setup

SCENARIOS = ["load", "hog", "disconnect", "shutdown"]


def add_args(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    add_device_args(p)
    p.add_argument("--scenario", default="load", choices=SCENARIOS + ["all"], help="what to measure (see above)")
    p.add_argument("--prompt-len", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated per request (load)")
    p.add_argument("--clients", type=int, default=32, help="concurrent streaming clients (load); the batch size")
    p.add_argument("--requests", type=int, default=64, help="requests in total, spread over the clients (load)")
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop starting new requests after this long")
    p.add_argument("--hog-tokens", type=int, default=1000, help="max_tokens of each of the hog's 64 samples")
    p.add_argument("--short-tokens", type=int, default=16, help="max_tokens of the short request (hog)")
    p.add_argument("--watch-seconds", type=float, default=5.0, help="how long to watch after disconnects")
    p.add_argument("--exit-wait", type=float, default=45.0, help="shutdown: SIGKILL the server after this long")


def _pct(xs: list[float], q: float) -> float:
    """The q-quantile of `xs` (nearest rank; NaN when empty)."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def _body(name: str, prompt: list[int], new: int, stream: bool, **kw) -> dict:
    return {"model": name, "prompt": prompt, "max_tokens": new, "temperature": 0, "ignore_eos": True,
            "stream": stream, **kw}


async def _stream(http, url: str, body: dict, stats: dict | None = None) -> bool:
    """One streaming request; adds tokens, time to first token and inter-token gaps to `stats`. True when the
    stream ended with `data: [DONE]`."""
    t0 = last = time.perf_counter()
    first, done = None, False
    async with http.stream("POST", f"{url}/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            if stats is not None:
                stats["errors"] += 1
            return False
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            if not line.startswith("data: ") or done or stats is None:
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk.get("usage"):
                stats["tokens"] += chunk["usage"]["completion_tokens"]
            elif chunk.get("choices"):
                if first is None:
                    first = now
                    stats["ttft"].append(now - t0)
                else:
                    stats["itl"].append(now - last)
                last = now
    if stats is not None:
        stats["done"] += 1
    return done


def _prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    return [torch.randint(0, vocab, (length,)).tolist() for _ in range(count)]


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run(args: argparse.Namespace) -> dict:
    """Build the model, run the chosen scenarios, print and return their figures."""
    device = setup(args)
    model = load_model(args, device).to(DTYPES[args.dtype])
    tok = load_tokenizer(args)
    out = {}
    for name in SCENARIOS if args.scenario == "all" else [args.scenario]:
        out[name] = globals()[f"_{name}"](args, model, tok, device)
    return out if args.scenario == "all" else out[args.scenario]


def _in_process(model, tok, max_batch: int, max_model_len: int, max_queue: int):
    """An engine and a server in this process (`create_app`'s positional API, which older servers share)."""
    from qiusuo.infer.engine import Engine
    from qiusuo.infer.server import create_app, serve_in_thread

    engine = Engine(model, tok, max_batch=max_batch, block_size=16, max_model_len=max_model_len)
    server, url = serve_in_thread(create_app(engine, "bench", None, max_batch, max_queue))
    return engine, server, url


def _load(args, model, tok, device) -> dict:
    import httpx

    new, L = args.new_tokens, args.prompt_len
    engine, server, url = _in_process(model, tok, args.clients, L + new, args.requests)
    stats = {"tokens": 0, "done": 0, "errors": 0, "ttft": [], "itl": []}

    async def client(jobs: asyncio.Queue, deadline: float) -> None:
        async with httpx.AsyncClient(timeout=None) as http:
            while time.perf_counter() < deadline and not jobs.empty():
                await _stream(http, url, _body("bench", jobs.get_nowait(), new, True), stats)

    async def main() -> float:
        jobs: asyncio.Queue = asyncio.Queue()
        for p in _prompts(args.requests, L, model.cfg.vocab_size):
            jobs.put_nowait(p)
        t0 = time.perf_counter()
        await asyncio.gather(*(client(jobs, t0 + args.max_seconds) for _ in range(args.clients)))
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
    print(f"load: {args.clients} clients, {stats['done']} requests ({stats['errors']} errors) of {L} + {new} tokens "
          f"in {wall:.1f} s on {device}, {args.dtype}, {args.model or args.preset}, {torch.get_num_threads()} threads")
    print(f"load: output {out['output_tokens_per_s']:.1f} tokens/s; time to first token p50/p90/p99 "
          f"{out['ttft_p50_ms']:.0f}/{out['ttft_p90_ms']:.0f}/{out['ttft_p99_ms']:.0f} ms; inter-token latency "
          f"p50/p90/p99 {out['itl_p50_ms']:.1f}/{out['itl_p90_ms']:.1f}/{out['itl_p99_ms']:.1f} ms")
    return out


def _hog(args, model, tok, device) -> dict:
    import httpx

    L, H, S = args.prompt_len, args.hog_tokens, args.short_tokens
    engine, server, url = _in_process(model, tok, args.clients, L + H, 64)
    short, hog = _prompts(2, L, model.cfg.vocab_size)

    async def timed(http) -> float:
        t = time.perf_counter()
        r = await http.post(f"{url}/v1/completions", json=_body("bench", short, S, False))
        r.raise_for_status()
        return time.perf_counter() - t

    async def main() -> tuple[float, float]:
        async with httpx.AsyncClient(timeout=None) as http:
            await timed(http)  # warm-up
            alone = await timed(http)
            async with http.stream("POST", f"{url}/v1/completions",
                                   json=_body("bench", hog, H, True, n=64)) as r:
                lines = r.aiter_lines()  # kept referenced: closing the iterator would close the stream
                async for line in lines:
                    if line.startswith("data: "):
                        break  # the hog is running
                crowded = await timed(http)
            return alone, crowded  # leaving the block closes the hog's stream: the server aborts it

    try:
        alone, crowded = asyncio.run(main())
    finally:
        server.should_exit = True
        engine.shutdown()
    print(f"hog: a {S}-token greedy request took {alone:.2f} s alone and {crowded:.2f} s while one request with "
          f"n=64, max_tokens={H} streamed (x{crowded / alone:.1f}); batch {args.clients}, {torch.get_num_threads()} "
          f"threads")
    return {"short_alone_s": alone, "short_with_hog_s": crowded, "ratio": crowded / alone}


def _disconnect(args, model, tok, device) -> dict:
    L, k = args.prompt_len, 4
    engine, server, url = _in_process(model, tok, args.clients, 2048, 64)
    host, port = url.removeprefix("http://").split(":")
    try:
        socks = []
        for p in _prompts(k, L, model.cfg.vocab_size):
            body = json.dumps(_body("bench", p, 2048 - L, False)).encode()
            s = socket.create_connection((host, int(port)))
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            socks.append(s)
        time.sleep(0.5)
        for s in socks:
            s.close()  # the clients go away
        time.sleep(0.2)
        cpu0, tok0, t0 = _cpu_seconds(), engine.stats["generation_tokens"], time.perf_counter()
        time.sleep(args.watch_seconds)
        cpu, toks = _cpu_seconds() - cpu0, engine.stats["generation_tokens"] - tok0
        wall = time.perf_counter() - t0
    finally:
        server.should_exit = True
        engine.shutdown()
    print(f"disconnect: {k} non-streaming requests of {2048 - L} tokens whose clients left after 0.5 s: in the next "
          f"{wall:.1f} s the process used {cpu:.2f} CPU s and generated {toks} tokens")
    return {"cpu_s": cpu, "tokens_after": toks, "watched_s": wall}


def _shutdown(args, model, tok, device) -> dict:
    import httpx

    from qiusuo.hf import save_hf
    from qiusuo.infer.server import free_port

    L = args.prompt_len
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryFile("w+") as log:
        save_hf(model, d, tokenizer=tok)
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "qiusuo", "serve", "--model", d, "--port", str(port),
                                 "--max-model-len", "2048", "--device", str(device)],
                                stdout=log, stderr=log, text=True)  # a file: a full pipe would block the server
        url, name = f"http://127.0.0.1:{port}", os.path.basename(os.path.normpath(d))
        try:
            for _ in range(1200):
                try:
                    if httpx.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if proc.poll() is not None:
                    log.seek(0)
                    raise RuntimeError(f"the server exited: {log.read()[-2000:]}")
                time.sleep(0.1)

            async def main() -> tuple[list[bool], float]:
                async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5)) as http:
                    bodies = [_body(name, p, 1500 if i < 8 else 24, True)
                              for i, p in enumerate(_prompts(12, L, model.cfg.vocab_size))]
                    tasks = [asyncio.create_task(_stream(http, url, b)) for b in bodies]
                    while engine_running(await http.get(url + "/metrics")) < 12:
                        await asyncio.sleep(0.05)
                    t0 = time.perf_counter()
                    proc.send_signal(signal.SIGTERM)
                    while proc.poll() is None and time.perf_counter() - t0 < args.exit_wait:
                        await asyncio.sleep(0.02)
                    took = time.perf_counter() - t0
                    if proc.poll() is None:
                        proc.kill()
                    results = await asyncio.gather(*tasks, return_exceptions=True)
                    return [r is True for r in results], took

            done, took = asyncio.run(main())
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    exited = took < args.exit_wait
    print("shutdown: SIGTERM with 8 long and 4 short streams in flight: "
          + (f"exited after {took:.2f} s" if exited else f"still running after {took:.0f} s (killed)")
          + f"; [DONE] on {sum(done[8:])}/4 short and {sum(done[:8])}/8 long streams")
    return {"exit_s": took if exited else None, "short_done": sum(done[8:]), "long_done": sum(done[:8])}


def engine_running(r) -> int:
    """Running plus waiting sequences, from a /metrics response."""
    n = 0
    for line in r.text.splitlines():
        if line.startswith(("qiusuo_running_sequences ", "qiusuo_queue_depth ")):
            n += int(float(line.split()[1]))
    return n
