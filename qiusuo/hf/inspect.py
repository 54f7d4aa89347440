"""What `qiusuo inspect PATH` reports: what a checkpoint holds, and whether it fits, from config.json and the
safetensors headers alone (no weights are read, so it is instant even for DeepSeek-V3's 163 shards): architecture,
V4's per-layer attention kinds and hash-routed layers, parameters, dtypes, MTP, quantisation (FP8 blocks, FP4
experts, the scales' format), shards; the bytes the weights take in each format DeepSeek ships, the cache per token
and for a context and batch, and which of those fit a memory (`--memory 24GB`).

PATH may be a folder with weights, a folder with only config.json (decide before downloading 700 GB), or a config
file itself, DeepSeek's inference configs (`inference/configs/config_671B.json`) included.

Quantisation is read from the tensors (an e4m3 weight; an int8 / uint8 weight beside a scale is packed FP4; scales
stored as float8_e8m0fnu or uint8 are ue8m0), the way the loader reads it; config.json's claims (`scale_fmt`,
`expert_dtype`) are shown next to it, since a checkpoint whose tensors disagree with them loads by its tensors.

Weight bytes per format are what `save_hf` writes for this config (the same plan, on the meta device): bf16; FP8
(DeepSeek's choice of FP8 tensors, a float32 scale per 128x128 block, V4: one ue8m0 byte); FP8 with FP4 routed experts
(V4-Flash's format: e2m1 two per byte, a ue8m0 byte per 32 inputs). The memory check adds the cache for the
context and batch asked (bf16, or `--kv-cache-dtype fp8`); activations and framework overhead are not counted.

The command itself (`qiusuo/inspect_cmd.py`) sits above this module: its `--load` loads the folder as `qiusuo serve`
does (`qiusuo.infer.load.measure_load`), and checkpoint code imports nothing of the engine.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from qiusuo.config import CSA, HCA, SLIDING
from qiusuo.io import CheckpointError

_MTP = {False: re.compile(r"model\.layers\.(\d+)\."), True: re.compile(r"(?:model\.)?mtp\.(\d+)\.")}
KIND_LETTER = {SLIDING: "S", CSA: "C", HCA: "H"}  # one letter per layer in the human-readable form
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """'24GB' (10^9), '24GiB' (2^30), '1.5TB', '80e9' -> bytes; anything else raises ValueError saying how."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"--memory {text!r}: give a size such as 24GB (10^9 bytes), 24GiB (2^30), 80e9 or 1.5TB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def read_any_config(path: Path):
    """(ModelConfig, raw dict, folder or None) of a model folder or of a config file, in either format."""
    from qiusuo.hf.load import check_model_folder, check_quantization

    if path.is_dir():
        file = check_model_folder(path) / "config.json"  # a run folder is named as such, with its model
    elif path.is_file():
        file = path
    else:
        raise CheckpointError(f"{path}: no such folder or file; inspect a model folder or its config.json")
    cfg, raw = _from_file(file)
    check_quantization(raw, file)
    return cfg, raw, path if path.is_dir() else None


def _json(file: Path):
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None


def _from_file(file: Path):
    from qiusuo.hf.config_json import config_from_json

    raw = _json(file)
    try:
        return config_from_json(raw), raw
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from None


# what each reported format keeps packed when served (`--quantize`); DeepSeek's FP8 keeps the head in bf16
RUN_SPECS = {"bf16": None, "fp8": "experts=fp8,shared=fp8,dense=fp8,attention=fp8",
             "fp8+fp4-experts": "experts=mxfp4,shared=fp8,dense=fp8,attention=fp8", "int8": "int8", "int4": "int4"}


def weight_bytes(cfg, include_mtp: bool = True, dtype=None) -> dict[str, int]:
    """Bytes the weights take in memory when served in each of `RUN_SPECS` (packed families as `qiusuo.quant`
    holds them, everything else in `dtype`, bf16 by default): the same meta-device allocation `load_model` makes,
    so what fits here is what runs. A family a format cannot hold (e.g. int4 groups on an odd width) stays in
    `dtype`, as the loader leaves it."""
    import torch

    from qiusuo.model.transformer import Transformer
    from qiusuo.quant.apply import parse_spec, quantize_model

    out = {}
    for name, spec in RUN_SPECS.items():
        with torch.device("meta"):
            model = Transformer(cfg if include_mtp else cfg.replace(num_nextn_predict_layers=0))
        model.cast(dtype or torch.bfloat16)
        if spec:
            quantize_model(model, parse_spec(spec))
        seen = {id(t): t for t in [*model.parameters(), *model.buffers()]}
        out[name] = sum(t.numel() * t.element_size() for t in seen.values())
    return out


