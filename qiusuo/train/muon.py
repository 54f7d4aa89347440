"""Muon for the hidden matrices, AdamW for the rest, as one optimizer object (DeepSeek-V4's and Moonlight's recipe).

Which parameter gets what (`split_params`):
- Muon (`torch.optim.Muon` when Newton-Schulz runs in bf16, as torch's does; `ExpertMuon`'s same update in fp32
  otherwise, `optim.ns_dtype`, "auto": bf16 on CUDA, fp32 on a CPU): the weights of every `nn.Linear` except the output head: attention, dense MLP,
  shared-expert and MTP projections, and V4's compressor and indexer projections. Those are hidden matrices like
  any other (DeepSeek-V4 keeps AdamW only for the embedding, the head, mHC's static biases and gating factors and
  the norms), so they get Muon too; their `position_bias` tensors are biases and stay on AdamW.
- Muon on 3D expert weights (`ExpertMuon`): `gate_up_proj` (E, 2I, D) and `down_proj` (E, D, I) of routed experts,
  each expert's gate, up and down matrices orthogonalised separately (the fused `gate_up_proj` is two maps), all
  matrices of one shape in one batched Newton-Schulz (`orthogonalise`).
- AdamW: embeddings, the output head, norms, biases, routers (`gate.weight`), mHC's parameters (`attn_hc`,
  `ffn_hc`, `hc_head`: raw parameters, not `nn.Linear`), attention sinks and position biases; built by
  `optim.adamw`, the run's one AdamW builder (`muon_parts` returns these parameters to it).

Learning-rate matching: Muon's orthogonalised update has RMS ~ 1/sqrt(max(A, B)) for an (A, B) matrix; scaling the
lr by 0.2 * sqrt(max(A, B)) (Moonlight, "Muon is Scalable for LLM Training", `adjust_lr_fn="match_rms_adamw"`) gives
it AdamW's typical update RMS of ~0.2, so the AdamW peak lr and weight decay carry over unchanged. The 3D experts
apply the same rule per expert matrix: (I, D) for each of gate and up, (D, I) for down. Weight decay is decoupled, `p *= 1 - lr * wd` with the
unadjusted lr, as torch's Muon does.

`MuonAdamW` exposes what the trainer, `TrainStep`, `set_lr`, checkpoints and `Distributed.full_state` use:
`param_groups` (all parts' groups, in order), `state`, `step`, `zero_grad`, `state_dict`/`load_state_dict` in
`torch.optim.Optimizer`'s layout (parameters numbered across all groups in order), so saved state resumes bit for
bit and distributed code can map state entries to parameters by position.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS

NS_COEFFICIENTS = (DEFAULT_A, DEFAULT_B, DEFAULT_C)


def zeropower_batched(g: torch.Tensor, ns_coefficients=NS_COEFFICIENTS, ns_steps: int = 5,
                      eps: float = EPS, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Newton-Schulz orthogonalisation of each matrix of g (E, A, B), in one batched call: in bf16, the same
    iteration, coefficients and Frobenius normalisation as torch's `_zeropower_via_newtonschulz` applied to g[e]
    one by one; `dtype` fp32 runs the same iteration in fp32 (`ns_dtype`)."""
    a, b, c = ns_coefficients
    x = g.to(dtype)
    tall = g.size(-2) > g.size(-1)
    if tall:
        x = x.mT
    x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(ns_steps):
        gram = x @ x.mT
        update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, update, x, beta=a)
    return x.mT if tall else x


def match_rms_adamw(lr: float, shape: torch.Size) -> float:
    """Moonlight's rule on one matrix's (A, B): lr * 0.2 * sqrt(max(A, B))."""
    A, B = shape[-2:]
    return lr * 0.2 * math.sqrt(max(A, B))


def ns_dtype(setting: str, device: torch.device) -> torch.dtype:
    """`optim.ns_dtype`: "auto" is bf16 on CUDA (where bf16 matmuls are fast) and fp32 elsewhere: a CPU's bf16
    matmuls ran at half the fp32 rate here, and bf16's rounding turned DDP's ~1e-7 gradient differences into
    2.6e-4 weight differences from one process after 3 steps (fp32: 6e-8)."""
    if setting == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bf16": torch.bfloat16, "fp32": torch.float32}[setting]


