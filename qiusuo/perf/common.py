"""Shared measuring tools: medians of repeated timings, this machine's matmul peak, MFU, the transformers twin."""

from __future__ import annotations

import statistics
import tempfile
import time
from typing import Callable

import torch

from qiusuo.config import ModelConfig


def median_time(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, sync: Callable[[], None] = lambda: None) -> float:
    """Median wall time of `fn` in seconds over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def device_sync(device: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> float:
    """Achieved FLOP/s of one large square matmul: the denominator of MFU on this machine. On a CPU without
    native bf16 (AVX2 only) a bf16 matmul runs ~50x slower than fp32, so the size there is kept small."""
    if n is None:
        n = 8192 if device.type == "cuda" else (1024 if dtype == torch.float32 else 512)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    t = median_time(lambda: a @ b, repeats=repeats, sync=device_sync(device))
    return 2 * n**3 / t


def train_flops_per_token(cfg: ModelConfig, seq_len: int, active_params: int) -> float:
    """6 x active matmul parameters (the embedding lookup is not a matmul) + causal attention:
    6 x layers x heads x T/2 x (qk_head_dim + v_head_dim) per token (forward 2, backward 4)."""
    matmul = active_params - (0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size)
    attn = 6 * cfg.num_hidden_layers * cfg.num_attention_heads * (seq_len / 2) * (cfg.qk_head_dim + cfg.v_head_dim)
    return 6 * matmul + attn


def transformers_twin(model, dtype: torch.dtype = torch.float32):
    """`DeepseekV3ForCausalLM`/`DeepseekV2ForCausalLM` with the same config and weights, or None when
    transformers (a test-time peer) is not installed. Weights travel through our own HF export."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return None
    from transformers import AutoModelForCausalLM

    from qiusuo.hf import save_hf

    with tempfile.TemporaryDirectory() as d:
        save_hf(model, d)
        twin = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa")
    return twin.to(next(model.parameters()).device)
