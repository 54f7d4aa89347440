"""Load a Hugging Face DeepSeek-V2/V3 folder into a `Transformer`, streaming tensor by tensor.

Order of work, so that bad input fails before any memory is committed and nothing is ever half-loaded:
1. read `config.json` and every safetensors header (shapes, dtypes, offsets; nothing else);
2. build the model on the `meta` device and check the checkpoint's names and shapes against it, all of them;
3. allocate the parameters once (`to_empty`) and read each tensor straight into its slot (FP8 blocks are
   dequantised 128 rows at a time). Peak memory is the model plus the largest single tensor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from qiusuo.config import ModelConfig
from qiusuo.hf.fp8 import BLOCK, dequantize_blocks_, scale_shape
from qiusuo.hf.names import Slot, hf_layout
from qiusuo.hf.st import Entry, read_header, read_into, read_tensor
from qiusuo.io import CheckpointError
from qiusuo.model.rope import Rotary, rope_frequencies
from qiusuo.model.transformer import Transformer

log = logging.getLogger("qiusuo.hf")

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    dt = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return dt


def read_config(path: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, raw config.json dict) of a model folder."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a Hugging Face model folder (config.json + *.safetensors)")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: not found; a Hugging Face model folder needs config.json next to its weights")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    try:
        cfg = ModelConfig.from_hf(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    return cfg, raw


def read_entries(path: str | Path) -> dict[str, Entry]:
    """Every tensor of the folder's safetensors file(s), from their headers; shards checked against the index."""
    path = Path(path)
    if (path / INDEX).is_file():
        try:
            weight_map = json.loads((path / INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path / INDEX}: not a safetensors index (needs a 'weight_map'): {e}") from None
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        entries: dict[str, Entry] = {}
        for file, names in by_file.items():
            if not (path / file).is_file():
                raise CheckpointError(f"{path / file}: shard missing; {path / INDEX} lists {len(names)} tensors in it "
                                      f"(e.g. {names[0]!r}). Download the complete checkpoint.")
            header, _ = read_header(path / file)
            for name in names:
                if name not in header:
                    raise CheckpointError(f"{path / file}: tensor {name!r} is listed in {INDEX} but not in this shard")
                entries[name] = header[name]
            for name in header.keys() - set(names):
                raise CheckpointError(f"{path / file}: tensor {name!r} is in this shard but not in {INDEX}")
        return entries
    if (path / SINGLE).is_file():
        return read_header(path / SINGLE)[0]
    raise CheckpointError(f"{path}: no {SINGLE} and no {INDEX}; nothing to load")


def default_dtype(raw: dict, entries: dict[str, Entry]) -> torch.dtype:
    """config.json's `torch_dtype`/`dtype`, else the commonest floating dtype among the non-FP8 tensors."""
    named = raw.get("torch_dtype") or raw.get("dtype")
    if named:
        return parse_dtype(named)
    counts = Counter(e.dtype for e in entries.values() if e.dtype.is_floating_point and e.dtype.itemsize > 1)
    return counts.most_common(1)[0][0] if counts else torch.float32


def _layer_index(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def plan(path: str | Path, dtype=None, load_mtp: bool = True):
    """Everything `load_model` checks before allocating: returns (cfg, meta model, layout, weights, scales, dtype,
    block). `weights` maps hub names to entries; `scales` maps an FP8 weight's name to its `weight_scale_inv`."""
    path = Path(path)
    cfg, raw = read_config(path)
    entries = read_entries(path)
    scales = {n.removesuffix("_scale_inv"): e for n, e in entries.items() if n.endswith("weight_scale_inv")}
    weights = {n: e for n, e in entries.items() if not n.endswith("weight_scale_inv")}
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    mtp_names = [n for n in weights if (i := _layer_index(n)) is not None and L <= i < L + D]
    if D and not load_mtp:
        log.info("%s: skipping %d MTP layer(s) (%d tensors): load_mtp=False", path, D, len(mtp_names))
        cfg = cfg.replace(num_nextn_predict_layers=0)
    elif D and not mtp_names:
        log.info("%s: config.json declares %d MTP layer(s) but the checkpoint has no weights for them; "
                 "loading without MTP", path, D)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    if cfg.num_nextn_predict_layers == 0:
        for n in mtp_names:
            weights.pop(n)
            scales.pop(n, None)

    qc = raw.get("quantization_config") or {}
    block = BLOCK
    if qc.get("weight_block_size"):
        br, bc = qc["weight_block_size"]
        if br != bc:
            raise CheckpointError(f"{path / 'config.json'}: weight_block_size {qc['weight_block_size']} is not "
                                  f"square; only square FP8 blocks are supported")
        block = int(br)
    dtype = parse_dtype(dtype) or default_dtype(raw, entries)

    with torch.device("meta"):
        model = Transformer(cfg)
    # parameters in the target dtype; buffers (rotary frequencies, routing bias) stay float32
    model._apply(lambda t: t.to(dtype) if isinstance(t, nn.Parameter) else t)
    meta_sd = model.state_dict()
    if "embed_tokens.weight" in weights and "model.embed_tokens.weight" not in weights:
        # qiusuo's own names (what `model.state_dict()` saves, e.g. a training checkpoint): identity mapping
        layout = {k: Slot(k, copy=k == "lm_head.weight" and cfg.tie_word_embeddings) for k in meta_sd}
    else:
        layout = hf_layout(model)
    arch = "DeepseekV3ForCausalLM" if cfg.model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"
    for name, e in weights.items():
        if name not in layout:
            raise CheckpointError(f"{e.file}: unexpected tensor {name!r}: a {arch} with this config.json has no such "
                                  f"weight (wrong config.json, or a checkpoint of another architecture)")
    for name, slot in layout.items():
        if name not in weights:
            if slot.copy:
                continue
            raise CheckpointError(f"{path}: tensor {name!r} is missing from the checkpoint "
                                  f"({', '.join(sorted({e.file.name for e in entries.values()}))})")
        e = weights[name]
        want = tuple(slot.view(meta_sd[slot.ours]).shape)
        if e.shape != want:
            raise CheckpointError(f"{e.file}: tensor {name!r} has shape {list(e.shape)} but config.json implies "
                                  f"{list(want)}")
        if not e.dtype.is_floating_point:
            raise CheckpointError(f"{e.file}: tensor {name!r} has dtype {e.dtype}; weights must be floating point")
        fp8 = e.dtype.itemsize == 1
        if fp8 and name not in scales:
            raise CheckpointError(f"{e.file}: tensor {name!r} is FP8 but {name + '_scale_inv'!r} is missing")
        if name in scales:
            s = scales[name]
            if not fp8:
                raise CheckpointError(f"{s.file}: tensor {s.name!r} scales {name!r}, which is {e.dtype}, not FP8")
            if len(e.shape) != 2 or s.shape != scale_shape(e.shape, block):
                raise CheckpointError(f"{s.file}: tensor {s.name!r} has shape {list(s.shape)}; {block}x{block} "
                                      f"blocks of a {list(e.shape)} weight need {list(scale_shape(e.shape, block))}")
    for name, s in scales.items():
        if name not in weights:
            raise CheckpointError(f"{s.file}: unexpected tensor {s.name!r}: it scales {name!r}, which is not in the "
                                  f"checkpoint")
    return cfg, model, layout, weights, scales, dtype, block


def _init_nonpersistent(model: nn.Module, device: torch.device) -> None:
    """`to_empty` leaves buffers that are not in the checkpoint uninitialised: recompute or zero them."""
    for m in model.modules():
        for name in m._non_persistent_buffers_set:
            if isinstance(m, Rotary) and name == "inv_freq":
                m.inv_freq = rope_frequencies(model.cfg)[0].to(device)
            else:
                getattr(m, name).zero_()


def load_model(path: str | Path, dtype=None, device=None, load_mtp: bool = True, progress: bool = True) -> Transformer:
    """A Hugging Face DeepSeek-V2/V3 folder (or one written by `save_hf`) as a `Transformer` in eval mode.

    dtype: parameter dtype (default: config.json's `torch_dtype`, else the checkpoint's); FP8 weights are
    dequantised into it. device: where the parameters live (default CPU). load_mtp=False skips the MTP layers.
    Raises `CheckpointError` naming the file and tensor for anything missing, unexpected, misshapen or corrupt.
    """
    path = Path(path)
    cfg, model, layout, weights, scales, dtype, block = plan(path, dtype, load_mtp)
    device = torch.device(device or "cpu")
    model.to_empty(device=device)
    if cfg.tie_word_embeddings:  # to_empty replaces each Parameter separately: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    _init_nonpersistent(model, device)
    sd = model.state_dict()
    todo = sorted(((e, layout[name]) for name, e in weights.items() if not layout[name].copy),
                  key=lambda es: (str(es[0].file), es[0].start))
    total = sum(e.nbytes for e, _ in todo)
    with contextlib.ExitStack() as stack, torch.no_grad():
        files = {}

        def handle(e: Entry):
            if e.file not in files:
                files[e.file] = stack.enter_context(open(e.file, "rb"))
            return files[e.file]

        bar = stack.enter_context(tqdm(total=total, unit="B", unit_scale=True, desc=f"load {path.name}",
                                       disable=not progress))
        for e, slot in todo:
            _load_one(handle, e, slot, sd, scales, block)
            bar.update(e.nbytes)
    return model.eval()


def _load_one(handle, e: Entry, slot: Slot, sd: dict[str, torch.Tensor], scales: dict[str, Entry], block: int) -> None:
    dst = slot.view(sd[slot.ours])
    if e.name in scales:
        s = scales[e.name]
        q = read_tensor(handle(e), e).to(dst.device)
        dequantize_blocks_(dst, q, read_tensor(handle(s), s).to(dst.device), block)
    elif dst.device.type == "cpu" and dst.dtype == e.dtype and dst.is_contiguous():
        read_into(handle(e), e, dst)
    else:
        dst.copy_(read_tensor(handle(e), e))


def load_tokenizer(path: str | Path):
    """The folder's tokenizer (`tokenizer.json`, `tokenizer_config.json` with its chat template)."""
    from qiusuo.data.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)