def orthogonalise(mats: list[torch.Tensor], ns_coefficients=NS_COEFFICIENTS, ns_steps: int = 5, eps: float = EPS,
                  dtype: torch.dtype = torch.bfloat16) -> list[torch.Tensor]:
    """`zeropower_batched` of each (E, A, B) stack in `mats`, with every stack of the same matrix shape (up to
    transposition) in one batched call: a model's Muon matrices come in a few shapes (each layer's projections,
    every expert's), and one bmm over all of a shape replaces tens of small matmuls per iteration. Each matrix's
    arithmetic is the one `zeropower_batched` does on it alone."""
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, m in enumerate(mats):
        buckets.setdefault(tuple(sorted(m.shape[-2:])), []).append(i)
    out: list[torch.Tensor] = [None] * len(mats)
    for ids in buckets.values():
        wide = [mats[i].mT if mats[i].size(-2) > mats[i].size(-1) else mats[i] for i in ids]  # (E_i, A, B), A <= B
        x = zeropower_batched(torch.cat(wide) if len(wide) > 1 else wide[0], ns_coefficients, ns_steps, eps, dtype)
        for i, part in zip(ids, x.split([w.size(0) for w in wide])):
            out[i] = part.mT if mats[i].size(-2) > mats[i].size(-1) else part
    return out


