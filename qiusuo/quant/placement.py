"""Routed experts on the CPU beside a GPU: the experts of every MoE layer live in CPU memory (packed, where most
of a DeepSeek model's bytes are), attention, shared experts, dense layers, the head and the caches on the GPU; a
layer's hottest experts may have a copy on the GPU too. During a step only activations cross the bus, never
weights: per token and MoE layer, its K (token, expert) rows of D values go to the CPU and come back, less those
whose expert is hot (`bus_bytes`). This is llama.cpp's `--cpu-moe` / `-ot exps=CPU` and ktransformers' hybrid
placement, applied from outside the model like expert parallelism: `PlacedExperts` replaces a layer's experts and
keeps `Experts`' token dispatch, so routing, weighting and the sum over K are the model's own.

Exactness: rows are split between the two banks after the dispatch sorted them by expert, each expert's rows
are multiplied by that expert's weights wherever it lives, and the results return to the same slots before the
weighting and the sum over K. With both banks on one device the output is bit for bit the unplaced layer's
(tested); across devices it differs only by the devices' own arithmetic for the hot experts.

Hot experts come from routing counts (`routing_counts`): a calibration pass over some tokens, or counts a server
gathered; `--gpu-experts N` keeps each layer's N most used.
"""

from __future__ import annotations

import torch
from torch import nn

from qiusuo.model.moe import Experts, MoE, dispatch, moe_routers


class PlacedExperts(nn.Module):
    """`cold`: the whole bank (any `Experts`, packed or not) on its device; `hot`: copies of some experts
    (`hot_ids`, ascending) on the model's device, or None. forward(x, weights, idx) like `Experts`."""

    def __init__(self, cold: Experts, hot: Experts | None = None, hot_ids: list[int] | None = None):
        super().__init__()
        self.cold, self.hot = cold, hot
        self.num_experts = cold.num_experts
        E = self.num_experts
        slot = torch.full((E,), -1, dtype=torch.long)
        if hot is not None:
            slot[torch.tensor(hot_ids, dtype=torch.long)] = torch.arange(len(hot_ids))
        self.register_buffer("hot_slot", slot, persistent=False)  # expert -> its index in `hot`, -1: cold only
        self.crossed_rows = 0  # rows sent to the cold bank's device and back since construction

    @property
    def device(self) -> torch.device:
        return next(self.cold.buffers(), next(self.cold.parameters(), None)).device

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return dispatch(x, weights, idx, self.num_experts, self.run_sorted)

    def run_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs (M, D) sorted by expert, counts (E,) -> (M, D): hot experts' rows on xs's device, the rest on the cold
        bank's, back in the same order."""
        if self.hot is None:
            return self._cold(xs, counts)
        expert_of = torch.repeat_interleave(torch.arange(self.num_experts, device=counts.device), counts)  # (M,)
        slot = self.hot_slot.to(xs.device)[expert_of.to(xs.device)]  # (M,)
        is_hot = slot >= 0
        out = torch.empty_like(xs)
        hot_rows, cold_rows = is_hot.nonzero()[:, 0], (~is_hot).nonzero()[:, 0]
        hot_counts = torch.bincount(slot[is_hot], minlength=self.hot.num_experts)
        cold_counts = torch.where(self.hot_slot.to(counts.device) >= 0, 0, counts)
        if len(hot_rows):
            out[hot_rows] = self.hot.grouped(xs[hot_rows], hot_counts.to(xs.device)).to(xs.dtype)
        if len(cold_rows):
            out[cold_rows] = self._cold(xs[cold_rows], cold_counts)
        return out

    def _cold(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        dev = self.device
        self.crossed_rows += xs.shape[0]
        return self.cold.grouped(xs.to(dev), counts.to(dev)).to(xs.device, xs.dtype)


def bus_bytes(model: nn.Module) -> int:
    """Bytes that crossed between devices for the experts since placement: rows out and back, D values each."""
    total = 0
    for m in model.modules():
        if isinstance(m, PlacedExperts):
            D = m.cold.hidden if hasattr(m.cold, "hidden") else m.cold.gate_up_proj.shape[-1]
            total += 2 * m.crossed_rows * D * 4
    return total


CALIBRATION = (
    "The quick brown fox jumps over the lazy dog. In 1905 Einstein published four papers; the third introduced "
    "special relativity. def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
    "Q: What is 17 * 23? A: 391. Le renard brun saute par-dessus le chien paresseux. 敏捷的棕色狐狸跳过了懒狗。"
    "SELECT name, count(*) FROM users GROUP BY name ORDER BY 2 DESC; The mitochondria is the powerhouse of the "
    "cell, and the Treaty of Westphalia ended the Thirty Years' War in 1648.")  # prose, code, numbers, languages


@torch.no_grad()
def routing_counts(model: nn.Module, ids: torch.Tensor) -> list[torch.Tensor]:
    """Tokens routed to each expert of each score-routed MoE layer over one forward of `ids` (B, T): the
    calibration `--gpu-experts` ranks experts by."""
    counts: list[torch.Tensor] = []
    hooks = [r.register_forward_hook(lambda mod, inp, out: counts.append(
        torch.bincount(out[1].idx.flatten().cpu(), minlength=mod.cfg.n_routed_experts))) for r in moe_routers(model)]
    try:
        model(ids)
    finally:
        for h in hooks:
            h.remove()
    return counts


def place_experts(model: nn.Module, device: str | torch.device, gpu_experts: int = 0,
                  counts: list[torch.Tensor] | None = None) -> nn.Module:
    """Every MoE layer's experts behind a `PlacedExperts` with the bank on `device`; with `gpu_experts` > 0, each
    layer's most used experts (by `counts`, one tensor per score-routed layer in module order; hash-routed layers
    keep none hot) copied to the device of the layer's router. Returns the model."""
    device = torch.device(device)
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    scored = iter(counts or [])
    for moe in moes:
        experts = moe.experts
        if isinstance(experts, PlacedExperts):  # placed already (by the loader): (re)choose its hot experts
            experts = experts.cold
        experts = experts.to(device)
        here = next(moe.gate.parameters()).device
        hot, ids = None, None
        c = next(scored, None) if hasattr(moe.gate, "e_score_correction_bias") else None
        if gpu_experts > 0 and c is not None:
            ids = sorted(c.argsort(descending=True, stable=True)[:gpu_experts].tolist())
            hot = _subset(experts, ids).to(here)
        moe.experts = PlacedExperts(experts, hot, ids)
    return model


def _subset(experts: Experts, ids: list[int]) -> Experts:
    """A bank holding only experts `ids` (a copy), of the same kind (packed or not)."""
    import copy

    sub = copy.copy(experts)
    sub._parameters, sub._buffers = dict(experts._parameters), dict(experts._buffers)
    index = torch.tensor(ids, dtype=torch.long, device=next(iter(experts.state_dict().values())).device)
    for store in (sub._parameters, sub._buffers):
        for name, t in list(store.items()):
            if t is not None and t.dim() >= 1 and t.shape[0] == experts.num_experts:
                moved = t.detach().index_select(0, index)
                store[name] = nn.Parameter(moved, requires_grad=False) if isinstance(t, nn.Parameter) else moved
    sub.num_experts = len(ids)
    return sub
