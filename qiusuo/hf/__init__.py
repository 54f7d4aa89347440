"""Hugging Face checkpoints in and out: `load_model`, `load_tokenizer`, `save_hf`, name mapping. The number formats
checkpoints ship in (FP8 blocks, FP4 experts) are `qiusuo.quant.fp8` / `fp4`: this package reads `qiusuo.quant`,
never the other way.

The names below are imported on first use (PEP 562), not with the package, so `import qiusuo.hf` (for
`CheckpointError`, say) does not pull in the loader, tokenizers and the quantised modules."""

import importlib

_EXPORTS = {
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
