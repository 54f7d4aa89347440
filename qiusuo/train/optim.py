"""The optimizer of a run (`optim.name`): AdamW with the usual parameter groups, or Muon for the hidden matrices with
AdamW for the rest (`qiusuo.train.muon`); and learning-rate schedules as pure functions of progress.

Groups: matrices (linear weights, 3D expert weights, the router) get decoupled weight decay; norms, biases and
embeddings do not (decaying an embedding row shrinks rare tokens toward zero for no benefit; decaying a norm
gain fights the scale it exists to learn). The output head is a matrix and decays, as in nanoGPT.

Schedules are functions of (step, progress in [0, 1]) rather than a stateful torch scheduler, so a resumed run
recomputes the same learning rate from its step alone, and a time-budgeted run can use elapsed/budget as
progress when the number of steps is not known in advance.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qiusuo.train.config import OptimSection, ScheduleSection


def trainable(model: nn.Module) -> list:
    """The parameters that train, in `parameters()` order, tied weights once."""
    params, seen = [], set()
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    return params


def param_groups(model: nn.Module, weight_decay: float, params: list | None = None) -> list[dict]:
    """Two AdamW groups of `params` (default: every trainable parameter): `decay` (2D+ weights of Linear layers and
    experts) and `no_decay` (norm gains, biases, embeddings). Tied weights appear once (in the embedding's no-decay
    group)."""
    params = trainable(model) if params is None else params
    embed_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay = [p for p in params if not (p.dim() < 2 or id(p) in embed_ids)]
    no_decay = [p for p in params if p.dim() < 2 or id(p) in embed_ids]
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def adamw(model: nn.Module, params: list, cfg: OptimSection) -> torch.optim.AdamW:
    """THE AdamW of a run, over `params` in `param_groups`' two groups; fused where every parameter is on CUDA
    (the fused kernel exists there only)."""
    fused = all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay, params), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=fused or None)


def build_optimizer(model: nn.Module, cfg: OptimSection):
    """`optim.name`: "adamw" (torch.optim.AdamW) or "muon" (`qiusuo.train.muon`'s Muon parts plus this file's AdamW
    for the rest, as one `MuonAdamW`: the same interface). optim.py imports muon.py, never the other way."""
    if cfg.name == "muon":
        from qiusuo.train.muon import MuonAdamW, muon_parts

        parts, rest = muon_parts(model, cfg)
        return MuonAdamW(parts + [adamw(model, rest, cfg)])
    return adamw(model, trainable(model), cfg)


def lr_factor(cfg: ScheduleSection, step: int, progress: float, position: float = 0.0, end: float = 1.0) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) at `progress` in [0, 1] of the run.

    warmup: linear from 1/warmup to 1 over `warmup_steps` steps (by step, so a short time-budgeted run warms up
    the same way as a long one); then
    cosine:   min + (1 - min) * (1 + cos(pi * p)) / 2 with p the progress after warmup, reaching min at the end;
    wsd:      1 until the last `decay_fraction` of progress, then linear to min (warmup-stable-decay);
    constant: 1.
    A run extended past its budget ("train longer": `cfg.tail_from` >= 0) has, from `position` = `tail_from` on
    (in the budget's unit: seconds or steps, up to `end`), a tail instead: linear from `tail_lr` to
    `tail_lr * min_lr_ratio`.
    """
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    lo = cfg.min_lr_ratio
    if cfg.tail_from >= 0 and position >= cfg.tail_from:
        frac = min(1.0, (position - cfg.tail_from) / max(end - cfg.tail_from, 1e-9))
        return cfg.tail_lr * (1 - (1 - lo) * frac)
    p = min(max(progress, 0.0), 1.0)
    if cfg.kind == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * p))
    if cfg.kind == "wsd":
        start = 1 - cfg.decay_fraction
        return 1.0 if p <= start else 1 - (1 - lo) * (p - start) / cfg.decay_fraction
    return 1.0


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
