"""What every benchmark shares: its flags (device, dtype, threads, model), the model it measures, the
transformers twin it is measured against, and the small tokenizer the serving benchmarks detokenise with.

The twin is `transformers`' own `DeepseekV4/V3/V2ForCausalLM` with the same config and the same
weights (through our HF export), so each figure is a ratio against a reference measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from qiusuo.config import get_config
from qiusuo.hf.load import dtype_arg
from qiusuo.model.transformer import Transformer
from qiusuo.runtime import resolve_device, set_threads

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_device_args(p: argparse.ArgumentParser, dtype: bool = True) -> None:
    """--device, --threads and (for inference) --dtype: the flags every benchmark takes."""
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default). On a busy "
                   "machine 1 can be ~10x faster: spinning OpenMP workers fight other processes for cores")
    if dtype:
        p.add_argument("--dtype", default="float32", type=dtype_arg, choices=list(DTYPES),
                       help="weights and cache dtype (fp32, bf16 too)")


def add_model_args(p: argparse.ArgumentParser, folder: bool = True) -> None:
    """--preset (random weights of a registry size; speed does not depend on the values) and --model DIR."""
    if folder:
        p.add_argument("--model", default=None, help="model folder to load (default: random weights of --preset)")
    p.add_argument("--preset", default="bench", help="model size from the registry (qiusuo.config.PRESETS)"
                   + (" when no --model is given" if folder else ""))


def setup(args: argparse.Namespace) -> torch.device:
    """The device the flags name, with `--threads` applied (0 leaves torch's default)."""
    device = resolve_device(args.device)
    if args.threads:
        set_threads(device, args.threads)
    return device


def random_model(preset: str, device: torch.device) -> Transformer:
    """`preset` with seed-0 random weights and no MTP layers (benchmarks time the main model only)."""
    torch.manual_seed(0)
    return Transformer(get_config(preset, num_nextn_predict_layers=0)).to(device)


def load_model(args: argparse.Namespace, device: torch.device) -> Transformer:
    """`--model DIR` in `--dtype`, else `random_model(--preset)` in fp32 (callers cast after building the twin)."""
    if getattr(args, "model", None):
        from qiusuo.hf.load import load_model as load_folder

        return load_folder(args.model, dtype=DTYPES[args.dtype], device=device)
    return random_model(args.preset, device).eval()


def load_tokenizer(args: argparse.Namespace):
    """The folder's tokenizer for `--model DIR`, else `bench_tokenizer()`."""
    if getattr(args, "model", None):
        from qiusuo.hf.load import load_tokenizer as load_folder_tokenizer

        return load_folder_tokenizer(args.model)
    return bench_tokenizer()


def bench_tokenizer():
    """A small BPE tokenizer with our special tokens. Ids past its vocabulary decode to nothing, which keeps the
    engine's per-step detokenisation in the measurement without needing a trained 8k vocabulary."""
    from qiusuo.data.tokenizer import Tokenizer

    text = ["The quick brown fox jumps over the lazy dog; continuous batching joins and leaves. "] * 8
    return Tokenizer.train(text, vocab_size=320)


def transformers_twin(model: torch.nn.Module, dtype: torch.dtype = torch.float32):
    """(transformers' model with `model`'s config and weights in `dtype`, "same weights"), or (None, reason)
    when transformers (a test-time peer) is not installed. If our export cannot be loaded, random weights of the
    same shapes (decoding and training speed do not depend on the values), saying so in the reason."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        return None, "transformers not installed"
    from qiusuo.hf.save import save_hf

    device = next(model.parameters()).device
    impl = "eager" if model.cfg.is_v4 else "sdpa"  # transformers' V4 is eager-only (its attention sinks)
    try:
        with tempfile.TemporaryDirectory() as d:
            save_hf(model, d, progress=False)
            twin = AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation=impl)
        return twin.to(device), "same weights"
    except Exception as e:  # noqa: BLE001 - the reference must not sink the benchmark
        hf = model.cfg.to_hf()
        conf = AutoConfig.for_model(hf.pop("model_type"), **hf)
        twin = AutoModelForCausalLM.from_config(conf, dtype=dtype, attn_implementation=impl).eval()
        return twin.to(device), f"random weights ({type(e).__name__}: {e})"
