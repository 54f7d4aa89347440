"""DeepSeekMoE: dense SwiGLU MLP, router, grouped routed experts, shared experts, and load balancing.

Legend: N tokens (B*T flattened), D hidden, E routed experts, K experts per token, I expert width, G groups.

Routed experts are 3D weights. Tokens are sorted by expert and run as one grouped matmul
(`torch._grouped_mm` on CUDA in bf16; on CPU its backward is not implemented in torch 2.13, so a loop over the experts
that received tokens runs the same sorted slices). Nothing loops over tokens, or over experts that got none.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from qiusuo.config import ModelConfig


def swiglu(g: torch.Tensor, u: torch.Tensor, limit: float | None) -> torch.Tensor:
    """silu(g) * u; with V4's `swiglu_limit`, g clamped from above and u on both sides first (DeepSeek's
    Expert.forward: the gate has no lower bound)."""
    if limit is not None:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return F.silu(g) * u


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and the shared experts."""

    def __init__(self, dim: int, hidden: int, limit: float | None = None):
        super().__init__()
        self.limit = limit
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self.limit))


def route(scores: torch.Tensor, bias: torch.Tensor | None, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick K experts per token from fp32 scores (N, E). Returns weights (N, K) fp32 and indices (N, K).

    The bias (noaux_tc) shifts *selection* only; weights always come from the unbiased scores. Groups are ranked
    by the sum of their top-2 biased scores (noaux_tc, V3) or their max score (group_limited_greedy, V2).
    """
    E, K, method = cfg.n_routed_experts, cfg.num_experts_per_tok, cfg.topk_method
    choice = scores if bias is None else scores + bias
    if method != "greedy" and cfg.n_group and cfg.n_group > 1:
        G = cfg.n_group
        grouped = choice.view(-1, G, E // G)  # (N, G, E/G)
        if method == "noaux_tc":
            group_score = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_score = grouped.amax(dim=-1)  # (N, G)
        keep = group_score.topk(cfg.topk_group, dim=-1).indices  # (N, topk_group)
        group_mask = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(E // G, dim=1), float("-inf"))
    idx = choice.topk(K, dim=-1).indices  # (N, K)
    return weigh(scores, idx, cfg), idx


def weigh(scores: torch.Tensor, idx: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The chosen experts' weights (N, K) from the unbiased scores, normalised to sum 1 or not, then scaled.

    V2/V3: normalised when `norm_topk_prob` (V2 leaves a single expert's weight as it is). V4 follows DeepSeek's own
    `Gate.forward` (DeepSeek-V4 inference/model.py: `if self.score_func != "softmax": weights /= weights.sum(...)`;
    its ModelArgs has no norm_topk_prob): sigmoid and sqrtsoftplus weights are always normalised, a single expert's
    too, whatever `norm_topk_prob` says (transformers' V4 router agrees); softmax weights, which DeepSeek leaves
    unnormalised and transformers normalises, follow `norm_topk_prob` (no published V4 scores with softmax)."""
    weights = scores.gather(1, idx)
    if cfg.is_v4:
        normalise = cfg.scoring_func != "softmax" or cfg.norm_topk_prob
    else:
        normalise = cfg.norm_topk_prob and idx.shape[1] > 1
    if normalise:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor


SCORES = {
    "softmax": lambda logits: logits.softmax(dim=-1),
    "sigmoid": torch.sigmoid,
    "sqrtsoftplus": lambda logits: F.softplus(logits).sqrt(),  # V4
}


class Routing(NamedTuple):
    """What one MoE layer's router decided, returned to the caller (never stored on the module): balancing is
    computed from it by whoever trains (`routing_load`, `sequence_balance_loss`, `update_balance_bias`)."""

    scores: torch.Tensor  # (N, E) fp32, the unbiased scores
    idx: torch.Tensor  # (N, K) chosen experts


class Router(nn.Module):
    """Scores in fp32 (softmax for V2, sigmoid for V3) and top-k selection. A pure function of its input and its
    two tensors: the weight and the selection bias `e_score_correction_bias` (a persistent buffer, because
    checkpoints carry it under this name; the train step moves it, `update_balance_bias`). It counts nothing and
    does not look at `self.training`: the loads balancing needs are returned (torchtitan's way), so RL, the
    benchmarks and evaluation need no tricks to keep it from counting."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        # selection bias; a buffer, not a parameter: no gradient flows into it
        self.register_buffer("e_score_correction_bias", torch.zeros(E), persistent=cfg.topk_method == "noaux_tc")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
        """x (N, D) -> weights (N, K) fp32 and the `Routing` (scores, indices)."""
        scores = SCORES[self.cfg.scoring_func](F.linear(x.float(), self.weight.float()))  # (N, E)
        bias = self.e_score_correction_bias if self.cfg.topk_method == "noaux_tc" else None
        weights, idx = route(scores, bias, self.cfg)
        return weights, Routing(scores, idx)

    def route(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, Routing]:
        """The MoE layer's view of any router: (weights, expert indices, Routing | None)."""
        weights, routing = self(x)
        return weights, routing.idx, routing


class HashRouter(nn.Module):
    """V4's first layers: which experts a token visits is a fixed table of its id (`tid2eid` (vocab, K), a
    persistent buffer the checkpoint carries); only their weights are learned, from the same scores as `Router`.
    Nothing to balance, so it returns no `Routing` and is not among `moe_routers`."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("tid2eid", torch.zeros(cfg.vocab_size, cfg.num_experts_per_tok, dtype=torch.long))

    @torch.no_grad()
    def reset_table(self, seed: int = 0) -> None:
        """A random table for training from scratch: K distinct experts per token, uniform over the experts,
        seeded per layer (checkpoints bring their own)."""
        V, K = self.tid2eid.shape
        gen = torch.Generator().manual_seed(seed * 1000003 + self.layer_idx)
        for i in range(0, V, 16384):
            rows = min(16384, V - i)
            self.tid2eid[i: i + rows] = torch.rand(rows, self.cfg.n_routed_experts, generator=gen).argsort(-1)[:, :K]

    def route(self, x: torch.Tensor, ids: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, None]:
        return (*self(x, ids), None)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D), ids (N,) -> weights (N, K) fp32 and the experts `tid2eid[ids]` (N, K)."""
        if ids is None:
            raise ValueError("a hash-routed MoE layer needs the token ids (DeepSeek-V4 `hash_moe` layers)")
        scores = SCORES[self.cfg.scoring_func](F.linear(x.float(), self.weight.float()))
        idx = self.tid2eid[ids.reshape(-1)]
        return weigh(scores, idx, self.cfg), idx


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 eq. 17-20 without alpha: sum_i f_i * P_i per sequence, averaged over sequences.
    scores (B, T, E), idx (B, T, K). f_i = E/(K*T) * #tokens of the sequence routed to i; P_i = mean over tokens
    of the normalised scores."""
    B, T, E = scores.shape
    K = idx.shape[-1]
    counts = torch.zeros(B, E, device=scores.device).scatter_add_(1, idx.reshape(B, -1),
                                                                  torch.ones(B, T * K, device=scores.device))
    f = counts * E / (K * T)
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (B, E)
    return (f * p).sum(-1).mean()


def routing_load(routings: list[Routing], num_routers: int, num_experts: int) -> torch.Tensor:
    """(num_routers, E) tokens routed to each expert by each router of a forward, in module order; routers that
    did not run (MTP depths past the sequence, or off) get zero rows. The train step sums these over
    micro-batches and ranks and hands the sum to `update_balance_bias`."""
    device = routings[0].idx.device if routings else None
    load = torch.zeros(num_routers, num_experts, device=device)
    for i, r in enumerate(routings):
        load[i] = torch.bincount(r.idx.flatten(), minlength=num_experts).float()
    return load


def dispatch(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, num_experts: int, run) -> torch.Tensor:
    """The one token dispatch every expert layout shares (single process and expert parallel): sort the N*K
    (token, expert) slots by expert, `run(xs (N*K, D) sorted, counts (E,)) -> ys (N*K, D)` in the same order,
    weight each slot, put the slots back in order and sum over K. x (N, D), weights/idx (N, K) -> (N, D)."""
    N, K = idx.shape
    flat = idx.flatten()  # (N*K,) slot n*K+k is token n's k-th expert
    order = flat.argsort(stable=True)  # slots sorted by expert
    counts = torch.bincount(flat, minlength=num_experts)  # (E,)
    # index_select, not x[...]: its backward is an index_add, 10x faster on a CPU than indexing's index_put
    ys = run(x.index_select(0, order // K), counts)  # (N*K, D)
    ys = ys * weights.flatten().index_select(0, order)[:, None].to(ys.dtype)
    out = torch.empty_like(ys).index_copy_(0, order, ys)  # back to slot order: deterministic, no atomics
    return out.view(N, K, -1).sum(1)


class Experts(nn.Module):
    """E SwiGLU experts as 3D weights: gate and up fused in `gate_up_proj` (E, 2I, D), `down_proj` (E, D, I).
    Fusing gate and up halves the number of grouped matmuls (transformers 5 packs them the same way)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.num_experts = E  # experts the router picks from (an expert-parallel rank holds only some of them)
        self.limit = cfg.swiglu_limit
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))
        self.weight_transform = None  # FP4 quantisation-aware training (qiusuo.train.qat.set_fp4_qat) or None

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (N, D), weights (N, K), idx (N, K) -> (N, D)."""
        N, K = idx.shape
        E = self.num_experts
        if torch.compiler.is_compiling() and not torch.is_grad_enabled() and N * K <= 32 * E and not x.is_cuda:
            # compiled decoding steps (batch 32 here: 27 vs 39 ms a step), speculative verification (K + 1 tokens
            # a row) included: the loop would break the graph, and each layer would then compile on its own
            return self._gathered(x, weights, idx)
        return dispatch(x, weights, idx, E, self.run_sorted)

    def run_sorted(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts on rows sorted by expert (`counts[e]` rows for expert e): here all E are local.
        `ExpertParallel` overrides this with the all-to-all round trip to the ranks owning them."""
        return self.grouped(xs, counts)

    def _gathered(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Few tokens in a compiled inference step (decoding): each (token, expert) pair as a multiply-and-sum
        over that expert's weight rows. No data-dependent shapes, so the step compiles whole, and inductor fuses
        the indexing into the reduction: the chosen weights are read in place, never copied. (Eager, the sorted
        loop is faster: there, gathering copied the weights and batched matrix-vector products ran at ~1 GFLOP/s.)"""
        N, K = idx.shape
        flat = idx.flatten()  # (N*K,)
        xk = x.repeat_interleave(K, dim=0).to(self.gate_up_proj.dtype)  # (N*K, D)
        h = (self.gate_up_proj[flat] * xk[:, None, :]).sum(-1)  # (N*K, 2I)
        g, u = h.chunk(2, dim=-1)
        y = (self.down_proj[flat] * swiglu(g, u, self.limit)[:, None, :]).sum(-1).to(x.dtype)  # (N*K, D)
        return (y.view(N, K, -1) * weights[..., None].to(y.dtype)).sum(1)

    def grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Run each expert on its contiguous slice of the sorted tokens xs (M, D): `down(swiglu(gate_up(xs)))`, with
        both matmuls of an expert in one loop step on a CPU (a gate_up loop then a down loop, through the methods
        below, was 4-15% slower per fwd + bwd of the layer at the bench and demo shapes, 2,048 tokens, 1 thread)."""
        w_gu, w_d = self.gate_up_proj, self.down_proj
        if self.weight_transform is not None:
            w_gu, w_d = self.weight_transform(w_gu), self.weight_transform(w_d)
        if _grouped_mm_ok(xs):
            g, u = _grouped_matmul(xs, counts, w_gu).chunk(2, dim=-1)
            return _grouped_matmul(swiglu(g, u, self.limit), counts, w_d)
        return _expert_loop(xs, counts, w_gu, w_d, self.limit)

    def gate_up(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Sorted rows xs (M, D) -> each through its expert's fused gate and up projection (M, 2I). With `down`,
        the two matmuls of `grouped` one at a time: an adapter on the bank (`qiusuo.lora.layers.LoraExperts`) adds
        its per-expert low-rank terms between them, on the same sorted rows (`grouped` is their fused twin, tested
        equal)."""
        w = self.gate_up_proj if self.weight_transform is None else self.weight_transform(self.gate_up_proj)
        return _grouped_matmul(xs, counts, w)

    def down(self, a: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Sorted rows a (M, I) -> each through its expert's down projection (M, D)."""
        w = self.down_proj if self.weight_transform is None else self.weight_transform(self.down_proj)
        return _grouped_matmul(a, counts, w)


def _grouped_mm_ok(xs: torch.Tensor) -> bool:
    """Whether `torch._grouped_mm` runs these rows: CUDA in bf16 (its kernels' dtype, sm90+)."""
    dt = torch.get_autocast_dtype("cuda") if xs.is_cuda and torch.is_autocast_enabled("cuda") else xs.dtype
    return xs.is_cuda and dt == torch.bfloat16


def _grouped_matmul(xs: torch.Tensor, counts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """xs (M, K) sorted by expert (`counts[e]` rows for expert e), w (E, N, K) -> each row times its expert's
    matrix (M, N): `torch._grouped_mm` on CUDA in bf16, else one matmul per expert that received rows."""
    if _grouped_mm_ok(xs):
        offs = counts.cumsum(0).to(torch.int32)
        return torch._grouped_mm(xs.to(torch.bfloat16), w.to(torch.bfloat16).transpose(1, 2), offs=offs)
    return _matmul_loop(xs, counts, w)


@torch.compiler.disable
def _matmul_loop(xs: torch.Tensor, counts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """One matmul per expert that received rows (see `_expert_loop`)."""
    counts = counts.tolist()
    outs = [F.linear(x_e, w_e) for x_e, w_e, c in zip(xs.split(counts), w.unbind(0), counts) if c]
    return torch.cat(outs) if outs else xs.new_zeros(0, w.shape[1])


@torch.compiler.disable
def _expert_loop(xs: torch.Tensor, counts: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor,
                 limit: float | None = None) -> torch.Tensor:
    """The experts that received tokens, one after another, eagerly: under `torch.compile` the per-expert counts
    would otherwise specialise (and recompile) the graph on every new routing.

    unbind/split once: indexing w[e] or slicing xs per expert makes autograd build a full-size zero gradient per
    expert and sum them (O(E^2) memory traffic: 35% of a bench training step before this)."""
    counts = counts.tolist()
    chunks = xs.split(counts)
    outs = []
    for x_e, w_gu_e, w_d_e, c in zip(chunks, w_gu.unbind(0), w_d.unbind(0), counts):
        if c:
            g, u = F.linear(x_e, w_gu_e).chunk(2, dim=-1)
            outs.append(F.linear(swiglu(g, u, limit), w_d_e))
    return torch.cat(outs) if outs else xs.new_zeros(0, w_d.shape[1])


class DenseMLP(MLP):
    """A dense layer's MLP in the block's MLP-kind interface: forward(x, ids) -> (output, no routing)."""

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        return super().forward(x), None


class MoE(nn.Module):
    """Routed experts plus `n_shared_experts` shared experts run as one dense MLP of width n_shared * I.
    forward(x (B, T, D), ids (B, T)) -> (output (B, T, D), `Routing` | None for a hash-routed layer).
    `hashed`: V4's `hash_moe` kind (`HashRouter`)."""

    def __init__(self, cfg: ModelConfig, hashed: bool = False, layer_idx: int = 0):
        super().__init__()
        self.gate = HashRouter(cfg, layer_idx) if hashed else Router(cfg)
        self.experts = Experts(cfg)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = (MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared, cfg.swiglu_limit)
                               if n_shared else None)

    def forward(self, x: torch.Tensor, ids: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing | None]:
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, idx, routing = self.gate.route(flat, ids)
        out = self.experts(flat, weights, idx).view(B, T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out, routing


def moe_routers(model: nn.Module) -> list[Router]:
    """The routers in module order (main layers, then MTP modules): the rows of `routing_load`."""
    return [m for m in model.modules() if isinstance(m, Router)]


@torch.no_grad()
def update_balance_bias(model: nn.Module, load: torch.Tensor | None, gamma: float,
                        all_reduce=None) -> dict[str, list]:
    """Aux-loss-free balancing (DeepSeek-V3 section 2.1.2), once per optimizer step:
    `bias_i += gamma * sign(mean_load - load_i)` from the step's loads (num_routers, E) (`LossOutput.load`
    summed over the step's micro-batches; None: no forward of this step routed, nothing to do).

    `all_reduce(tensor)` sums the loads over ranks (the distributed step passes one) so every rank applies the
    same update. Returns per-router loads and MaxVio = (max - mean) / mean for logging. Called from the train
    step (`qiusuo.train.step.TrainStep`), the only place the bias moves."""
    routers = moe_routers(model)
    if not routers or load is None:
        return {"max_vio": [], "load": []}
    counts = load.clone()
    if all_reduce is not None:
        all_reduce(counts)
    mean = counts.mean(-1, keepdim=True)
    max_vio = ((counts.amax(-1) - mean[:, 0]) / mean[:, 0].clamp_min(1e-9)).tolist()
    for r, c in zip(routers, counts):
        if gamma > 0 and r.cfg.topk_method == "noaux_tc" and c.sum() > 0:
            r.e_score_correction_bias += gamma * torch.sign(c.mean() - c)
    return {"max_vio": max_vio, "load": counts.tolist()}
