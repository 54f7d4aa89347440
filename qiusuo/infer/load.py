"""Loading a model folder for serving, in one place: model, tokenizer and the Engine over them, and the options
that choose them, shared by `generate`, `chat` and `serve`. Imports no command: the server and the commands
both call this; `qiusuo inspect --load` measures a load made by it (`measure_load`)."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from qiusuo.hf.inspect import predicted_bytes
from qiusuo.cache.precision import KV_CACHE_DTYPES
from qiusuo.hf.load import check_model_folder, dtype_arg, load_model, load_tokenizer, parse_dtype
from qiusuo.infer.engine import Engine
from qiusuo.infer.generation_config import read_generation_config
from qiusuo.quant.apply import set_activations
from qiusuo.runtime import resolve_device, set_threads


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Options every engine-backed command shares (generate, chat, serve)."""
    p.add_argument("--model", required=True, help="model folder (Hugging Face layout: config.json, safetensors, "
                   "tokenizer); a run's is RUN/model")
    p.add_argument("--device", default=None, help="cpu, cuda, ...; unset: cuda when available")
    p.add_argument("--dtype", default=None, type=dtype_arg, choices=["float32", "bfloat16", "float16"],
                   help="weights and cache dtype (bf16, fp16, fp32 too); unset: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--block-size", type=int, default=16, help="tokens per cache block")
    p.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                   help="cache precision: 'auto' (the weights' --dtype), 'bf16', or 'fp8' (keys in FP8 e4m3 with a "
                   "scale per 64 values and their rotary parts in bf16, as DeepSeek stores them: about half the "
                   "bytes per token of context, so twice the context in the same --cache-memory-mb)")
    p.add_argument("--cache-memory-mb", type=int, default=None,
                   help="cache budget in MiB; unset: every batch row at full context, at most 1024")
    p.add_argument("--max-model-len", type=int, default=None, help="context length; unset: the model's")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: the cores other processes leave "
                   "free at start (spinning threads that share a core with a busy neighbour wait for it every op)")
    p.add_argument("--compile", action="store_true", help="decode through torch.compile: ~2x faster small batches "
                   "on a CPU, after tens of seconds of compiling per new batch shape")
    p.add_argument("--speculative", choices=["mtp"], default=None,
                   help="speculative decoding: draft with the checkpoint's MTP module, verify in one forward "
                   "(identical greedy output, the same sampling distribution)")
    p.add_argument("--draft-tokens", type=int, default=1, help="tokens drafted per step with --speculative")
    p.add_argument("--experts-device", default=None, metavar="DEV",
                   help="keep the routed experts on this device (e.g. cpu, with the rest on --device cuda): only "
                   "activations cross during a step")
    p.add_argument("--gpu-experts", type=int, default=0, metavar="N",
                   help="with --experts-device: also keep each layer's N most used experts on --device (ranked by "
                   "routing over a calibration text, or --calibration FILE)")
    p.add_argument("--calibration", default=None, metavar="FILE", help="text whose routing ranks the experts for "
                   "--gpu-experts (default: a short built-in mix of prose, code, numbers and languages)")
    p.add_argument("--mmap", action="store_true", help="keep the packed experts in memory-mapped files the page "
                   "cache holds: a model larger than free RAM starts and runs, slowly (the first load writes them "
                   "under $QIUSUO_CACHE, later ones map them)")
    p.add_argument("--quantize", default="native", metavar="SPEC",
                   help="which weights stay packed in memory: 'native' (the checkpoint's own FP8 / FP4 / int4 / int8 "
                   "tensors stay as stored, the rest in --dtype), 'none' (everything in --dtype), a format for every "
                   "family (int4, int4:64, int8, fp8, mxfp4, bf16) or per family: experts=int4,attention=int8 "
                   "(families: experts, shared, dense, attention, head)")
    p.add_argument("--activations", default="q8", choices=["q8", "fp32"],
                   help="how packed int8 / int4 / mxfp4 layers multiply while decoding on a CPU: 'q8' quantises "
                   "each token's activations to int8 per block of 32 and sums integer products, as llama.cpp "
                   "does (about twice as fast at 4 bits); 'fp32' keeps activations exact")


