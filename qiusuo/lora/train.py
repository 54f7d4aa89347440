"""Adapters in a training run (the run config's `[lora]`, `lora.rank > 0`): the model made ready (its base packed
when asked, adapters added, everything else frozen), what checkpoints and the export hold (the adapter in peft's
format, never the base), and the frozen reference policy GRPO compares with, at no cost.

The trainer, SFT and GRPO call these few functions around their own loops, so adapters stay a kind applied from
outside, and the one train step (`qiusuo.train.step`) sees only the parameters that train: the optimizer holds
state for them alone and no gradient buffer is made for the frozen base (`requires_grad` off), whatever its format.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from qiusuo.lora.apply import add_lora, freeze_base
from qiusuo.lora.layers import LoraLayer, adapter_rows, lora_layers
from qiusuo.lora.peft import save_adapter, write_adapter


def prepare(model: nn.Module, section, seed: int) -> list[str]:
    """Pack the base into `section.quantize`'s formats (a no-op for layers a loader already packed; "native" keeps
    what was loaded), add one fresh adapter on `section.targets` and freeze the rest. Returns the names of the
    parameters that train."""
    from qiusuo.quant.apply import parse_spec, quantize_model

    spec = parse_spec(section.quantize or None)
    if isinstance(spec, dict):
        quantize_model(model, spec)
    add_lora(model, section.rank, section.alpha, section.targets, section.dropout, seed, section.rslora)
    return freeze_base(model, router=section.router, norms=section.norms)


def trained_in_full(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train outside the adapters (routers, norms: `lora.router`, `lora.norms`), by name."""
    inside = {id(p) for m in lora_layers(model) for p in m.parameters()}
    return {n: p for n, p in model.named_parameters() if p.requires_grad and id(p) not in inside}


def has_adapters(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in model.modules())


def write(model: nn.Module, folder: Path, base: str | None = None) -> None:
    """The run's adapter (and what trains in full) into a checkpoint folder being written."""
    write_adapter(model, folder, base=base, extras=trained_in_full(model), dropout=_dropout(model))


def export(model: nn.Module, folder: Path, base: str | None = None) -> Path:
    """The run's adapter as a peft folder (`base`: the model folder it adapts, recorded as peft records it)."""
    return save_adapter(model, folder, base=base, extras=trained_in_full(model), dropout=_dropout(model))


def _dropout(model: nn.Module) -> float:
    return max((m.dropout for m in lora_layers(model)), default=0.0)


@contextlib.contextmanager
def base_only(model: nn.Module) -> Iterator[None]:
    """Forwards inside run the base alone (every adapter off): GRPO's reference policy without a copy of the
    model, exact while nothing trains in full beside the adapters."""
    with adapter_rows(lora_layers(model), -1):
        yield
