"""Parameter names: ours (fused 3D experts, MTP under `mtp.K`) <-> the Hugging Face hub's (per-expert matrices,
MTP as extra layers). One table, `hf_layout`, drives both directions so save and load cannot drift apart.

Our names are HF's without the `model.` prefix, except:
- routed experts: ours `layers.N.mlp.experts.gate_up_proj` (E, 2I, D) and `.down_proj` (E, D, I); the hub's
  `model.layers.N.mlp.experts.J.{gate_proj, up_proj, down_proj}.weight` (I, D), (I, D), (D, I). gate_proj is rows
  [0, I) of expert J's `gate_up_proj`, up_proj rows [I, 2I): both are contiguous views, so nothing is copied.
- MTP module k: ours `mtp.k.{enorm, hnorm, eh_proj, norm, block.*}`; the hub's `model.layers.{L+k}.{enorm, hnorm,
  eh_proj, shared_head.norm, <block names>}`, plus `embed_tokens` and `shared_head.head`, copies of the main
  embedding and output head that vLLM and SGLang read. We write those copies and, on load, only check their shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Slot:
    """Where one hub tensor lives in our state dict: `ours[expert][rows[0]:rows[1]]` (or the whole tensor).
    `copy` marks a hub tensor duplicating another one (MTP's embedding/head, a tied head): written, never read."""

    ours: str
    expert: int | None = None
    rows: tuple[int, int] | None = None
    copy: bool = False

    def view(self, t: torch.Tensor) -> torch.Tensor:
        if self.expert is not None:
            t = t[self.expert]
        if self.rows is not None:
            t = t[self.rows[0]: self.rows[1]]
        return t


def _block_slots(ours_prefix: str, hf_prefix: str, name: str, t: torch.Tensor) -> list[tuple[str, Slot]]:
    """A name inside a block (`self_attn.q_proj.weight`, `mlp.experts.gate_up_proj`, ...)."""
    ours = ours_prefix + name
    if name == "mlp.experts.gate_up_proj":
        E, two_i = t.shape[0], t.shape[1]
        I = two_i // 2
        out = []
        for j in range(E):
            out.append((f"{hf_prefix}mlp.experts.{j}.gate_proj.weight", Slot(ours, j, (0, I))))
            out.append((f"{hf_prefix}mlp.experts.{j}.up_proj.weight", Slot(ours, j, (I, two_i))))
        return out
    if name == "mlp.experts.down_proj":
        return [(f"{hf_prefix}mlp.experts.{j}.down_proj.weight", Slot(ours, j)) for j in range(t.shape[0])]
    return [(hf_prefix + name, Slot(ours))]


def hf_layout(model: nn.Module) -> dict[str, Slot]:
    """Hub name -> `Slot`, in a stable order (embedding, layers, norm, head, MTP layers), for every tensor of
    `model.state_dict()` (persistent buffers such as `e_score_correction_bias` included). Works on a meta model."""
    cfg = model.cfg
    L = cfg.num_hidden_layers
    sd = model.state_dict()
    layout: dict[str, Slot] = {}
    mtp: dict[str, Slot] = {}
    for ours, t in sd.items():
        if ours.startswith("layers."):
            _, n, rest = ours.split(".", 2)
            layout.update(_block_slots(f"layers.{n}.", f"model.layers.{n}.", rest, t))
        elif ours.startswith("mtp."):
            _, k, rest = ours.split(".", 2)
            hf = f"model.layers.{L + int(k)}."
            if rest.startswith("block."):
                mtp.update(_block_slots(f"mtp.{k}.block.", hf, rest[len("block."):], t))
            elif rest == "norm.weight":
                mtp[hf + "shared_head.norm.weight"] = Slot(ours)
            else:
                mtp[hf + rest] = Slot(ours)
        elif ours == "lm_head.weight":
            if not cfg.tie_word_embeddings:
                layout["lm_head.weight"] = Slot(ours)
        else:  # embed_tokens.weight, norm.weight
            layout["model." + ours] = Slot(ours)
    for k in range(cfg.num_nextn_predict_layers):
        hf = f"model.layers.{L + k}."
        mtp[hf + "embed_tokens.weight"] = Slot("embed_tokens.weight", copy=True)
        mtp[hf + "shared_head.head.weight"] = Slot("lm_head.weight", copy=True)
    layout.update(mtp)
    return layout


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
