"""`qiusuo inspect PATH`: what a checkpoint holds, from config.json and the safetensors headers alone (no weights
are read, so it is instant even for DeepSeek-V3's 163 shards)."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path


def describe(path: str | Path) -> dict:
    from qiusuo.model.count import count_params
    from qiusuo.hf.load import _layer_index, read_config, read_entries

    path = Path(path)
    cfg, raw = read_config(path)
    entries = read_entries(path)
    L = cfg.num_hidden_layers
    mtp_layers = sorted({i for n in entries if (i := _layer_index(n)) is not None and i >= L})
    bytes_by_dtype = Counter()
    for e in entries.values():
        bytes_by_dtype[str(e.dtype).removeprefix("torch.")] += e.nbytes
    shards = Counter()
    for e in entries.values():
        shards[e.file.name] += 1
    counts = count_params(cfg)
    return {
        "path": str(path),
        "architecture": (raw.get("architectures") or ["?"])[0],
        "model_type": cfg.model_type,
        "layers": L,
        "hidden_size": cfg.hidden_size,
        "routed_experts": cfg.n_routed_experts or 0,
        "experts_per_token": cfg.num_experts_per_tok or 0,
        "params_total": counts["total"],
        "params_active": counts["active"],
        "params_mtp": count_params(cfg, include_mtp=True)["total"] - counts["total"] if mtp_layers else 0,
        "dtype": raw.get("torch_dtype") or raw.get("dtype") or max(bytes_by_dtype, key=bytes_by_dtype.get),
        "bytes_by_dtype": dict(bytes_by_dtype),
        "mtp_layers": mtp_layers,
        "fp8": any(n.endswith("weight_scale_inv") for n in entries) or "float8_e4m3fn" in bytes_by_dtype,
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
    print(f"{d['path']}")
    print(f"  architecture  {d['architecture']} ({d['model_type']}), {d['layers']} layers, hidden {d['hidden_size']}, "
          f"{d['routed_experts']} routed experts (top-{d['experts_per_token']})")
    print(f"  parameters    {_human(d['params_total'])} total, {_human(d['params_active'])} active per token"
          + (f", + {_human(d['params_mtp'])} in MTP" if d["params_mtp"] else ""))
    print(f"  dtype         {d['dtype']}  ("
          + ", ".join(f"{k}: {v / 2**20:.1f} MiB" for k, v in d["bytes_by_dtype"].items()) + ")")
    print(f"  MTP           {'layers ' + ', '.join(map(str, d['mtp_layers'])) if d['mtp_layers'] else 'none'}")
    print(f"  FP8           {'yes (float8_e4m3fn, 128x128 weight_scale_inv)' if d['fp8'] else 'no'}")
    print(f"  shards        {len(d['shards'])} file(s), {d['tensors']} tensors: "
          + ", ".join(f"{k} ({v})" for k, v in d["shards"].items()))
    print(f"  tokenizer     {'yes' if d['tokenizer'] else 'no'}")
    return 0
