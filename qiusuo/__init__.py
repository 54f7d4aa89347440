"""qiusuo: DeepSeek-architecture models, defined, trained, interoperated and served on small machines.

The architectures: V2/V3 (MLA, DeepSeekMoE with aux-loss-free balancing, MTP), V3.2 (sparse attention over a
lightning indexer), V4 (sliding / CSA / HCA attention, mHC residual streams, hash-routed experts), and the families
built on them (Kimi-K2 / K2.5, GLM-4.7-Flash / GLM-5, Moonlight, ...: `qiusuo.families`). From a toy to the
published shapes: pretraining (AdamW or Muon, FP4 quantisation-aware training), SFT and GRPO, Hugging Face
checkpoints in and out (FP8, FP4 and int4 experts), quantised weights kept packed, and an OpenAI-compatible server
over paged caches with MTP speculative decoding.

This is the package face for users; qiusuo's own modules never import it (they import where things are defined).
Its names are imported on first use (PEP 562): every `qiusuo.*` import runs this file first, and importing torch
here made `qiusuo --help` take seconds.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_WHERE = {
    "PRESETS": "qiusuo.config", "ModelConfig": "qiusuo.config", "get_config": "qiusuo.config",
    "load_model": "qiusuo.hf", "load_tokenizer": "qiusuo.hf", "save_hf": "qiusuo.hf",
    "count_params": "qiusuo.model.count",
    "LossOutput": "qiusuo.model.transformer", "Transformer": "qiusuo.model.transformer",
}
__all__ = ["PRESETS", "ModelConfig", "count_params", "get_config", "LossOutput", "Transformer", "load_model", "load_tokenizer", "save_hf"]


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    try:  # `import qiusuo; qiusuo.hf.to_hf_state_dict(...)`, as when this file imported qiusuo.hf itself
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module 'qiusuo' has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
