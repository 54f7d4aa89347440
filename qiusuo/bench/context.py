"""`qiusuo bench context`: what long context costs, DeepSeek-V3 (MLA, latent cache) against DeepSeek-V4
(sliding window + CSA/HCA compressed caches) and DeepSeek-V3.2 (MLA reading the indexer's top-k), presets of
about the same size (`bench` with a query LoRA, `v32-bench` the same plus the indexer, `v4-bench`: 12.0M
parameters, 7.3M active), random weights, in the serving engine.

For each context length: a prompt of that length prefilled in chunks (`--chunk` tokens per forward), then
`--new-tokens` greedy tokens at batch 1; prints prefill tokens/s, decode tokens/s and the cache bytes the
sequence holds (blocks plus, for V4, its window state), the V4 / V3 ratios, the formula table of the published
shapes, and a plot (`--plot`, PNG) of decode cost and cache size against context length. `--kv-cache-dtype`
chooses the cache's precision (`fp8`: keys in FP8, rotary parts in bf16); `--compare-cache` instead times bf16 and
FP8 caches against each other in one run, their decoding steps interleaved.
"""

from __future__ import annotations

import argparse
import time

import torch

from qiusuo.bench.common import add_device_args, bench_tokenizer, setup
from qiusuo.cache.precision import KV_CACHE_DTYPES
from qiusuo.config import get_config
from qiusuo.model.count import cache_bytes_per_token
from qiusuo.model.transformer import Transformer

# arm -> (preset, overrides). V3 with the query LoRA V3.2 needs is V3.2's dense twin (the same model minus the
# indexer); `bench` itself (no query LoRA) was the V3 side of the first long-context table (docs/models.md)
PRESETS = {"V3": ("bench", {"q_lora_rank": 64}), "V3.2": ("v32-bench", {}), "V4": ("v4-bench", {})}
PUBLISHED = {"DeepSeek-V3": "deepseek-v3", "DeepSeek-V3.2": "deepseek-v3.2", "DeepSeek-V4-Flash": "deepseek-v4-flash",
             "DeepSeek-V4-Pro": "deepseek-v4-pro"}


def add_args(p: argparse.ArgumentParser) -> None:
    add_device_args(p, dtype=False)
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 8192, 65536], help="prompt lengths")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens decoded after each prompt")
    p.add_argument("--chunk", type=int, default=2048, help="prefill tokens per forward")
    p.add_argument("--models", nargs="+", default=list(PRESETS), choices=list(PRESETS), help="which arms to run")
    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="cache precision: auto (the model's fp32), bf16, fp8")
    p.add_argument("--plot", default=None, help="write the plot to this PNG")
    p.add_argument("--compare-cache", action="store_true", help="instead: decode speed of a bf16 and an FP8 cache "
                   "in one run, their decoding steps interleaved (separate runs differ by more than the effect)")
    p.add_argument("--rounds", type=int, default=24, help="with --compare-cache: rounds of 8 steps per cache")


def compare_cache(model: Transformer, context: int, rounds: int = 14, steps: int = 8) -> dict[str, float]:
    """Decoding tokens/s with a bf16 and an FP8 cache of `context` random tokens: each prefilled once (the
    contiguous cache of `Transformer.generate`, the engine's cache kinds), then `rounds` rounds of `steps` decoding
    steps of each, the order alternating; medians, and the FP8 / bf16 speed ratio of each round's pair with its
    quartiles. Interleaved and paired because this machine's speed drifts by 10-25% between runs minutes apart,
    more than the difference measured."""
    import statistics

    from qiusuo.cache.contiguous import ContiguousCache
    from qiusuo.cache.precision import CacheDtype

    dtype = next(model.parameters()).dtype
    ids = torch.randint(0, model.cfg.vocab_size, (1, context), generator=torch.Generator().manual_seed(0))
    caches, times = {}, {"bf16": [], "fp8": []}
    with torch.inference_mode():
        for name in times:
            caches[name] = ContiguousCache(model.cache_specs(), 1, context + steps * rounds + 1,
                                           dtype=CacheDtype.of(name, dtype))
            for i in range(0, context, 2048):
                model.hidden(ids[:, i: i + 2048], caches[name])
        nxt = torch.zeros(1, 1, dtype=torch.long)
        for r in range(rounds):
            for name in (("bf16", "fp8") if r % 2 else ("fp8", "bf16")):
                t = time.perf_counter()
                for _ in range(steps):
                    model.decode_step(nxt, caches[name].batch(1), None)
                times[name].append((time.perf_counter() - t) / steps)
    out = {name: 1 / statistics.median(ts) for name, ts in times.items()}
    ratios = sorted(b / f for b, f in zip(times["bf16"], times["fp8"]))
    quart = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return out | {"ratio": statistics.median(ratios), "ratio_q1": quart[0], "ratio_q3": quart[2]}


