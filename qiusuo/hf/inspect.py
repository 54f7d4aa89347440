"""`qiusuo inspect PATH`: what a checkpoint holds, from config.json and the safetensors headers alone (no weights
are read, so it is instant even for DeepSeek-V3's 163 shards): architecture, V4's per-layer attention kinds and
hash-routed layers, parameters, dtypes, MTP, quantisation (FP8 blocks, FP4 experts, the scales' format), shards.

Quantisation is read from the tensors (an e4m3 weight; an int8 / uint8 weight beside a scale is packed FP4; scales
stored as float8_e8m0fnu or uint8 are ue8m0), the way the loader reads it; config.json's claims (`scale_fmt`,
`expert_dtype`) are shown next to it, since a checkpoint whose tensors disagree with them loads by its tensors."""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

from qiusuo.config import CSA, HCA, SLIDING

_MTP = {False: re.compile(r"model\.layers\.(\d+)\."), True: re.compile(r"(?:model\.)?mtp\.(\d+)\.")}
KIND_LETTER = {SLIDING: "S", CSA: "C", HCA: "H"}  # one letter per layer in the human-readable form


def describe(path: str | Path) -> dict:
    import torch

    from qiusuo.hf.load import read_config, read_entries, scaled_weight
    from qiusuo.model.count import count_params

    path = Path(path)
    cfg, raw = read_config(path)
    entries = read_entries(path)
    L, v4 = cfg.num_hidden_layers, cfg.is_v4
    # V4: module indices K of `mtp.K.*`; V2/V3: the hub layer indices L.. of `model.layers.*` past the main layers
    mtp_layers = sorted({i for n in entries if (m := _MTP[v4].match(n)) and (i := int(m.group(1))) >= (0 if v4 else L)})
    bytes_by_dtype = Counter()
    for e in entries.values():
        bytes_by_dtype[str(e.dtype).removeprefix("torch.")] += e.nbytes
    shards = Counter(e.file.name for e in entries.values())
    scaled = {w: e for n, e in entries.items() if (w := scaled_weight(n, entries))}  # weight name -> its scale
    fp4 = [n for n in scaled if entries[n].dtype in (torch.int8, torch.uint8)]
    qc = raw.get("quantization_config") or {}
    UE8M0 = (torch.float8_e8m0fnu, torch.uint8)  # scales stored as exponent bytes
    counts = count_params(cfg)
    return {
        "path": str(path),
        "architecture": (raw.get("architectures") or ["?"])[0],
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
        "dtype": raw.get("torch_dtype") or raw.get("dtype") or max(bytes_by_dtype, key=bytes_by_dtype.get),
        "bytes_by_dtype": dict(bytes_by_dtype),
        "mtp_layers": mtp_layers,
        "fp8": "float8_e4m3fn" in bytes_by_dtype,
        "fp4_experts": len(fp4),
        "scale_fmt": sorted({"ue8m0" if s.dtype in UE8M0 else "float" for s in scaled.values()}),
        "config_quantization": {k: qc[k] for k in ("quant_method", "scale_fmt", "weight_block_size") if k in qc}
        | ({"expert_dtype": x} if (x := qc.get("expert_dtype", raw.get("expert_dtype"))) else {}),
        "shards": dict(sorted(shards.items())),
        "tensors": len(entries),
        "tokenizer": (path / "tokenizer.json").is_file(),
    }


def _human(n: float) -> str:
    for unit in ("", "K", "M", "B", "T"):
        if abs(n) < 1000:
            return f"{n:.2f}{unit}" if unit else str(int(n))
        n /= 1000
    return f"{n:.2f}P"


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="model folder (config.json + safetensors)")
    p.add_argument("--json", action="store_true", help="print the description as JSON")


def main(args: argparse.Namespace) -> int:
    import json

    d = describe(args.path)
    if args.json:
        print(json.dumps(d, indent=2))
        return 0
    v4 = d["layer_types"] is not None
    print(f"{d['path']}")
    print(f"  architecture  {d['architecture']} ({d['model_type']}), {d['layers']} layers, hidden {d['hidden_size']}, "
          f"{d['routed_experts']} routed experts (top-{d['experts_per_token']})")
    if v4:
        print(f"  attention     {''.join(KIND_LETTER[k] for k in d['layer_types'])}  ("
              + ", ".join(f"{KIND_LETTER[k]} {k} x{n}" for k, n in d["layer_kinds"].items()) + ")")
        print(f"  hash routing  {'layers ' + ', '.join(map(str, d['hash_layers'])) if d['hash_layers'] else 'none'}")
    print(f"  parameters    {_human(d['params_total'])} total, {_human(d['params_active'])} active per token"
          + (f", + {_human(d['params_mtp'])} in MTP" if d["params_mtp"] else ""))
    print(f"  dtype         {d['dtype']}  ("
          + ", ".join(f"{k}: {v / 2**20:.1f} MiB" for k, v in d["bytes_by_dtype"].items()) + ")")
    mtp = ", ".join(("mtp." if v4 else "") + str(i) for i in d["mtp_layers"])
    print(f"  MTP           {('modules ' if v4 else 'layers ') + mtp if mtp else 'none'}")
    if d["fp8"]:
        b = d["config_quantization"].get("weight_block_size", [128, 128])
        fp8 = f"yes (float8_e4m3fn, {b[0]}x{b[1]} blocks, {'/'.join(d['scale_fmt']) or '?'} scales)"
    else:
        fp8 = "no"
    print(f"  FP8           {fp8}")
    if v4 or d["fp4_experts"]:
        n = d["fp4_experts"]
        print(f"  FP4 experts   {f'yes ({n} matrices: e2m1, two per byte, a scale per 32 inputs)' if n else 'no'}")
    if d["config_quantization"]:
        print("  config.json   quantization " + ", ".join(f"{k}={v}" for k, v in d["config_quantization"].items()))
    print(f"  shards        {len(d['shards'])} file(s), {d['tensors']} tensors: "
          + ", ".join(f"{k} ({v})" for k, v in d["shards"].items()))
    print(f"  tokenizer     {'yes' if d['tokenizer'] else 'no'}")
    return 0
