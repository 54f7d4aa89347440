"""Loading a model folder for serving, in one place: model, tokenizer and the Engine over them, and the options
that choose them, shared by `generate`, `chat` and `serve`. Imports no command: the server and the commands
both call this."""

from __future__ import annotations

import argparse
import os
import time

import torch

from qiusuo.hf.load import (check_model_folder, dtype_arg, load_model, load_tokenizer, parse_dtype,
                            read_generation_config)
from qiusuo.infer.engine import Engine
from qiusuo.runtime import resolve_device


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Options every engine-backed command shares (generate, chat, serve)."""
    p.add_argument("--model", required=True, help="model folder (Hugging Face layout: config.json, safetensors, "
                   "tokenizer); a run's is RUN/model")
    p.add_argument("--device", default=None, help="cpu, cuda, ...; unset: cuda when available")
    p.add_argument("--dtype", default=None, type=dtype_arg, choices=["float32", "bfloat16", "float16"],
                   help="weights and cache dtype (bf16, fp16, fp32 too); unset: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--block-size", type=int, default=16, help="tokens per cache block")
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


def free_cores() -> int:
    """Cores of this process's CPU set that other processes leave idle, at least 1: the busier of the 1-minute
    load average (what has been running) and a 0.2 s sample of /proc/stat (what runs now: a neighbour that
    just started is barely in the average yet).

    Why: torch's OpenMP threads wait for each other after every op, and a thread sharing a core with a busy
    process waits a scheduler slice each time. With another process busy on this 2-core machine, 64 greedy
    tokens took 45x longer with torch's default 2 threads than with 1 (issue 18)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    try:
        def sample() -> list[list[int]]:
            with open("/proc/stat") as f:
                return [[int(x) for x in line.split()[1:]] for line in f if line[:3] == "cpu" and line[3] != " "]
        a = sample()
        time.sleep(0.2)
        b = sample()
        # per CPU: busy share of the interval = 1 - (idle + iowait) / all
        busy = max(busy, sum(1 - (y[3] + y[4] - x[3] - x[4]) / max(sum(y) - sum(x), 1) for x, y in zip(a, b)))
    except (OSError, ValueError, IndexError):
        pass  # not Linux: the load average alone
    return max(1, min(cores, int(cores - busy + 0.5)))


def load_engine(path: str, *, device: str | None = None, dtype: str | None = None, max_batch: int = 32,
                block_size: int = 16, cache_memory: int | None = None, max_model_len: int | None = None,
                compile: bool = False, threads: int = 0, speculative: str | None = None,
                draft_tokens: int = 1) -> Engine:
    """The model in folder `path` with its tokenizer and generation_config.json, served by an Engine (`engine.model`,
    `engine.tokenizer`, `engine.generation`).
    device: unset = cuda when available; dtype (weights and cache): unset = bfloat16 on CUDA, float32 on CPU
    (CPUs without native bf16 run it far slower). cache_memory in bytes. threads: torch's CPU threads on a CPU
    device (process-wide), 0 = `free_cores()`, chosen before loading (which then runs at that width too)."""
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.set_num_threads(threads or free_cores())
    dt = parse_dtype(dtype) or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model = load_model(path, dtype=dt, device=dev)
    return Engine(model, load_tokenizer(path), max_batch=max_batch, block_size=block_size, cache_memory=cache_memory,
                  max_model_len=max_model_len, compile=compile, generation=read_generation_config(path),
                  speculative=speculative, draft_tokens=draft_tokens)


def engine_from_args(args: argparse.Namespace, max_batch: int) -> Engine:
    """`load_engine` with the options of `add_engine_args`."""
    check_model_folder(args.model, "--model")
    mem = args.cache_memory_mb * 2**20 if args.cache_memory_mb else None
    return load_engine(args.model, device=args.device, dtype=args.dtype, max_batch=max_batch,
                       block_size=args.block_size, cache_memory=mem, max_model_len=args.max_model_len,
                       compile=args.compile, threads=args.threads, speculative=args.speculative,
                       draft_tokens=args.draft_tokens)
