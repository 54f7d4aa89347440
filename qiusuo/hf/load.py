"""Load a Hugging Face DeepSeek-V2/V3/V4 folder into a `Transformer`, streaming tensor by tensor.

Order of work, so that bad input fails before any memory is committed and nothing is ever half-loaded:
1. read `config.json` and every safetensors header (shapes, dtypes, offsets; nothing else);
2. build the model on the `meta` device, find the spelling the checkpoint's names are in (`checkpoint_layouts`)
   and check every name, shape, dtype and quantisation scale against the model;
3. allocate the parameters once (`to_empty`) and read each tensor straight into its slot. Quantised weights (FP8
   with 128x128 block scales, FP4 experts with a scale per 32 inputs) are read whole, 1 or 0.5 bytes per value,
   and dequantised 128 rows at a time. Peak memory is the model plus the largest single tensor as stored
   (measured in tests/hf/test_memory.py and tests/hf/test_v4_checkpoints.py).

What is quantised is read from the tensors themselves (an e4m3 weight, an int8 one where the model has floats)
and their scales, not from config.json's `quantization_config` (`scale_fmt`, `expert_dtype`), which `qiusuo
inspect` reports: float32, float8_e8m0fnu and uint8 (e8m0 bytes) scales all decode by value (`fp8.decode_scale`).
`quantization_config` is checked: `quant_method` must be DeepSeek's "fp8" (another method, such as Kimi-K2-Thinking's
INT4 "compressed-tensors", stores tensors this loader would misread), `scale_fmt` "ue8m0" or absent (float32).
Tensors that carry no weights (`rotary_emb.inv_freq`: Kimi-K2 and older exports save the rotary table, which is
rebuilt from config.json) and those of parts qiusuo does not run (the family row's `skip`: Kimi-K2.5's vision tower and
projector) are skipped with a logged line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from qiusuo.config import ModelConfig
from qiusuo.families import FAMILIES
from qiusuo.quant.fp4 import GROUP
from qiusuo.quant.fp8 import BLOCK, scale_shape
from qiusuo.hf.names import Slot, checkpoint_layouts
from qiusuo.hf.packed import BAND, Stored, dequantize_stored, int_layout, load_into, native_format
from qiusuo.hf.st import Entry, read_header, read_into, read_tensor
from qiusuo.io import CheckpointError
from qiusuo.model.moe import Experts, MoE
from qiusuo.quant.apply import NATIVE, families, pack_latents, packed_targets, parse_spec, quantize_modules
from qiusuo.quant.formats import Format
from qiusuo.quant.mapped import folder_for, map_banks, seal
from qiusuo.quant.modules import QuantExperts
from qiusuo.quant.placement import place_experts
from qiusuo.model.rope import rotaries
from qiusuo.model.transformer import Transformer

log = logging.getLogger("qiusuo.hf")

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
NO_WEIGHTS = (".rotary_emb.inv_freq",)  # buffers some checkpoints save that the config determines: skipped
QUANT_METHODS = ("fp8", "compressed-tensors")


# the short names people type (the README's `--dtype bf16`) -> torch's
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """A floating dtype from its torch name (`bfloat16`, `torch.float16`) or a short one (`DTYPE_ALIASES`): the one
    parser of every `--dtype` and of config.json's `torch_dtype`."""
    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower().removeprefix("torch.")
    dt = getattr(torch, DTYPE_ALIASES.get(key, key), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise ValueError(f"unknown dtype {name!r}; use float32 (fp32), bfloat16 (bf16) or float16 (fp16)")
    return dt


def dtype_arg(name: str) -> str:
    """`type=` of a `--dtype` option: torch's name for `name` (bf16 -> bfloat16), so `choices` and the code after
    see one spelling; argparse reports a bad one with `parse_dtype`'s message."""
    try:
        return str(parse_dtype(name)).removeprefix("torch.")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def check_model_folder(path: str | Path, flag: str = "") -> Path:
    """`path` if it is a folder with config.json, else a CheckpointError saying what it is instead. A run folder
    (`qiusuo train`/`sft`/`grpo` write RUN/model) is refused with its model named, not silently swapped for it:
    the command then names the folder it runs, at the cost of one retype. `flag`: the option the user passes the
    folder with (`--model`), for the message."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a Hugging Face model folder (config.json + *.safetensors)")
    if (path / "model" / "config.json").is_file():
        raise CheckpointError(f"{path} is a run folder; its model is {path / 'model'} "
                              f"(pass {flag + ' ' if flag else ''}{path / 'model'})")
    raise CheckpointError(f"{path / 'config.json'}: not found; a Hugging Face model folder needs config.json next to "
                          "its weights")


def read_config(path: str | Path) -> tuple[ModelConfig, dict]:
    """(ModelConfig, raw config.json dict) of a model folder."""
    cfg_file = check_model_folder(path) / "config.json"
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    try:
        cfg = ModelConfig.from_hf(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None
    check_quantization(raw, cfg_file)
    return cfg, raw


def check_quantization(raw: dict, where: Path) -> None:
    """config.json's `quantization_config`, when present, is DeepSeek's FP8 (128x128 blocks, float32 or ue8m0
    scales): any other method stores its tensors differently, and loading them as plain weights would be wrong."""
    qc = raw.get("quantization_config")
    if qc is None:
        return
    if not isinstance(qc, dict):
        raise CheckpointError(f"{where}: quantization_config must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method not in QUANT_METHODS:
        raise CheckpointError(f"{where}: quantization_config.quant_method={method!r} is not supported; qiusuo reads "
                              f"DeepSeek's FP8 checkpoints (quant_method 'fp8', 128x128 block scales), "
                              f"compressed-tensors pack-quantized int4/int8 weights and unquantised ones (no "
                              f"quantization_config)")
    if method == "compressed-tensors":
        check_compressed_tensors(qc, where)
        return
    fmt = qc.get("scale_fmt")
    if fmt not in (None, "ue8m0", "float"):
        raise CheckpointError(f"{where}: quantization_config.scale_fmt={fmt!r}; DeepSeek's are 'ue8m0' (V3.1 and "
                              f"later) or absent (float32 scales)")


def check_compressed_tensors(qc: dict, where: Path) -> None:
    """compressed-tensors configs qiusuo runs: `pack-quantized`, weight-only symmetric integers of 4 bits in groups
    or 8 bits per channel (Kimi-K2.5's INT4 experts; `qiusuo convert --quantize int4|int8`). Anything else
    (activation quantisation, asymmetric zero points, other formats) stores tensors this loader would misread."""
    fmt = qc.get("format")
    if fmt != "pack-quantized":
        raise CheckpointError(f"{where}: compressed-tensors format {fmt!r} is not supported; qiusuo reads "
                              f"'pack-quantized' (4- and 8-bit integer weights)")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError(f"{where}: compressed-tensors quantization_config has no config_groups")
    for name, g in groups.items():
        w = (g or {}).get("weights") or {}
        bad = [k for k, ok in (("type", w.get("type") == "int"), ("symmetric", w.get("symmetric") is True),
                               ("num_bits", w.get("num_bits") in (4, 8)),
                               ("strategy", w.get("strategy") in ("group", "channel")),
                               ("input_activations", not g.get("input_activations")),
                               ("output_activations", not g.get("output_activations"))) if not ok]
        if bad:
            raise CheckpointError(f"{where}: compressed-tensors config_groups.{name}: {', '.join(bad)} not supported "
                                  f"(qiusuo runs symmetric int weights, 4-bit groups or 8-bit channels, no "
                                  f"activation quantisation); got weights={w}")


def scale_format(raw: dict) -> str | None:
    """The scale format config.json declares ("ue8m0" or "float"), None when it has no FP8 quantization_config:
    what an export of this checkpoint writes unless told otherwise."""
    qc = raw.get("quantization_config") or {}
    return (qc.get("scale_fmt") or "float") if qc.get("quant_method") == "fp8" else None


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


class Plan(NamedTuple):
    """What `load_model` reads, all checked: the config (MTP dropped when skipped), the model on the meta device
    (parameters in `dtype`), the checkpoint's spelling `form` and its layout (name -> Slot), the weights to read
    and the scales of the quantised ones (weight name -> scale entry), and the FP8 block size."""

    cfg: ModelConfig
    model: Transformer
    form: str
    layout: dict[str, Slot]
    weights: dict[str, Entry]
    scales: dict[str, Entry]
    dtype: torch.dtype
    block: int
    stored: dict[str, Stored]  # weight name -> how it is stored (plain, fp8, fp4, int)


def _meta_model(cfg: ModelConfig, dtype: torch.dtype) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    return model.cast(dtype)  # V4's mHC maps, sinks and position biases stay fp32, as DeepSeek stores them


def scaled_weight(name: str, names) -> str | None:
    """The weight that tensor `name` scales, if it is a quantisation scale: `<weight>_scale_inv` (V3, transformers),
    compressed-tensors' `<weight>_scale`, or `<module>.scale` when `<module>.weight` is among `names` (the V4
    hub's; our own `attn_hc.scale` has none)."""
    if name.endswith(".weight_scale_inv"):
        return name.removesuffix("_scale_inv")
    if name.endswith(".weight_scale"):
        return name.removesuffix("_scale")
    weight = name.removesuffix("scale") + "weight"
    return weight if name.endswith(".scale") and weight in names else None


def plan(path: str | Path, dtype=None, load_mtp: bool = True) -> Plan:
    """Everything `load_model` checks before allocating, from config.json and the safetensors headers alone."""
    path = Path(path)
    cfg, raw = read_config(path)
    entries = read_entries(path)
    skipped = [n for n in entries if n.endswith(NO_WEIGHTS)]
    if skipped:
        log.info("%s: skipping %d tensor(s) that carry no weights (%s, ...): rebuilt from config.json", path,
                 len(skipped), skipped[0])
        for n in skipped:
            entries.pop(n)
    parts = FAMILIES[cfg.model_type].skip
    unrun = [n for n in entries if parts and n.startswith(parts)]
    if unrun:
        log.info("%s: skipping %d tensor(s) of parts qiusuo does not run (%s, ...): the %s text model is loaded", path,
                 len(unrun), unrun[0], cfg.model_type)
        for n in unrun:
            entries.pop(n)
    _compressed_names(entries, path)
    dtype = parse_dtype(dtype) or default_dtype(raw, entries)
    block = _block_size(raw, path)
    model = _meta_model(cfg, dtype)
    forms = checkpoint_layouts(model)
    form = max(forms, key=lambda f: len(forms[f].keys() & entries.keys()))
    layout = forms[form]
    scales = {w: e for n, e in entries.items() if (w := scaled_weight(n, layout))}  # weight name -> its scale
    weights = {n: e for n, e in entries.items() if not scaled_weight(n, layout)}
    if D := cfg.num_nextn_predict_layers:
        base = _meta_model(cfg.replace(num_nextn_predict_layers=0), dtype)
        base_layout = checkpoint_layouts(base)[form]
        mtp_names = [n for n in weights if n in layout and n not in base_layout]
        if not load_mtp and mtp_names:
            log.info("%s: skipping %d MTP layer(s) (%d tensors): load_mtp=False", path, D, len(mtp_names))
        elif not mtp_names:
            log.info("%s: config.json declares %d MTP layer(s) but the checkpoint has no weights for them; "
                     "loading without MTP", path, D)
        if not load_mtp or not mtp_names:
            cfg, model, layout = base.cfg, base, base_layout
            for n in mtp_names:
                weights.pop(n)
                scales.pop(n, None)
    stored = _check(path, model, form, layout, weights, scales, block)
    return Plan(cfg, model, form, layout, weights, scales, dtype, block, stored)


def _compressed_names(entries: dict[str, Entry], path: Path) -> None:
    """compressed-tensors tensors under the weight names the layouts know: `<m>.weight_packed` is `<m>.weight` (its
    `weight_scale` is found by `scaled_weight`); `weight_shape` is implied by config.json and checked through the
    packed shape; zero points and activation-order indices mean a scheme qiusuo does not run."""
    for n in [n for n in entries if n.endswith((".weight_zero_point", ".weight_g_idx"))]:
        raise CheckpointError(f"{entries[n].file}: tensor {n!r}: asymmetric (zero point) or act-order (g_idx) "
                              f"compressed-tensors weights are not supported; qiusuo reads symmetric pack-quantized")
    for n in [n for n in entries if n.endswith(".weight_packed")]:
        weight = n.removesuffix("_packed")
        if weight in entries:
            raise CheckpointError(f"{entries[n].file}: both {weight!r} and {n!r}: one matrix stored twice")
        entries[weight] = entries.pop(n)
    for n in [n for n in entries if n.endswith(".weight_shape")]:
        entries.pop(n)


def _block_size(raw: dict, path: Path) -> int:
    """The FP8 block edge from `quantization_config.weight_block_size` (default 128)."""
    qc = raw.get("quantization_config") or {}
    if not qc.get("weight_block_size"):
        return BLOCK
    br, bc = qc["weight_block_size"]
    if br != bc:
        raise CheckpointError(f"{path / 'config.json'}: quantization_config.weight_block_size "
                              f"{qc['weight_block_size']} is not square; only square FP8 blocks are supported")
    return int(br)


def _check(path: Path, model: Transformer, form: str, layout: dict[str, Slot], weights: dict[str, Entry],
           scales: dict[str, Entry], block: int) -> dict[str, Stored]:
    """Every name, shape, dtype and scale against the model, raising `CheckpointError` at the first problem.
    Returns how each weight is stored."""
    cfg, meta = model.cfg, model.state_dict()
    arch = FAMILIES[cfg.model_type].architectures
    for name, e in weights.items():
        if name not in layout:
            raise CheckpointError(f"{e.file}: unexpected tensor {name!r}: a {arch} with this config.json has no such "
                                  f"weight in the {form} naming (wrong config.json, or a checkpoint of another "
                                  f"architecture)")
    for name, s in scales.items():
        if name not in weights:
            raise CheckpointError(f"{s.file}: unexpected tensor {s.name!r}: it scales {name!r}, which is not in the "
                                  f"checkpoint")
    files = ", ".join(sorted({e.file.name for e in weights.values()}))
    stored = {}
    for name, slot in layout.items():
        if name in weights:
            dst = slot.view(meta[slot.ours])
            stored[name] = _check_stored(name, weights[name], scales.get(name), tuple(dst.shape), dst.dtype, block)
        elif not slot.copy:
            hint = ""
            if slot.ours.endswith("tid2eid"):
                n = slot.ours.split(".")[1]
                hint = (f": layer {n} routes by token id (config.json's mlp_layer_types[{n}] is 'hash_moe', or "
                        f"num_hash_layers={cfg.mlp_layer_types.count('hash_moe')}) and needs its expert table")
            raise CheckpointError(f"{path}: tensor {name!r} is missing from the checkpoint ({files}){hint}")
    return stored


def _check_stored(name: str, e: Entry, s: Entry | None, want: tuple[int, ...], dst_dtype: torch.dtype,
                  block: int) -> Stored:
    """One tensor as stored (plain, FP8 with 128x128 block scales, FP4 packed two per byte with a scale per 32
    inputs, or compressed-tensors pack-quantized integers) against the shape `want` and dtype `dst_dtype` of the
    model's slot; returns how it is stored (`qiusuo.hf.packed.Stored`)."""
    where = f"{e.file}: tensor {name!r}"
    if e.name.endswith(".weight_packed"):
        if s is None:
            raise CheckpointError(f"{where}: {e.name!r} without its weight_scale")
        if len(want) != 2:
            raise CheckpointError(f"{where} is pack-quantized but the model's tensor has shape {list(want)}")
        bits, group = int_layout(e, s, want, where)
        return Stored("int", e, s, bits, group)
    fp8 = e.dtype.is_floating_point and e.dtype.itemsize == 1
    fp4 = e.dtype in (torch.int8, torch.uint8) and dst_dtype.is_floating_point
    stored = "FP8" if fp8 else "packed FP4" if fp4 else None
    if not dst_dtype.is_floating_point:
        if e.dtype.is_floating_point or e.dtype == torch.bool or s is not None:
            raise CheckpointError(f"{where} has dtype {e.dtype}{' and a scale' if s else ''}; it must be an integer "
                                  f"table (expert ids)")
    elif s is None and stored:
        raise CheckpointError(f"{where} is {stored} ({e.dtype}) but its scale ({name.removesuffix('.weight')}.scale"
                              f" or {name}_scale_inv) is missing")
    elif s is None and not e.dtype.is_floating_point:
        raise CheckpointError(f"{where} has dtype {e.dtype}; weights must be floating point")
    elif s is not None and not stored:
        raise CheckpointError(f"{s.file}: tensor {s.name!r} scales {name!r}, which is {e.dtype}, neither FP8 nor "
                              f"packed FP4")
    if s is None:
        if e.shape != want:
            raise CheckpointError(f"{where} has shape {list(e.shape)} but config.json implies {list(want)}")
        return Stored("plain", e)
    if len(want) != 2:
        raise CheckpointError(f"{where} is {stored} but the model's tensor has shape {list(want)}; only matrices "
                              f"are stored quantised")
    if not (s.dtype.is_floating_point or s.dtype == torch.uint8):
        raise CheckpointError(f"{s.file}: tensor {s.name!r} has dtype {s.dtype}; a scale is float32, "
                              f"float8_e8m0fnu or uint8 (e8m0 bytes)")
    R, C = want
    if fp8:
        packed, scale = want, scale_shape(want, block)
        layout = f"{block}x{block} blocks"
    else:
        if C % GROUP:
            raise CheckpointError(f"{where} is packed FP4 but the model's rows have {C} inputs, not a multiple of "
                                  f"the FP4 group of {GROUP}")
        packed, scale = (R, C // 2), (R, C // GROUP)
        layout = f"FP4 groups of {GROUP} inputs (two values per byte)"
    if e.shape != packed:
        raise CheckpointError(f"{where} ({stored}) has shape {list(e.shape)} but config.json implies {list(want)}, "
                              f"stored as {list(packed)}")
    if s.shape != scale:
        raise CheckpointError(f"{s.file}: tensor {s.name!r} has shape {list(s.shape)}; {layout} of a {list(want)} "
                              f"weight need {list(scale)}")
    return Stored("fp8" if fp8 else "fp4", e, s)


def _init_nonpersistent(model: nn.Module, device: torch.device) -> None:
    """`to_empty` leaves buffers that are not in the checkpoint uninitialised: the rotary tables are rebuilt from
    the config (V4 has two, with different bases and scaling), anything else is zeroed."""
    fresh = {f"rotaries.{k}": r for k, r in rotaries(model.cfg).items()}
    for path, m in model.named_modules():
        for name in m._non_persistent_buffers_set:
            if path in fresh:
                setattr(m, name, getattr(fresh[path], name).to(device))
            else:
                getattr(m, name).zero_()


def load_model(path: str | Path, dtype=None, device=None, load_mtp: bool = True, progress: bool = True,
               quantize: str | dict | None = None, experts_device=None, mmap: bool = False) -> Transformer:
    """A Hugging Face DeepSeek-V2/V3/V4 folder (or one written by `save_hf`) as a `Transformer` in eval mode.

    dtype: parameter dtype (default: config.json's `torch_dtype`, else the checkpoint's); FP8, FP4 and integer
    weights not kept packed are dequantised into it. device: where the parameters live (default CPU).
    load_mtp=False skips the MTP modules. quantize: which weights stay packed (`qiusuo.quant.apply.parse_spec`):
    None (default: every weight in `dtype`, as training wants them), "native" (the checkpoint's own FP8 / FP4 /
    int4 / int8 tensors stay packed: what serving loads), "int4", "experts=int4,attention=int8", ...; packed
    weights are written straight from the file into their packed buffers, never through a float copy.
    experts_device: where the routed experts live (e.g. "cpu" beside a CUDA `device`), allocated there directly and
    wrapped in `qiusuo.quant.placement.PlacedExperts`, so only activations cross during a step.
    mmap: packed expert banks in memory-mapped files the page cache holds (`qiusuo.quant.mapped`): a model larger
    than free RAM starts; the first load writes the files, later ones map them and read no expert tensor.
    Names may be the hub's, transformers' (`save_pretrained` or module names) or ours (`checkpoint_layouts`).
    Raises `CheckpointError` naming the file and tensor for anything missing, unexpected, misshapen or corrupt.
    """
    path = Path(path)
    p = plan(path, dtype, load_mtp)
    model = p.model
    quantize_modules(model, module_formats(p, quantize))
    targets = packed_targets(model)
    device = torch.device(device or "cpu")
    _allocate(model, device, torch.device(experts_device) if experts_device is not None else None)
    if p.cfg.tie_word_embeddings:  # to_empty replaces each Parameter separately: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    _init_nonpersistent(model, device)
    mapped = _map_experts(model, p, path, quantize) if mmap else None  # (folder, ready) or None
    sd = model.state_dict()
    todo = sorted(((e, p.layout[name]) for name, e in p.weights.items() if not p.layout[name].copy),
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
            if slot.ours in targets:
                if not (mapped and mapped[1] and isinstance(_bank_of(model, slot.ours), QuantExperts)):
                    _load_packed(handle, slot, sd, p.stored[_name_of(p, e)], p.block, targets[slot.ours])
                bar.update(e.nbytes)
                continue
            _load_one(handle, e, slot, sd, p.stored[_name_of(p, e)], p.block)
            t, E = sd[slot.ours], p.cfg.n_routed_experts
            if not t.is_floating_point() and t.numel() and not 0 <= int(t.min()) <= int(t.max()) < E:  # tid2eid
                raise CheckpointError(f"{e.file}: tensor {e.name!r} holds expert ids in [{int(t.min())}, "
                                      f"{int(t.max())}] but there are {E} experts: a corrupt table or the wrong "
                                      f"config.json")
            bar.update(e.nbytes)
    if mapped and not mapped[1]:
        seal(model, _source_files(p), mapped[0])
    spec = parse_spec(quantize)
    if isinstance(spec, dict):  # kv_b_proj packs after loading, from the float layer the checkpoint filled
        pack_latents(model, spec.get("attention"))
    if experts_device is not None:
        place_experts(model, experts_device)
    return model.eval()


def _source_files(p: Plan) -> list[Path]:
    return [e.file for e in p.weights.values()]


def _bank_of(model: Transformer, ours: str):
    return model.get_submodule(ours.rpartition(".")[0])


def _map_experts(model: Transformer, p: Plan, path: Path, quantize) -> tuple[Path, bool]:
    if not any(isinstance(m, QuantExperts) for m in model.modules()):
        raise ValueError("mmap keeps packed expert banks in files the page cache holds, and this load packs no "
                         "experts: give a quantize spec that packs them (native for an FP8 / FP4 / int4 "
                         "checkpoint; int4, experts=int4, ... for any other)")
    folder = folder_for(path, str(quantize))
    return folder, map_banks(model, _source_files(p), folder)


def _allocate(model: Transformer, device: torch.device, experts_device: torch.device | None) -> None:
    """`to_empty` on `device`, the routed experts on `experts_device` when given: each bank is taken out while the
    rest is allocated, so it is never allocated on `device` at all."""
    banks = [m for m in model.modules() if isinstance(m, MoE)] if experts_device is not None else []
    held = [(m, m.experts) for m in banks]
    for m, _ in held:
        m.experts = nn.Identity()
    model.to_empty(device=device)
    for m, bank in held:
        m.experts = bank.to_empty(device=experts_device)


def _name_of(p: Plan, e: Entry) -> str:
    """The weight name an entry is planned under (compressed-tensors' `weight_packed` is planned as `weight`)."""
    return e.name.removesuffix("_packed") if e.name.endswith(".weight_packed") else e.name


def module_formats(p: Plan, quantize: str | dict | None) -> dict[str, Format]:
    """Module path -> the packed format it loads into, from a `--quantize` spec. "native": each module as its
    checkpoint stores it (all of an expert bank's matrices in one format, else it loads as floats)."""
    spec = parse_spec(quantize)
    if spec is None:
        return {}
    fams = families(p.model)
    if spec != NATIVE:
        return {path: spec[fam] for path, fam in fams.items() if fam in spec}
    by_ours: dict[str, list[Stored]] = {}
    for name, st in p.stored.items():
        by_ours.setdefault(p.layout[name].ours, []).append(st)
    out = {}
    for path in fams:
        m = p.model.get_submodule(path)
        names = [f"{path}.gate_up_proj", f"{path}.down_proj"] if isinstance(m, Experts) else [f"{path}.weight"]
        found = {native_format(st, p.block) for n in names for st in by_ours.get(n, [])}
        if len(found) == 1 and None not in found:
            out[path] = found.pop()
    return out


def _load_packed(handle, slot: Slot, sd: dict[str, torch.Tensor], st: Stored, block: int, target) -> None:
    """One stored matrix into a packed layer (`qiusuo.hf.packed.load_into`): its expert's codes and scales, from
    the slot's first row (a gate/up half of a fused expert matrix starts past row 0)."""
    fmt, codes_name, scale_name = target
    codes, scales = sd[codes_name], sd.get(scale_name)
    if slot.expert is not None:
        codes, scales = codes[slot.expert], None if scales is None else scales[slot.expert]
    q = read_tensor(handle(st.entry), st.entry)
    scale = read_tensor(handle(st.scale), st.scale) if st.scale is not None else None
    load_into(fmt, codes, scales, slot.rows[0] if slot.rows else 0, st, q, scale, block)


def _load_one(handle, e: Entry, slot: Slot, sd: dict[str, torch.Tensor], st: Stored, block: int) -> None:
    """Read one tensor into its float slot: stored packed ones (FP8, FP4, pack-quantized) `BAND` rows at a time
    through a float32 band, the rest straight into the parameter's memory when dtype and device allow."""
    dst = slot.view(sd[slot.ours])
    if st.kind != "plain":
        q = read_tensor(handle(e), e).to(dst.device)
        scale = read_tensor(handle(st.scale), st.scale).to(dst.device)
        for r0 in range(0, dst.shape[0], BAND):
            r1 = min(dst.shape[0], r0 + BAND)
            dst[r0:r1].copy_(dequantize_stored(st, q, scale, r0, r1, block))
    elif dst.device.type == "cpu" and dst.dtype == e.dtype and dst.is_contiguous():
        read_into(handle(e), e, dst)
    else:
        dst.copy_(read_tensor(handle(e), e))


def load_tokenizer(path: str | Path):
    """The folder's tokenizer: `tokenizer.json` (+ `tokenizer_config.json` with its chat template), or Moonshot's
    `tiktoken.model` (Kimi-K2, Moonlight) as a `TiktokenTokenizer`; the same interface either way."""
    from qiusuo.data.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)