def describe(path: str | Path, context: int | None = None, batch: int = 1, memory: int | None = None,
             dtype=None, kv_cache_dtype: str = "bf16") -> dict:
    import torch

    from qiusuo.hf.load import INDEX, SINGLE, read_entries, scaled_weight
    from qiusuo.model.count import cache_bytes_per_token, count_params

    path = Path(path)
    cfg, raw, folder = read_any_config(path)
    has_weights = folder is not None and ((folder / INDEX).is_file() or (folder / SINGLE).is_file())
    entries = read_entries(folder) if has_weights else {}
    L, v4, D = cfg.num_hidden_layers, cfg.is_v4, cfg.num_nextn_predict_layers
    if has_weights:  # V4: module indices K of `mtp.K.*`; V2/V3: hub layer indices L.. of `model.layers.*`
        mtp_layers = sorted({i for n in entries if (m := _MTP[v4].match(n)) and (i := int(m.group(1))) >= (0 if v4 else L)})
    else:  # what config.json declares
        mtp_layers = list(range(D)) if v4 else list(range(L, L + D))
    bytes_by_dtype = Counter()
    for e in entries.values():
        bytes_by_dtype[str(e.dtype).removeprefix("torch.")] += e.nbytes
    shards = Counter(e.file.name for e in entries.values())
    scaled = {w: e for n, e in entries.items() if (w := scaled_weight(n, entries))}  # weight name -> its scale
    fp4 = [n for n in scaled if entries[n].dtype in (torch.int8, torch.uint8)]
    qc = raw.get("quantization_config") or {}
    UE8M0 = (torch.float8_e8m0fnu, torch.uint8)  # scales stored as exponent bytes
    counts = count_params(cfg)
    asked = context
    context = min(context or cfg.max_position_embeddings, cfg.max_position_embeddings)
    per_token = cache_bytes_per_token(cfg, kv_cache_dtype, context)
    cache = int(per_token * context * batch)
    from qiusuo.hf.load import parse_dtype

    run_dtype = parse_dtype(dtype) or torch.bfloat16
    weights = weight_bytes(cfg, include_mtp=bool(mtp_layers), dtype=run_dtype)
    d = {
        "path": str(path),
        "config_format": "huggingface" if "model_type" in raw else "deepseek-inference",
        "weights_present": has_weights,
        "architecture": (raw.get("architectures") or cfg.to_hf()["architectures"])[0],
        "model_type": cfg.model_type,
        "layers": L,
        "layer_kinds": dict(Counter(cfg.layer_types)) if v4 else None,
        "layer_types": cfg.layer_types if v4 else None,
        "hash_layers": [i for i, k in enumerate(cfg.mlp_layer_types) if k == "hash_moe"] if v4 else [],
        "hidden_size": cfg.hidden_size,
        "routed_experts": cfg.n_routed_experts or 0,
        "experts_per_token": cfg.num_experts_per_tok or 0,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "params_mtp": count_params(cfg, include_mtp=True)["total"] - counts["total"] if mtp_layers else 0,
        "dtype": raw.get("torch_dtype") or raw.get("dtype") or (max(bytes_by_dtype, key=bytes_by_dtype.get)
                                                                 if bytes_by_dtype else None),
        "bytes_by_dtype": dict(bytes_by_dtype),
        "mtp_layers": mtp_layers,
        "fp8": "float8_e4m3fn" in bytes_by_dtype,
        "fp4_experts": len(fp4),
        "scale_fmt": sorted({"ue8m0" if s.dtype in UE8M0 else "float" for s in scaled.values()}),
        "config_quantization": {k: qc[k] for k in ("quant_method", "scale_fmt", "weight_block_size") if k in qc}
        | ({"expert_dtype": x} if (x := qc.get("expert_dtype", raw.get("expert_dtype"))) else {}),
        "shards": dict(sorted(shards.items())),
        "tensors": len(entries),
        "tokenizer": folder is not None and (folder / "tokenizer.json").is_file(),
        "tokenizer_kind": next((k for k, f in (("tokenizer.json", "tokenizer.json"), ("tiktoken", "tiktoken.model"))
                                if folder is not None and (folder / f).is_file()), None),
        "weight_bytes": weights,
        "run_dtype": str(run_dtype).removeprefix("torch."),
        "cache_bytes_per_token": per_token,
        "kv_cache_dtype": kv_cache_dtype,
        "context": context,
        "context_asked": asked,  # --context as given (None: the model's); above max_position_embeddings, capped
        "max_position_embeddings": cfg.max_position_embeddings,
        "batch": batch,
        "cache_bytes": cache,
    }
    if memory is not None:
        d["memory"] = memory
        d["fits"] = {name: w + cache <= memory for name, w in weights.items()}
    return d


def predicted_bytes(path: Path, quantize, dtype) -> int:
    """Bytes `load_model(path, dtype, quantize=quantize)` allocates: its own plan and packing on the meta device."""
    from qiusuo.hf.load import module_formats, plan
    from qiusuo.quant.apply import quantize_modules

    p = plan(path, dtype)
    quantize_modules(p.model, module_formats(p, quantize))
    seen = {id(t): t for t in [*p.model.parameters(), *p.model.buffers()]}
    return sum(t.numel() * t.element_size() for t in seen.values())


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.2f}{unit}" if unit else str(int(n))
        n /= 1000
    return f"{n:.2f}P"