def measure(model: Transformer, tok, context: int, new: int, chunk: int,
            kv_cache_dtype: str = "auto") -> dict[str, float]:
    """Prefill `context` random tokens, decode `new`: seconds of each, and the sequence's cache bytes."""
    from qiusuo.infer.engine import Engine
    from qiusuo.infer.sampling import SamplingParams

    engine = Engine(model, tok, max_batch=1, max_model_len=context + new + 1, max_prefill_tokens=chunk,
                    cache_memory=1 << 34, kv_cache_dtype=kv_cache_dtype)
    prompt = torch.randint(0, model.cfg.vocab_size, (context,), generator=torch.Generator().manual_seed(0)).tolist()
    times: list[float] = []
    engine.submit(prompt, SamplingParams(max_tokens=new + 1, temperature=0, ignore_eos=True),
                  lambda d: times.append(time.perf_counter()))
    start = time.perf_counter()
    held = 0
    while engine.has_work():
        engine.step()
        held = max(held, engine.pool.used_blocks)
    pool = engine.pool
    cache = held * pool.block_size * pool.bytes_per_token + pool.state_bytes
    first = times[0]  # the first token's delta comes right after prefill
    return {"prefill_s": first - start, "decode_s": times[-2] - first, "cache_bytes": cache}


def run(args: argparse.Namespace) -> dict[str, float]:
    device = setup(args)
    tok = bench_tokenizer()
    longest = max(args.contexts) + args.new_tokens + 1
    print(f"device {device}, threads {torch.get_num_threads()}, fp32 weights, cache {args.kv_cache_dtype}, batch 1, "
          f"{args.new_tokens} new tokens, prefill in chunks of {args.chunk}", flush=True)
    results: dict[str, float] = {}
    for name in args.models:
        preset, over = PRESETS[name]
        torch.manual_seed(0)
        cfg = get_config(preset, **over, num_nextn_predict_layers=0, max_position_embeddings=longest + 256)
        model = Transformer(cfg).to(device).eval()
        for ctx in args.contexts:
            if args.compare_cache:
                r = compare_cache(model, ctx, args.rounds)
                results |= {f"{name}/{ctx}/{k}_decode_tok_s": r[k] for k in ("bf16", "fp8")}
                results |= {f"{name}/{ctx}/fp8_over_bf16{k[5:]}": r[k] for k in ("ratio", "ratio_q1", "ratio_q3")}
                print(f"{name} ({preset}) context {ctx:7d}: decode bf16 cache {r['bf16']:6.1f} tok/s, fp8 cache "
                      f"{r['fp8']:6.1f} tok/s: fp8 / bf16 {r['ratio']:.3f}x per round's pair (quartiles "
                      f"{r['ratio_q1']:.3f}-{r['ratio_q3']:.3f})", flush=True)
                continue
            r = measure(model, tok, ctx, args.new_tokens, args.chunk, args.kv_cache_dtype)
            results |= {f"{name}/{ctx}/prefill_tok_s": ctx / r["prefill_s"],
                        f"{name}/{ctx}/decode_tok_s": args.new_tokens / r["decode_s"],
                        f"{name}/{ctx}/cache_bytes": r["cache_bytes"]}
            print(f"{name} ({preset}) context {ctx:7d}: prefill {ctx / r['prefill_s']:8.0f} tok/s, decode "
                  f"{args.new_tokens / r['decode_s']:7.1f} tok/s, cache {r['cache_bytes'] / 2**20:8.2f} MiB", flush=True)
    if args.compare_cache:
        return results
    for ctx in args.contexts:
        for name in [m for m in args.models if m != "V3" and "V3" in args.models]:
            d = results[f"{name}/{ctx}/decode_tok_s"] / results[f"V3/{ctx}/decode_tok_s"]
            c = results[f"{name}/{ctx}/cache_bytes"] / results[f"V3/{ctx}/cache_bytes"]
            print(f"context {ctx:7d}: {name} / V3 decode speed {d:.2f}x, cache {c:.3f}x", flush=True)
    v32 = get_config("v32-bench")
    for ctx in args.contexts:  # what one decoding step reads per layer (formula; tests/model/test_v32.py checks k)
        k = min(v32.index_topk, ctx)
        print(f"reads per decoding step and layer at {ctx}: V3 {ctx} latents of {v32.latent_dim}; V3.2 {k} latents "
              f"+ {ctx} indexer keys of {v32.index_head_dim} ({(k * v32.latent_dim + ctx * v32.index_head_dim) / (ctx * v32.latent_dim):.2f}x the values)", flush=True)
    print("published shapes, cache bytes per token (formula, `qiusuo.model.count`):", flush=True)
    for dtype in ("bf16", "fp8"):
        for label, per_token in published_cache_bytes(dtype).items():
            print(f"  {label:18s} {dtype:4s} 128k {per_token[0]:10,.0f}   1M {per_token[1]:10,.0f}", flush=True)
    if args.plot:
        plot(results, args.contexts, args.plot, args.models)
    return results


def published_cache_bytes(dtype: str = "bf16") -> dict[str, tuple[float, float]]:
    """Cache bytes per token in `dtype` at 128k and 1M for the published shapes, from each model's layer cache
    specs (DeepSeek-V3.2 in bf16: V3's latent plus its 128-wide indexer key, 85,888 bytes per token at any
    length)."""
    return {label: tuple(cache_bytes_per_token(get_config(preset), dtype, n) for n in (1 << 17, 1 << 20))
            for label, preset in PUBLISHED.items()}


def plot(results: dict[str, float], contexts: list[int], path: str, models: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name in models:
        a.plot(contexts, [1e3 / results[f"{name}/{c}/decode_tok_s"] for c in contexts], "o-", label=name)
        b.plot(contexts, [results[f"{name}/{c}/cache_bytes"] / 2**20 for c in contexts], "o-", label=name)
    for ax, title in ((a, "decode ms per token"), (b, "cache MiB per sequence")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(title)
        ax.legend()
    fig.suptitle("DeepSeek-V3 vs V3.2 vs V4 (bench sizes): long context on this CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}", flush=True)
