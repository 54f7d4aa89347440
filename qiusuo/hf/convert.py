"""`qiusuo convert SRC DST`: re-save a checkpoint in Hugging Face layout with another dtype, FP8 blocks or shard size.

`--merge-lora DIR` bakes a peft adapter (one `qiusuo sft --lora.*` wrote, or peft) into the weights first: the base
is read in float, W + scale B A added, and only then quantised when `--quantize`/`--fp8` asks, so the merged model
is rounded once, not twice.

SRC is a Hugging Face folder (config.json + safetensors, FP8 or not), a folder written by `save_hf`, a training
checkpoint (`RUN/checkpoints/step_N`, qiusuo's own tensor names) or a run folder (its latest checkpoint). DST is
always the hub layout, which transformers, vLLM, SGLang and `qiusuo.load_model` all read.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from qiusuo.quant.fp8 import SCALE_FORMATS
from qiusuo.hf.load import dtype_arg
from qiusuo.hf.save import DEFAULT_SHARD_BYTES
from qiusuo.io import CheckpointError


def resolve_source(src: str | Path) -> Path:
    """A folder with config.json, or a run folder's latest `checkpoints/step_*` that has one."""
    src = Path(src)
    if (src / "config.json").is_file():
        return src
    steps = sorted(p for p in (src / "checkpoints").glob("step_*") if (p / "config.json").is_file())
    if steps:
        return steps[-1]
    raise CheckpointError(f"{src / 'config.json'}: not found, and {src / 'checkpoints'} has no step_* checkpoint; "
                          f"SRC must be a model folder, a training checkpoint or a run folder")


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="Hugging Face folder, training checkpoint (RUN/checkpoints/step_N) or run folder")
    p.add_argument("dst", help="output folder (Hugging Face layout; replaced atomically if it exists)")
    p.add_argument("--dtype", default=None, type=dtype_arg, help="dtype of the written weights: float32 (fp32), "
                   "bfloat16 (bf16), float16 (fp16) (default: config.json's torch_dtype)")
    p.add_argument("--fp8", action="store_true", help="store projection matrices as float8_e4m3fn with a scale "
                                                      "per 128x128 block (DeepSeek-V3's and V4's format)")
    p.add_argument("--fp4-experts", action="store_true", help="with --fp8, a DeepSeek-V4 model's routed experts as "
                                                              "FP4 (two e2m1 values per byte, a scale per 32 inputs), "
                                                              "as DeepSeek-V4-Flash ships them")
    p.add_argument("--scale-fmt", choices=SCALE_FORMATS, default=None,
                   help="FP8/FP4 scales: float32 ('float') or powers of two ('ue8m0') (default: the source's "
                        "quantization_config.scale_fmt, else V2/V3 float, V4 ue8m0)")
    p.add_argument("--max-shard-gb", type=float, default=DEFAULT_SHARD_BYTES / 2**30,
                   help="start a new safetensors shard above this size (GiB)")
    p.add_argument("--quantize", default=None, metavar="SPEC",
                   help="re-quantise: int4 (groups of 32), int4:64, int8 (per channel), or per tensor family, e.g. "
                   "experts=int4,attention=int8 (families: experts, shared, dense, attention, head); written as "
                   "compressed-tensors pack-quantized, which vLLM and transformers read")
    p.add_argument("--group", type=int, default=None, help="with --quantize int4: inputs per scale (32, 64, 128)")
    p.add_argument("--merge-lora", default=None, metavar="DIR",
                   help="bake this LoRA adapter (peft folder: adapter_config.json + adapter_model.safetensors) into "
                        "the weights; with --quantize or --fp8 the merged weights are quantised")
    p.add_argument("--no-mtp", action="store_true", help="drop the multi-token-prediction layers")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def check_flags(cfg, args: argparse.Namespace) -> None:
    """The quantisation flags against the source's config, in the command line's terms, before anything loads
    (`save_hf` checks the same in its own arguments' terms)."""
    if args.fp4_experts and not cfg.is_v4:
        raise ValueError(f"--fp4-experts is for DeepSeek-V4 checkpoints (this one is {cfg.model_type}); drop it")
    if args.fp4_experts and not args.fp8:
        raise ValueError("--fp4-experts needs --fp8 (DeepSeek-V4 keeps its FP4 experts inside the FP8 checkpoint)")
    if args.quantize and (args.fp8 or args.fp4_experts):
        raise ValueError("--quantize writes compressed-tensors integers; --fp8/--fp4-experts write DeepSeek's FP8 "
                         "checkpoint: pick one")
    if args.group is not None and not (args.quantize and "int4" in args.quantize):
        raise ValueError("--group is the int4 group size: use it with --quantize int4")


def quantize_spec(args: argparse.Namespace):
    """--quantize with --group folded into its int4 formats, parsed (ValueError naming a bad part)."""
    from qiusuo.quant.apply import parse_spec
    from qiusuo.quant.formats import Format

    spec = parse_spec(args.quantize)
    if spec is None or spec == "native":
        raise ValueError(f"--quantize {args.quantize!r}: name a format (int4, int8, ...) to convert to")
    if args.group is not None:
        spec = {fam: Format("int4", group=args.group) if f.name == "int4" else f for fam, f in spec.items()}
        parse_spec({fam: str(f) for fam, f in spec.items()})  # checks the group
    return spec


def main(args: argparse.Namespace) -> int:
    from qiusuo.hf.load import load_model, load_tokenizer, read_config, scale_format
    from qiusuo.hf.save import save_hf

    src = resolve_source(args.src)
    cfg, raw = read_config(src)
    check_flags(cfg, args)
    scale_fmt = args.scale_fmt or scale_format(raw)  # the source's own (V3.1: ue8m0) unless told
    spec = quantize_spec(args) if args.quantize else None
    # merging adds to float weights: the base loads unpacked and is quantised after
    model = load_model(src, dtype=args.dtype, load_mtp=not args.no_mtp, progress=not args.no_progress,
                       quantize=None if args.merge_lora else spec)
    if args.merge_lora:
        from qiusuo.lora.peft import merge_adapter
        from qiusuo.quant.apply import quantize_model

        merge_adapter(model, args.merge_lora)
        if spec:
            quantize_model(model, spec)
    has_tokenizer = any((src / f).is_file() for f in ("tokenizer.json", "tiktoken.model"))
    tokenizer = load_tokenizer(src) if has_tokenizer else None
    out = save_hf(model, args.dst, tokenizer=tokenizer, fp8=args.fp8, max_shard_bytes=int(args.max_shard_gb * 2**30),
                  progress=not args.no_progress, fp4_experts=args.fp4_experts, scale_fmt=scale_fmt)
    quant = " (FP8 blocks" + (", FP4 experts" if args.fp4_experts else "") + ")" if args.fp8 else ""
    if spec:
        from qiusuo.quant.apply import formats_of

        quant = " (" + ", ".join(f"{fam} {fmt}" for fam, fmt in formats_of(model).items()) + ")"
    merged = f" with the adapter {args.merge_lora} merged" if args.merge_lora else ""
    print(f"wrote {out} from {src}{merged}{quant}")
    return 0