def _gb(n: float) -> str:
    return f"{n / 1e9:,.1f} GB" if n >= 1e8 else f"{n / 1e6:,.1f} MB"


def report(d: dict) -> list[str]:
    """`describe`'s dict (and `measure_load`'s under "load", when present) as the lines `qiusuo inspect` prints."""
    out: list[str] = []
    write = out.append
    v4 = d["layer_types"] is not None
    write(f"{d['path']}" + ("" if d["weights_present"] else "  (config only: no weights read or needed)"))
    write(f"  architecture  {d['architecture']} ({d['model_type']}), {d['layers']} layers, hidden {d['hidden_size']}, "
          f"{d['routed_experts']} routed experts (top-{d['experts_per_token']})"
          + ("; from DeepSeek's inference config" if d["config_format"] == "deepseek-inference" else ""))
    if v4:
        write(f"  attention     {''.join(KIND_LETTER[k] for k in d['layer_types'])}  ("
              + ", ".join(f"{KIND_LETTER[k]} {k} x{n}" for k, n in d["layer_kinds"].items()) + ")")
        write(f"  hash routing  {'layers ' + ', '.join(map(str, d['hash_layers'])) if d['hash_layers'] else 'none'}")
    write(f"  parameters    {_human(d['params_total'])} total, {_human(d['params_active'])} active per token"
          + (f", + {_human(d['params_mtp'])} in MTP" if d["params_mtp"] else ""))
    if d["weights_present"]:
        write(f"  dtype         {d['dtype']}  ("
              + ", ".join(f"{k}: {v / 2**20:.1f} MiB" for k, v in d["bytes_by_dtype"].items()) + ")")
    mtp = ", ".join(("mtp." if v4 else "") + str(i) for i in d["mtp_layers"])
    declared = "" if d["weights_present"] else " (declared in config.json)"
    write(f"  MTP           {('modules ' if v4 else 'layers ') + mtp + declared if mtp else 'none'}")
    if d["weights_present"]:
        if d["fp8"]:
            b = d["config_quantization"].get("weight_block_size", [128, 128])
            fp8 = f"yes (float8_e4m3fn, {b[0]}x{b[1]} blocks, {'/'.join(d['scale_fmt']) or '?'} scales)"
        else:
            fp8 = "no"
        write(f"  FP8           {fp8}")
        if v4 or d["fp4_experts"]:
            n = d["fp4_experts"]
            write(f"  FP4 experts   {f'yes ({n} matrices: e2m1, two per byte, a scale per 32 inputs)' if n else 'no'}")
    if d["config_quantization"]:
        write("  config.json   quantization " + ", ".join(f"{k}={v}" for k, v in d["config_quantization"].items()))
    if d["weights_present"]:
        write(f"  shards        {len(d['shards'])} file(s), {d['tensors']} tensors: "
              + ", ".join(f"{k} ({v})" for k, v in d["shards"].items()))
    write(f"  tokenizer     {d['tokenizer_kind'] or 'no'}")
    w = d["weight_bytes"]
    write(f"  weights       in memory when served (--quantize; float parts {d['run_dtype']}): "
          + ", ".join(f"{k} {_gb(v)}" for k, v in w.items()) + (" (MTP included)" if d["params_mtp"] else ""))
    write(f"  cache         {d['cache_bytes_per_token']:,.0f} bytes per token ({d['kv_cache_dtype']}); {_gb(d['cache_bytes'])} for "
          f"{d['batch']} x {d['context']:,} tokens")
    if d["context_asked"] is not None and d["context_asked"] > d["context"]:
        write(f"  context       {d['context_asked']:,} asked, capped at {d['context']:,}: the model's "
              "max_position_embeddings, the longest sequence it can take")
    if "load" in d:
        m = d["load"]
        write(f"  loaded        --quantize {m['quantize']}, float parts {m['dtype']}: {m['seconds']:.1f} s; resident "
              f"{_gb(m['resident'])} vs predicted {_gb(m['predicted_weights'] + m['predicted_cache'])} (weights "
              f"{_gb(m['predicted_weights'])} + cache {_gb(m['predicted_cache'])}): "
              f"{100 * (m['resident_over_predicted'] - 1):+.1f}%; peak while loading {_gb(m['peak'])}")
    if "fits" in d:
        rows = [f"{name} {'fits' if ok else 'does not fit'} ({_gb(w[name] + d['cache_bytes'])})"
                for name, ok in d["fits"].items()]
        write(f"  fits {_gb(d['memory'])}?  " + "; ".join(rows) + "  (weights + cache; activations not counted)")
    return out
