"""Hugging Face checkpoints in and out: name mapping, streaming safetensors load, atomic export, FP8 blocks.

Names. Ours mirror the hub's without the `model.` prefix, with two differences this module bridges:
- routed experts are packed: `experts.gate_up_proj` (E, 2I, D) holds the hub's per-expert `gate_proj` rows then
  `up_proj` rows, `experts.down_proj` (E, D, I) the per-expert `down_proj`;
- MTP module k is `mtp.k.*`; on the hub it is layer `num_hidden_layers + k` with `enorm`, `hnorm`, `eh_proj`,
  `shared_head.norm` and copies of the shared embedding (`embed_tokens`) and head (`shared_head.head`).

Loading validates everything readable without touching tensor data first (config, index, every file's header
against its size, every key and shape) and raises `CheckpointError` naming the file and the tensor, so nothing is
half-loaded. Only then is memory allocated: the model is built on the `meta` device, materialised once in the
target dtype with `to_empty`, and filled tensor by tensor from memory-mapped files (`safetensors.safe_open`), so
peak memory is the model plus one tensor (FP8: plus one 128-row block in fp32), never a second copy of the model.

FP8 (DeepSeek-V3's format): `float8_e4m3fn` weights with a float32 `weight_scale_inv` per 128x128 block (edge
blocks partial); the real weight is `w8 * weight_scale_inv`. Export quantises with scale = blockmax / 448, so
per element |dequant(x) - x| <= 2^-4 |x| + 2^-10 * scale: e4m3 keeps 3 mantissa bits (round to nearest: half an
ulp is 2^-4 of the value) for normal values, and below 2^-6 (subnormals) the spacing is a fixed 2^-9 in scaled
units. `tests/hf/test_fp8.py` checks exactly this bound.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qiusuo.config import ModelConfig
from qiusuo.model.moe import moe_routers
from qiusuo.model.rope import Rotary
from qiusuo.model.transformer import Transformer

log = logging.getLogger(__name__)

FP8_BLOCK = 128
FP8_MAX = 448.0  # largest finite float8_e4m3fn
ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded as is; the message names the file and the tensor."""


# ---------------------------------------------------------------------------------------------- name mapping
@dataclass(frozen=True)
class Target:
    """Where a hub tensor lives in our model: `state_dict()[name][index]` (index None: the whole tensor).
    `alias`: a copy of a shared tensor (MTP's embedding and head, a tied lm_head) written on export and accepted but
    not read on load."""

    name: str
    index: tuple | None
    shape: tuple[int, ...]
    alias: bool = False


