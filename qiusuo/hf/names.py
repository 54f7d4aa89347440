"""Parameter names: ours (fused 3D experts, MTP under `mtp.K`) <-> the Hugging Face hub's (per-expert matrices).
One table per family, read by `hf_layout`, drives both directions so save and load cannot drift apart.

V2/V3: our names are the hub's (transformers') without the `model.` prefix, except:
- routed experts: ours `layers.N.mlp.experts.gate_up_proj` (E, 2I, D) and `.down_proj` (E, D, I); the hub's
  `model.layers.N.mlp.experts.J.{gate_proj, up_proj, down_proj}.weight` (I, D), (I, D), (D, I). gate_proj is rows
  [0, I) of expert J's `gate_up_proj`, up_proj rows [I, 2I): both are contiguous views, so nothing is copied.
- MTP module k: ours `mtp.k.{enorm, hnorm, eh_proj, norm, block.*}`; the hub's `model.layers.{L+k}.{enorm, hnorm,
  eh_proj, shared_head.norm, <block names>}`, plus `embed_tokens` and `shared_head.head`, copies of the main
  embedding and output head that vLLM and SGLang read. We write those copies and, on load, only check their shapes.
  In an FP8 export the MTP block's projections are FP8 like any layer's; eh_proj and the norms stay in the model dtype,
  as DeepSeek ships them.
V4: DeepSeek's own names (`embed.weight`, `layers.N.attn.wq_a.weight`, `layers.N.ffn.experts.J.w1.weight`,
`mtp.K.e_proj.weight`, ...), the table in `qiusuo.hf.names_v4`; experts split as above into w1 (gate), w3 (up),
w2 (down).
Other families on these architectures use the same names behind their row's `prefix` (`qiusuo.families`: Kimi-K2.5's
text model is `language_model.model.layers.N...`, `language_model.lm_head.weight`).

`checkpoint_layouts` adds the other spellings a checkpoint may come in, for the loader only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qiusuo.families import FAMILIES
from qiusuo.hf import names_v4
from qiusuo.quant.fp8 import is_quantizable


@dataclass(frozen=True)
class Slot:
    """Where one hub tensor lives in our state dict: `ours[expert][rows[0]:rows[1]]` (or the whole tensor).
    `copy` marks a hub tensor duplicating another one (MTP's embedding/head, a tied head): written, never read.
    `quant`: "fp8" (FP8 blocks in an FP8 export), "expert" (a routed expert's matrix: FP8, or FP4 on request) or
    None (never quantised). `dtype`: what the hub stores it as whatever the model's (None: the export's dtype)."""

    ours: str
    expert: int | None = None
    rows: tuple[int, int] | None = None
    copy: bool = False
    quant: str | None = None
    dtype: torch.dtype | None = None

    def view(self, t: torch.Tensor) -> torch.Tensor:
        if self.expert is not None:
            t = t[self.expert]
        if self.rows is not None:
            t = t[self.rows[0]: self.rows[1]]
        return t


# routed expert j of a V2/V3 block: gate, up, down (V4's: `names_v4.EXPERTS`)
V3_EXPERTS = ("mlp.experts.{j}.gate_proj.weight", "mlp.experts.{j}.up_proj.weight", "mlp.experts.{j}.down_proj.weight")


def _experts(ours: str, hub_prefix: str, names: tuple[str, str, str], t: torch.Tensor) -> list[tuple[str, Slot]]:
    """Per-expert hub matrices of our fused `gate_up_proj` (E, 2I, D) or `down_proj` (E, D, I)."""
    gate, up, down = names
    if ours.endswith("gate_up_proj"):
        I = t.shape[1] // 2
        return [(hub_prefix + n.format(j=j), Slot(ours, j, rows, quant="expert"))
                for j in range(t.shape[0]) for n, rows in ((gate, (0, I)), (up, (I, 2 * I)))]
    return [(hub_prefix + down.format(j=j), Slot(ours, j, quant="expert")) for j in range(t.shape[0])]


def _v3_block(ours_prefix: str, hub_prefix: str, name: str, t: torch.Tensor) -> list[tuple[str, Slot]]:
    """A V2/V3 name inside a block (`self_attn.q_proj.weight`, `mlp.experts.gate_up_proj`, ...)."""
    ours = ours_prefix + name
    if name.startswith("mlp.experts."):
        return _experts(ours, hub_prefix, V3_EXPERTS, t)
    hub = hub_prefix + name
    dtype = torch.float32 if name.endswith("e_score_correction_bias") else None  # bias steps below bf16's resolution
    return [(hub, Slot(ours, quant="fp8" if is_quantizable(hub, t) else None, dtype=dtype))]


def _v4_block(ours_prefix: str, hub_prefix: str, name: str, t: torch.Tensor) -> list[tuple[str, Slot]]:
    """A V4 name inside a block, through `names_v4.BLOCK`."""
    ours = ours_prefix + name
    if name.startswith("mlp.experts."):
        return _experts(ours, hub_prefix, names_v4.EXPERTS, t)
    return [_v4_slot(ours, hub_prefix, names_v4.BLOCK, name)]


def _v4_slot(ours: str, hub_prefix: str, table: dict, name: str) -> tuple[str, Slot]:
    if name not in table:
        raise KeyError(f"{ours}: qiusuo.hf.names_v4 has no DeepSeek-V4 hub name for {name!r}; add it to the table")
    hub, how = table[name]
    return hub_prefix + hub, Slot(ours, **how)


def hf_layout(model: nn.Module) -> dict[str, Slot]:
    """Hub name -> `Slot`, in a stable order (embedding, layers, norm, head, MTP modules), for every tensor of
    `model.state_dict()` (persistent buffers such as `e_score_correction_bias` and `tid2eid` included). Works on a
    meta model."""
    cfg = model.cfg
    L, v4 = cfg.num_hidden_layers, cfg.is_v4
    block = _v4_block if v4 else _v3_block
    layout: dict[str, Slot] = {}
    mtp: dict[str, Slot] = {}
    for ours, t in model.state_dict().items():
        head, _, rest = ours.partition(".")
        if head == "layers":
            n, _, name = rest.partition(".")
            layout.update(block(f"layers.{n}.", f"layers.{n}." if v4 else f"model.layers.{n}.", name, t))
        elif head == "mtp":
            k, _, name = rest.partition(".")
            hub = f"mtp.{k}." if v4 else f"model.layers.{L + int(k)}."
            if name.startswith("block."):
                mtp.update(block(f"mtp.{k}.block.", hub, name.removeprefix("block."), t))
            elif v4:
                mtp.update([_v4_slot(ours, hub, names_v4.MTP, name)])
            else:  # enorm, hnorm, eh_proj, norm: bf16 in DeepSeek-V3's checkpoint (vLLM's MTP layer reads eh_proj
                # into a plain, unquantised nn.Linear; an FP8 eh_proj is ~103 MB smaller than DeepSeek's file)
                mtp[hub + ("shared_head.norm.weight" if name == "norm.weight" else name)] = Slot(ours)
        elif ours == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        elif v4:
            layout.update([_v4_slot(ours, "", names_v4.TOP, ours)])
        else:  # embed_tokens.weight, norm.weight, lm_head.weight
            layout[ours if ours == "lm_head.weight" else "model." + ours] = Slot(ours)
    for k in range(0 if v4 else cfg.num_nextn_predict_layers):
        hub = f"model.layers.{L + k}."
        mtp[hub + "embed_tokens.weight"] = Slot("embed_tokens.weight", copy=True)
        mtp[hub + "shared_head.head.weight"] = Slot("lm_head.weight", copy=True)
    layout.update(mtp)
    prefix = FAMILIES[cfg.model_type].prefix
    return {prefix + name: slot for name, slot in layout.items()} if prefix else layout


def scale_name(model: nn.Module, name: str) -> str:
    """The hub name of weight `name`'s quantisation scale: V4 `<module>.scale`, V2/V3 `<weight>_scale_inv`."""
    return name.removesuffix(".weight") + ".scale" if model.cfg.is_v4 else name + "_scale_inv"


def checkpoint_layouts(model: nn.Module) -> dict[str, dict[str, Slot]]:
    """Every spelling a checkpoint of `model` may come in, each as a layout (checkpoint name -> Slot): "hub"
    (`hf_layout`: what DeepSeek ships and `save_hf` writes), "transformers save_pretrained" (V4, `names_v4.SAVED`),
    "transformers module names" (transformers' in-memory names: ours with `model.`), "qiusuo" (ours: training
    checkpoints, `model.state_dict()`). The loader reads a folder in the one that names most of its tensors."""
    hub = hf_layout(model)
    tied = model.cfg.tie_word_embeddings
    ours = {k: Slot(k, copy=tied and k == "lm_head.weight") for k in model.state_dict()}
    forms = {"hub": hub}
    if model.cfg.is_v4:
        forms["transformers save_pretrained"] = {names_v4.saved_name(n): s for n, s in hub.items()}
    forms["transformers module names"] = {(k if k == "lm_head.weight" else "model." + k): s for k, s in ours.items()}
    forms["qiusuo"] = ours
    return forms


def to_hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Hub-named tensors of `model`: views of its own storage (no copies), in `hf_layout` order."""
    sd = model.state_dict()
    return {name: slot.view(sd[slot.ours]) for name, slot in hf_layout(model).items()}


def from_hf_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor], strict: bool = True) -> None:
    """Copy hub-named tensors into `model` in place (casting to each parameter's dtype). `strict` raises on
    missing or unexpected names and on shape mismatches; copies (MTP embedding/head) are shape-checked only."""
    layout = hf_layout(model)
    sd = model.state_dict()
    if strict:
        missing = [n for n, s in layout.items() if n not in tensors and not s.copy]
        unexpected = [n for n in tensors if n not in layout]
        if missing or unexpected:
            raise KeyError(f"missing hub tensors {missing[:5]} ({len(missing)} in all), "
                           f"unexpected {unexpected[:5]} ({len(unexpected)} in all)")
    with torch.no_grad():
        for name, slot in layout.items():
            if name not in tensors:
                continue
            dst = slot.view(sd[slot.ours])
            src = tensors[name]
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"{name}: shape {tuple(src.shape)} but the model expects {tuple(dst.shape)}")
            if not slot.copy:
                dst.copy_(src)