def load_engine(path: str, *, device: str | None = None, dtype: str | None = None, max_batch: int = 32,
                block_size: int = 16, cache_memory: int | None = None, max_model_len: int | None = None,
                kv_cache_dtype: str = "auto", compile: bool = False, threads: int = 0, speculative: str | None = None,
                draft_tokens: int = 1, quantize: str | dict | None = "native", experts_device: str | None = None,
                gpu_experts: int = 0, calibration: str | None = None, mmap: bool = False,
                activations: str = "q8", lora: dict[str, str] | None = None) -> Engine:
    """The model in folder `path` with its tokenizer and generation_config.json, served by an Engine (`engine.model`,
    `engine.tokenizer`, `engine.generation`).
    device: unset = cuda when available; dtype (weights and cache): unset = bfloat16 on CUDA, float32 on CPU
    (CPUs without native bf16 run it far slower). cache_memory in bytes. kv_cache_dtype: the cache's precision
    ("auto": dtype's; "bf16"; "fp8": `qiusuo.cache.precision`). threads: torch's CPU threads on a CPU
    device (process-wide), 0 = the cores other processes leave free (`qiusuo.runtime.set_threads`), chosen before
    loading (which then runs at that width too). quantize: which weights stay packed (`qiusuo.quant.apply`);
    "native" keeps a published FP8 / FP4 / int4 checkpoint packed, so no float copy of it ever exists.
    experts_device / gpu_experts / calibration: experts placed apart from the rest (`qiusuo.quant.placement`).
    activations: the packed layers' decoding arithmetic (`qiusuo.quant.apply.set_activations`).
    lora: {name: peft adapter folder}: every adapter over the one base, in banks (`qiusuo.lora.peft.attach`), a
    request choosing its own (`Engine.submit(adapter=name)`)."""
    dev = resolve_device(device)
    set_threads(dev, threads)
    dt = parse_dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if lora and experts_device is not None:
        raise ValueError("--lora with --experts-device: adapters on experts placed apart are not supported; serve "
                         "adapters with the experts on --device")
    if gpu_experts and experts_device is None:
        raise ValueError("--gpu-experts keeps some experts on --device beside the rest on --experts-device: give "
                         "--experts-device (e.g. cpu) as well")
    model = set_activations(load_model(path, dtype=dt, device=dev, quantize=quantize, experts_device=experts_device,
                                       mmap=mmap), activations)
    tokenizer = load_tokenizer(path)
    adapters = []
    if lora:
        from qiusuo.lora.peft import attach

        adapters = attach(model, lora)
    if gpu_experts:
        from qiusuo.quant.placement import CALIBRATION, place_experts, routing_counts

        text = open(calibration, encoding="utf-8").read() if calibration else CALIBRATION
        ids = torch.tensor([tokenizer.encode(text)[: model.cfg.max_position_embeddings]], device=dev)
        place_experts(model, experts_device, gpu_experts, routing_counts(model, ids))
    return Engine(model, tokenizer, max_batch=max_batch, block_size=block_size, cache_memory=cache_memory,
                  max_model_len=max_model_len, kv_cache_dtype=kv_cache_dtype, compile=compile,
                  generation=read_generation_config(path),
                  speculative=speculative, draft_tokens=draft_tokens, adapters=adapters)


def engine_from_args(args: argparse.Namespace, max_batch: int, lora: dict[str, str] | None = None) -> Engine:
    """`load_engine` with the options of `add_engine_args` (and `qiusuo serve`'s adapters)."""
    check_model_folder(args.model, "--model")
    mem = args.cache_memory_mb * 2**20 if args.cache_memory_mb else None
    return load_engine(args.model, device=args.device, dtype=args.dtype, max_batch=max_batch,
                       block_size=args.block_size, cache_memory=mem, max_model_len=args.max_model_len,
                       kv_cache_dtype=args.kv_cache_dtype,
                       compile=args.compile, threads=args.threads, speculative=args.speculative,
                       draft_tokens=args.draft_tokens, quantize=args.quantize, experts_device=args.experts_device,
                       gpu_experts=args.gpu_experts, calibration=args.calibration, mmap=args.mmap,
                       activations=args.activations, lora=lora)


def measure_load(path: Path, quantize: str, dtype, batch: int, context: int | None) -> dict:
    """`qiusuo inspect --load`: load the folder as `qiusuo serve` does (`load_engine`, CPU) and measure: seconds,
    the peak resident memory of the load over what the process held before, the resident memory after it, and their
    prediction (`qiusuo.hf.inspect.predicted_bytes` + the engine's cache pool). Linux (/proc/self)."""
    dtype = parse_dtype(dtype) or torch.float32
    page = os.sysconf("SC_PAGE_SIZE")
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * page  # noqa: E731
    predicted = predicted_bytes(path, quantize, dtype)
    with open("/proc/self/clear_refs", "w") as f:  # peak from here on, not the imports'
        f.write("5")
    before, t = rss(), time.perf_counter()
    engine = load_engine(str(path), device="cpu", dtype=str(dtype).removeprefix("torch."), quantize=quantize,
                         max_batch=batch, max_model_len=context)
    seconds = time.perf_counter() - t
    after = rss()
    peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    pool = engine.pool
    cache = int(pool.bytes_per_token * pool.num_blocks * pool.block_size)
    held = {id(t): t for t in [*engine.model.parameters(), *engine.model.buffers()]}
    largest = max((t.numel() * t.element_size() for t in held.values()), default=0)
    return {"quantize": quantize, "dtype": str(dtype).removeprefix("torch."), "seconds": seconds,
            "predicted_weights": predicted, "predicted_cache": cache, "resident": after - before,
            "peak": peak - before, "largest_tensor": largest,
            "resident_over_predicted": (after - before) / (predicted + cache)}