class ExpertMuon(torch.optim.Optimizer):
    """Muon for stacked expert weights (E, A, B), and for 2D matrices when Newton-Schulz runs in fp32: torch's
    Muon update (momentum with Nesterov, decoupled weight decay, Moonlight lr matching per matrix) with the
    orthogonalisation batched over experts and over all parameters of one shape (`orthogonalise`), in `dtype`
    (torch's Muon hard-codes bf16).

    `row_blocks` {parameter: n}: a weight that stacks n matrices along its rows, orthogonalised (and lr-matched)
    one by one: an expert's fused `gate_up_proj` (2I, D) is its gate and up maps, as DeepSeek's experts keep them
    (`w1`, `w3`) and as the shared experts' and dense MLPs' two `nn.Linear` are; orthogonalising the pair as one
    (2I, D) matrix would couple two maps, and costs more (I x I Gram matrices instead of 2I x 2I ones)."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients=NS_COEFFICIENTS, eps: float = EPS, ns_steps: int = 5,
                 dtype: torch.dtype = torch.bfloat16, row_blocks: dict | None = None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps)
        super().__init__(params, defaults)
        self.dtype = dtype
        self.row_blocks = row_blocks or {}
        for group in self.param_groups:
            for p in group["params"]:
                if p.ndim not in (2, 3):
                    raise ValueError(f"ExpertMuon takes matrices or stacked (experts, rows, cols) weights, got "
                                     f"{tuple(p.shape)}")
                if p.shape[-2] % self.row_blocks.get(p, 1):
                    raise ValueError(f"a {tuple(p.shape)} weight cannot stack {self.row_blocks[p]} matrices "
                                     f"along its rows")

    def _matrices(self, p: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """The (M, A, B) matrices Muon orthogonalises one by one in `update` (shaped like p)."""
        n = self.row_blocks.get(p, 1)
        mats = update if update.ndim == 3 else update[None]  # (E, n*A, B)
        return mats if n == 1 else mats.reshape(-1, mats.size(-2) // n, mats.size(-1))  # (E*n, A, B)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = []  # (group, parameter, its matrices to orthogonalise)
        for group in self.param_groups:
            mom = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mom)
                update = p.grad.lerp(buf, mom) if group["nesterov"] else buf
                todo.append((group, p, self._matrices(p, update)))
        # one batched Newton-Schulz per matrix shape across groups that share its settings
        settings = {}
        for k, (group, _, _) in enumerate(todo):
            settings.setdefault((tuple(group["ns_coefficients"]), group["ns_steps"], group["eps"]), []).append(k)
        ortho = [None] * len(todo)
        for (coefficients, steps, eps), ks in settings.items():
            for k, x in zip(ks, orthogonalise([todo[k][2] for k in ks], coefficients, steps, eps, self.dtype)):
                ortho[k] = x
        for (group, p, mats), x in zip(todo, ortho):
            lr = group["lr"]
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(x.reshape(p.shape), alpha=-match_rms_adamw(lr, mats.shape))
        return loss


def split_params(model: nn.Module) -> tuple[list, list, list]:
    """(2D Muon matrices, 3D expert weights, AdamW parameters), each in `named_parameters` order, tied weights once."""
    from qiusuo.model.moe import Experts

    head = getattr(model, "lm_head", None)
    embeds = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    skip = embeds | ({id(head.weight)} if isinstance(head, nn.Linear) else set())
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - skip
    experts = {id(p) for m in model.modules() if isinstance(m, Experts) for p in (m.gate_up_proj, m.down_proj)}
    muon, expert, adamw, seen = [], [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in linear and p.dim() == 2:
            muon.append(p)
        elif id(p) in experts and p.dim() == 3:
            expert.append(p)
        else:
            adamw.append(p)
    return muon, expert, adamw


class MuonAdamW:
    """Several optimizers over disjoint parameters, seen as one (module docstring)."""

    def __init__(self, parts: list[torch.optim.Optimizer]):
        self.parts = parts

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.parts for g in o.param_groups]

    @property
    def state(self) -> dict:
        return {p: s for o in self.parts for p, s in o.state.items()}

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts:
            o.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for o in self.parts:
            o.step()
        return loss

    def state_dict(self) -> dict:
        state, groups, offset = {}, [], 0
        for o in self.parts:
            sd = o.state_dict()
            state.update({i + offset: s for i, s in sd["state"].items()})
            groups += [{**g, "params": [i + offset for i in g["params"]]} for g in sd["param_groups"]]
            offset += sum(len(g["params"]) for g in o.param_groups)
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, sd: dict) -> None:
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"optimizer state has {len(groups)} parameter groups, this optimizer {len(self.param_groups)}: "
                             "was it saved with another optim.name?")
        offset, g0 = 0, 0
        for o in self.parts:
            n_groups = len(o.param_groups)
            n = sum(len(g["params"]) for g in o.param_groups)
            mine = groups[g0:g0 + n_groups]
            o.load_state_dict({
                "state": {int(i) - offset: s for i, s in sd["state"].items() if offset <= int(i) < offset + n},
                "param_groups": [{**g, "params": [i - offset for i in g["params"]]} for g in mine]})
            offset, g0 = offset + n, g0 + n_groups

    def __repr__(self) -> str:
        return "MuonAdamW(" + ", ".join(type(o).__name__ for o in self.parts) + ")"


def muon_parts(model: nn.Module, cfg) -> tuple[list[torch.optim.Optimizer], list]:
    """Muon (2D) and ExpertMuon (3D experts) from an OptimSection, and the parameters left for AdamW, which
    `optim.build_optimizer` builds (one AdamW builder; this file imports nothing of optim.py). With fp32
    Newton-Schulz one `ExpertMuon` holds both groups ("muon", "muon_experts"), so matrices of one shape in either
    are orthogonalised in one batched call; the groups, their order and the state layout are the same either way."""
    from qiusuo.model.moe import Experts

    muon, expert, rest = split_params(model)
    common = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, nesterov=cfg.nesterov,
                  ns_steps=cfg.ns_steps)
    dtype = ns_dtype(cfg.ns_dtype, next(model.parameters()).device)
    fused = {m.gate_up_proj: 2 for m in model.modules() if isinstance(m, Experts)}  # gate and up, one matrix each
    groups = [{"params": muon, "name": "muon"}] if muon else []
    parts = []
    if muon and dtype == torch.bfloat16:
        parts.append(torch.optim.Muon(groups, adjust_lr_fn="match_rms_adamw", **common))
        groups = []
    if expert:
        groups.append({"params": expert, "name": "muon_experts"})
    if groups:  # the same update with Newton-Schulz in `dtype` (torch's Muon has no dtype to set)
        parts.append(ExpertMuon(groups, dtype=dtype, row_blocks=fused, **common))
    return parts, rest
