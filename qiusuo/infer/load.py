"""Loading a model folder for serving, in one place: model, tokenizer and the Engine over them, and the options
that choose them, shared by `generate`, `chat` and `serve`. Imports no command: the server and the commands
both call this."""

from __future__ import annotations

import argparse

import torch

from qiusuo.hf.load import load_model, load_tokenizer
from qiusuo.infer.engine import Engine
from qiusuo.runtime import resolve_device


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Options every engine-backed command shares (generate, chat, serve)."""
    p.add_argument("--model", required=True, help="model folder (Hugging Face layout: config.json, safetensors, tokenizer)")
    p.add_argument("--device", default=None, help="cpu, cuda, ...; unset: cuda when available")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights and cache dtype; unset: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--block-size", type=int, default=16, help="tokens per cache block")
    p.add_argument("--cache-memory-mb", type=int, default=None,
                   help="cache budget in MiB; unset: every batch row at full context, at most 1024")
    p.add_argument("--max-model-len", type=int, default=None, help="context length; unset: the model's")
    p.add_argument("--compile", action="store_true", help="decode through torch.compile: ~2x faster small batches "
                   "on a CPU, after tens of seconds of compiling per new batch shape")


def load_engine(path: str, *, device: str | None = None, dtype: str | None = None, max_batch: int = 32,
                block_size: int = 16, cache_memory: int | None = None, max_model_len: int | None = None,
                compile: bool = False) -> Engine:
    """The model in folder `path` with its tokenizer, served by an Engine (`engine.model`, `engine.tokenizer`).
    device: unset = cuda when available; dtype (weights and cache): unset = bfloat16 on CUDA, float32 on CPU
    (CPUs without native bf16 run it far slower). cache_memory in bytes."""
    dev = resolve_device(device)
    dt = getattr(torch, dtype) if dtype else (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model = load_model(path, dtype=dt, device=dev)
    return Engine(model, load_tokenizer(path), max_batch=max_batch, block_size=block_size, cache_memory=cache_memory,
                  max_model_len=max_model_len, compile=compile)


def engine_from_args(args: argparse.Namespace, max_batch: int) -> Engine:
    """`load_engine` with the options of `add_engine_args`."""
    mem = args.cache_memory_mb * 2**20 if args.cache_memory_mb else None
    return load_engine(args.model, device=args.device, dtype=args.dtype, max_batch=max_batch,
                       block_size=args.block_size, cache_memory=mem, max_model_len=args.max_model_len,
                       compile=args.compile)