def hf_layout(model: Transformer) -> dict[str, Target]:
    """Hub tensor name -> Target for every tensor a checkpoint of this model holds. Works on a meta model."""
    cfg = model.cfg
    L = cfg.num_hidden_layers
    out: dict[str, Target] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        shape = tuple(t.shape)
        if name == "lm_head.weight":
            out[name] = Target(name, None, shape, alias=cfg.tie_word_embeddings)
            continue
        m = re.fullmatch(r"mtp\.(\d+)\.(.*)", name)
        if m:
            k, rest = int(m.group(1)), m.group(2)
            prefix = f"model.layers.{L + k}."
            if rest == "norm.weight":
                rest = "shared_head.norm.weight"
            elif rest.startswith("block."):
                rest = rest[len("block."):]
            hub = prefix + rest
        else:
            prefix = ""
            hub = "model." + name
        if hub.endswith("mlp.experts.gate_up_proj"):
            E, I2, D = shape
            base = hub[: -len("gate_up_proj")]
            for e in range(E):
                out[f"{base}{e}.gate_proj.weight"] = Target(name, (e, slice(0, I2 // 2)), (I2 // 2, D))
                out[f"{base}{e}.up_proj.weight"] = Target(name, (e, slice(I2 // 2, I2)), (I2 // 2, D))
        elif hub.endswith("mlp.experts.down_proj"):
            base = hub[: -len("down_proj")]
            for e in range(shape[0]):
                out[f"{base}{e}.down_proj.weight"] = Target(name, (e,), shape[1:])
        else:
            out[hub] = Target(name, None, shape)
    emb = tuple(model.embed_tokens.weight.shape)
    for k in range(len(model.mtp)):
        out[f"model.layers.{L + k}.embed_tokens.weight"] = Target("embed_tokens.weight", None, emb, alias=True)
        out[f"model.layers.{L + k}.shared_head.head.weight"] = Target("lm_head.weight", None, emb, alias=True)
    return out


def to_hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Our weights under hub names (per-expert tensors, MTP as extra layers), contiguous copies. A tied lm_head is
    left out, as `save_pretrained` does."""
    return dict(_hf_tensors(model))


def _hf_tensors(model: Transformer):
    sd = model.state_dict()
    for hub, tgt in hf_layout(model).items():
        if hub == "lm_head.weight" and tgt.alias:
            continue
        t = sd[tgt.name]
        yield hub, (t[tgt.index] if tgt.index is not None else t).detach().clone().contiguous()


def from_hf_state_dict(model: Transformer, tensors: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy hub-named tensors (FP8 pairs are dequantised) into `model` in place, after checking every key and shape."""
    layout = hf_layout(model)
    shapes = {k: (tuple(v.shape), _dtype_code(v.dtype)) for k, v in tensors.items()}
    plan = _plan(layout, {k: "<state dict>" for k in tensors}, shapes, model.cfg, skip_mtp=False, strict=strict)
    sd = model.state_dict()
    with torch.no_grad():
        for hub, tgt in plan.items():
            scale = tensors.get(hub + "_scale_inv")
            _assign(sd[tgt.name], tgt.index, tensors[hub], scale)


def _dtype_code(dtype: torch.dtype) -> str:
    return {v: k for k, v in _ST_DTYPES.items()}[dtype]


# ---------------------------------------------------------------------------------------------- FP8 blocks
def quantize_fp8(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w (R, C) -> float8_e4m3fn (R, C) and float32 scale_inv (ceil(R/b), ceil(C/b)) with w ~ w8 * scale_inv
    block-wise; scale = blockmax / 448 (an all-zero block gets scale 1)."""
    R, C = w.shape
    nr, nc = -(-R // block), -(-C // block)
    wf = w.float()
    padded = torch.zeros(nr * block, nc * block, device=w.device)
    padded[:R, :C] = wf.abs()
    amax = padded.view(nr, block, nc, block).amax(dim=(1, 3))  # (nr, nc)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    full = scale.repeat_interleave(block, 0)[:R].repeat_interleave(block, 1)[:, :C]
    q = (wf / full).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32,
                   out: torch.Tensor | None = None, block: int = FP8_BLOCK) -> torch.Tensor:
    """Inverse of `quantize_fp8`, one 128-row block at a time so the fp32 temporary stays (128, C)."""
    R, C = q.shape
    out = torch.empty(R, C, dtype=dtype, device=q.device) if out is None else out
    for i, r0 in enumerate(range(0, R, block)):
        r1 = min(r0 + block, R)
        s = scale_inv[i].float().repeat_interleave(block)[:C].to(q.device)  # (C,)
        out[r0:r1].copy_(q[r0:r1].float() * s)
    return out


def _fp8_exportable(hub: str, t: torch.Tensor) -> bool:
    """What DeepSeek-V3 ships in FP8: the projection matrices inside layers; embeddings, heads, routers, norms,
    the MTP input projection and the biases stay in high precision."""
    return t.dim() == 2 and hub.startswith("model.layers.") and hub.endswith("_proj.weight") \
        and not hub.endswith("eh_proj.weight")


# ---------------------------------------------------------------------------------------------- export
def save_hf(model: Transformer, path: str | os.PathLike, tokenizer=None, fp8: bool = False,
            max_shard_bytes: int = 2**30) -> None:
    """Write a Hugging Face folder that `AutoModelForCausalLM.from_pretrained` loads: config.json,
    generation_config.json, model.safetensors (or shards + model.safetensors.index.json), tokenizer files.

    Atomic: everything is written to a temporary folder beside `path`, fsynced, then renamed into place (an
    existing folder is replaced only after the new one is complete). Shards are materialised one at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        cfg = model.cfg
        dtype = next(model.parameters()).dtype
        conf = cfg.to_hf()
        conf["architectures"] = [ARCHITECTURES[cfg.model_type]]
        conf["torch_dtype"] = str(dtype).removeprefix("torch.")
        if fp8:
            conf["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                           "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
        _write_json(tmp / "config.json", conf)
        gen = {k: getattr(cfg, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id") if getattr(cfg, k) is not None}
        _write_json(tmp / "generation_config.json", gen)
        weight_map = _write_shards(model, tmp, fp8, max_shard_bytes)
        if len(set(weight_map.values())) > 1:
            total = sum(_nbytes(model, fp8))
            _write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
        if tokenizer is not None:
            tokenizer.save(tmp)
        _fsync_dir(tmp)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _nbytes(model: Transformer, fp8: bool):
    for hub, t in _hf_tensors(model):
        if fp8 and _fp8_exportable(hub, t):
            yield t.numel() + 4 * math.ceil(t.shape[0] / FP8_BLOCK) * math.ceil(t.shape[1] / FP8_BLOCK)
        else:
            yield t.numel() * t.element_size()


def _write_shards(model: Transformer, folder: Path, fp8: bool, max_shard_bytes: int) -> dict[str, str]:
    shards: list[list[str]] = []
    buf: dict[str, torch.Tensor] = {}
    size = 0

    def flush():
        nonlocal buf, size
        if buf:
            name = f"part-{len(shards)}"
            save_file(buf, str(folder / name), metadata={"format": "pt"})
            shards.append(list(buf))
            buf, size = {}, 0

    for hub, t in _hf_tensors(model):
        items = [(hub, t)]
        if fp8 and _fp8_exportable(hub, t):
            q, s = quantize_fp8(t)
            items = [(hub, q), (hub + "_scale_inv", s)]
        n = sum(x.numel() * x.element_size() for _, x in items)
        if buf and size + n > max_shard_bytes:
            flush()
        for k, x in items:
            buf[k] = x.cpu()
        size += n
    flush()
    weight_map = {}
    for i, keys in enumerate(shards):
        final = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        _fsync_file(folder / f"part-{i}")
        os.replace(folder / f"part-{i}", folder / final)
        weight_map.update({k: final for k in keys})
    return weight_map


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories; the rename is still atomic
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------- reading
def read_config(path: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """(ModelConfig, raw config.json dict) of a Hugging Face folder."""
    path = Path(path)
    file = path / "config.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a Hugging Face model folder")
    if not file.is_file():
        raise CheckpointError(f"{file}: missing; a Hugging Face model folder needs config.json next to its "
                              "*.safetensors files")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    try:
        return ModelConfig.from_hf(raw), raw
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from None


def read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """tensor name -> (dtype code, shape) from a safetensors header, checked against the file's size so that a
    truncated or corrupt file is refused before any tensor is read."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: truncated ({size} bytes), not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(f"{file}: header claims {n} bytes but the file has {size}; the file is truncated "
                                  "or not safetensors (re-download or re-export it)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    data = size - 8 - n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: tensor {name!r}: corrupt header entry {info!r}") from None
        if dtype not in _ST_DTYPES:
            raise CheckpointError(f"{file}: tensor {name!r}: unsupported dtype {dtype}")
        expect = math.prod(shape) * _ST_DTYPES[dtype].itemsize
        if end - begin != expect or begin < 0 or end > data:
            raise CheckpointError(f"{file}: tensor {name!r}: bytes {begin}..{end} do not hold {dtype}{list(shape)} "
                                  f"inside the {data} data bytes; the file is truncated or corrupt")
        out[name] = (dtype, shape)
    return out


def checkpoint_files(path: Path) -> dict[str, Path]:
    """tensor name -> file, from model.safetensors.index.json or a single model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: corrupt index ({e!r}); it needs a 'weight_map'") from None
        files = {k: path / v for k, v in weight_map.items()}
        for name, f in files.items():
            if not f.is_file():
                raise CheckpointError(f"{f}: missing shard (listed in {index.name} for tensor {name!r}); "
                                      "download or copy every shard")
        return files
    single = path / "model.safetensors"
    if single.is_file():
        return {k: single for k in read_header(single)}
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json (only safetensors "
                          "checkpoints are loaded; convert .bin files with transformers first)")


def _plan(layout: dict[str, Target], where: dict[str, object], shapes: dict[str, tuple], cfg: ModelConfig,
          skip_mtp: bool, strict: bool = True) -> dict[str, Target]:
    """Check the checkpoint's keys and shapes against the model; return the tensors to read (hub name -> Target)."""
    L = cfg.num_hidden_layers
    plan, skipped = {}, 0
    for hub, (dtype, shape) in shapes.items():
        if hub.endswith("_scale_inv"):
            base = hub[: -len("_scale_inv")]
            if base not in shapes or shapes[base][0] != "F8_E4M3":
                raise CheckpointError(f"{where[hub]}: tensor {hub!r}: a block scale without a float8_e4m3fn {base!r}")
            r, c = shapes[base][1]
            want = (math.ceil(r / FP8_BLOCK), math.ceil(c / FP8_BLOCK))
            if tuple(shape) != want:
                raise CheckpointError(f"{where[hub]}: tensor {hub!r}: shape {list(shape)}, expected {list(want)} "
                                      f"(128x128 blocks of {base!r} {[r, c]})")
            continue
        if skip_mtp and _layer_of(hub) >= L:
            skipped += 1
            continue
        if hub.endswith("rotary_emb.inv_freq"):  # recomputed from the config; old exports carried it
            continue
        tgt = layout.get(hub)
        if tgt is None:
            if not strict:
                continue
            raise CheckpointError(f"{where[hub]}: tensor {hub!r} is not part of a {cfg.model_type} model with this "
                                  "config.json (unexpected key); the config and the weights disagree")
        if tuple(shape) != tgt.shape:
            raise CheckpointError(f"{where[hub]}: tensor {hub!r} has shape {list(shape)}, the model expects "
                                  f"{list(tgt.shape)} (shape mismatch); the config and the weights disagree")
        if dtype == "F8_E4M3" and hub + "_scale_inv" not in shapes:
            raise CheckpointError(f"{where[hub]}: tensor {hub!r} is float8_e4m3fn without {hub + '_scale_inv'!r}")
        if dtype not in ("F32", "F16", "BF16", "F8_E4M3", "F64"):
            raise CheckpointError(f"{where[hub]}: tensor {hub!r} has dtype {dtype}; expected floating point")
        if not tgt.alias:
            plan[hub] = tgt
    if skipped:
        log.info("skipped %d MTP tensors (layers >= %d): load_mtp=False", skipped, L)
    missing = [h for h, t in layout.items() if not t.alias and h not in plan]
    if missing and strict:
        files = sorted({str(w) for w in where.values()})
        raise CheckpointError(f"tensor {missing[0]!r} is missing from {', '.join(files) or 'the checkpoint'} "
                              f"({len(missing)} missing in all); the checkpoint is incomplete or for another config")
    return plan


def _layer_of(hub: str) -> int:
    m = re.match(r"model\.layers\.(\d+)\.", hub)
    return int(m.group(1)) if m else -1


def _assign(dst: torch.Tensor, index, src: torch.Tensor, scale: torch.Tensor | None) -> None:
    view = dst[index] if index is not None else dst
    if scale is not None:
        dequantize_fp8(src, scale, view.dtype, out=view)
    else:
        view.copy_(src)


def load_model(path: str | os.PathLike, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               load_mtp: bool = True) -> Transformer:
    """A `Transformer` in eval mode from a Hugging Face folder (bf16/fp16/fp32 or FP8 blocks; one file or shards).

    `dtype` None keeps the checkpoint's (`torch_dtype` in config.json; FP8 checkpoints become bfloat16).
    `load_mtp=False` builds the model without its MTP modules and skips their tensors (logged).
    Routing biases and rotary tables stay float32 whatever `dtype` is."""
    path = Path(path)
    cfg, raw = read_config(path)
    files = checkpoint_files(path)
    shapes: dict[str, tuple] = {}
    for f in sorted(set(files.values())):
        for name, info in read_header(f).items():
            if files.get(name) == f:
                shapes[name] = info
    for name, f in files.items():
        if name not in shapes:
            raise CheckpointError(f"{f}: tensor {name!r} is listed in the index but not in this file")
    if cfg.num_nextn_predict_layers and not load_mtp:
        log.info("%s: not loading %d MTP module(s) (load_mtp=False)", path, cfg.num_nextn_predict_layers)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    elif cfg.num_nextn_predict_layers and not any(_layer_of(k) >= cfg.num_hidden_layers for k in shapes):
        # transformers' save_pretrained drops MTP layers but keeps num_nextn_predict_layers in config.json
        log.info("%s: config.json declares %d MTP module(s) but the weights hold none; loading without MTP",
                 path, cfg.num_nextn_predict_layers)
        cfg = cfg.replace(num_nextn_predict_layers=0)
    with torch.device("meta"):
        model = Transformer(cfg)
    plan = _plan(hf_layout(model), files, shapes, cfg, skip_mtp=not load_mtp)
    if dtype is None:
        dtype = _DTYPE_NAMES.get(raw.get("torch_dtype") or raw.get("dtype"))
        if dtype is None:
            code = shapes[next(iter(plan))][0]
            dtype = torch.bfloat16 if code == "F8_E4M3" else _ST_DTYPES[code]
    device = torch.device(device or "cpu")
    model.to(dtype)
    for router in moe_routers(model):  # selection biases are added to fp32 scores: keep them fp32
        router.e_score_correction_bias = router.e_score_correction_bias.float()
    model.to_empty(device=device)
    sd = model.state_dict()
    by_file: dict[Path, list[str]] = {}
    for hub in plan:
        by_file.setdefault(files[hub], []).append(hub)
    with torch.no_grad():
        for f, keys in by_file.items():
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for hub in keys:
                    tgt = plan[hub]
                    scale = st.get_tensor(hub + "_scale_inv") if hub + "_scale_inv" in shapes else None
                    _assign(sd[tgt.name], tgt.index, st.get_tensor(hub), scale)
        _init_buffers(model, device)
        if cfg.tie_word_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
    gen = path / "generation_config.json"
    model.generation_config = json.loads(gen.read_text()) if gen.is_file() else {}
    return model.eval()


def _init_buffers(model: Transformer, device: torch.device) -> None:
    """`to_empty` leaves buffers that no checkpoint holds uninitialised: rebuild the rotary tables, zero the rest
    (token counters, a non-persistent routing bias)."""
    for module in model.modules():
        if isinstance(module, Rotary):
            fresh = Rotary(model.cfg)
            module.inv_freq = fresh.inv_freq.to(device)
            continue
        for name, buf in list(module._buffers.items()):
            if name in module._non_persistent_buffers_set:
                module._buffers[name] = torch.zeros(buf.shape, dtype=torch.float32, device=device)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer of a Hugging Face folder (tokenizer.json + tokenizer_config.json with its chat template)."""
    from qiusuo.data.tokenizer import Tokenizer

    return Tokenizer.from_dir(path)
