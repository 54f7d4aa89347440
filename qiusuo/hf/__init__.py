"""Hugging Face checkpoints in and out: `load_model`, `load_tokenizer`, `save_hf`, name mapping, FP8 blocks, FP4
experts.

The names below are imported on first use (PEP 562), not with the package: `qiusuo.quant` reads `qiusuo.hf.fp4`
and `qiusuo.hf.load` reads `qiusuo.quant`, so a package that imported the loader eagerly made `import
qiusuo.quant.apply` (or anything importing it first) fail with a circular import."""

import importlib

_EXPORTS = {
    "dequantize_fp4": "fp4", "quantize_fp4": "fp4", "dequantize_blocks": "fp8", "quantize_blocks": "fp8",
    "load_model": "load", "load_tokenizer": "load", "read_config": "load", "from_hf_state_dict": "names",
    "hf_layout": "names", "to_hf_state_dict": "names", "save_hf": "save",
}

__all__ = ["CheckpointError", *sorted(_EXPORTS)]


def __getattr__(name: str):
    if name == "CheckpointError":
        from qiusuo.io import CheckpointError

        return CheckpointError
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"qiusuo.hf.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'qiusuo.hf' has no attribute {name!r}")
