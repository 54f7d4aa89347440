"""DeepSeekMoE: dense SwiGLU MLP, router, grouped routed experts, shared experts, and load balancing.

Legend: N tokens (B*T flattened), D hidden, E routed experts, K experts per token, I expert width, G groups.

Routed experts are 3D weights. Tokens are sorted by expert and each of the experts' two matmuls runs as one grouped
matmul over the sorted rows (`grouped_matmul`: `torch._grouped_mm` where this torch runs it for these operands, on a
CPU too, else one matmul per expert that received rows), with its own backward, so an eager step makes a handful
of calls per layer and a compiled step sees one opaque op with static shapes (no graph break, no recompile when
the routing changes). Nothing loops over tokens, or over experts in Python outside that op.
"""

from __future__ import annotations

import functools
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
    for i, r in enumerate(routings):  # scatter_add, not bincount: a fixed shape, so compiled training keeps one graph
        flat = r.idx.flatten()
        load[i].scatter_add_(0, flat, torch.ones(flat.shape, device=device))
    return load


def dispatch(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, num_experts: int, run) -> torch.Tensor:
    """The one token dispatch every expert layout shares (single process and expert parallel): sort the N*K
    (token, expert) slots by expert, `run(xs (N*K, D) sorted, counts (E,)) -> ys (N*K, D)` in the same order,
    weight each slot, put the slots back in order and sum over K. x (N, D), weights/idx (N, K) -> (N, D)."""
    N, K = idx.shape
    flat = idx.flatten()  # (N*K,) slot n*K+k is token n's k-th expert
    order = flat.argsort(stable=True)  # slots sorted by expert
    # counts by scatter_add, not bincount: its shape is E whatever the routing, so a compiled step has no
    # data-dependent shape here (bincount's length depends on the largest index: a graph break per layer)
    counts = torch.zeros(num_experts, dtype=flat.dtype, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    # index_select, not x[...]: its backward is an index_add, 10x faster on a CPU than indexing's index_put
    ys = run(x.index_select(0, order // K), counts)  # (N*K, D)
    ys = ys * weights.flatten().index_select(0, order)[:, None].to(ys.dtype)
    if ys.is_cuda:  # back to slot order and sum over K: index_add_ would add with atomics there (nondeterministic)
        return torch.empty_like(ys).index_copy_(0, order, ys).view(N, K, -1).sum(1)
    # a CPU's index_add_ adds the rows one after another, in order: deterministic, and one pass with no (N*K, D)
    # copy (the combine took 3x less time than index_copy_ + sum at the demo's shape)
    return ys.new_zeros(N, ys.shape[1]).index_add_(0, order // K, ys)


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
            # compiled decoding steps (batch 32 here: 27 vs 39 ms a step against the expert loop this file had
            # before, which broke the graph), speculative verification (K + 1 tokens a row) included
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
        """Each expert on its contiguous slice of the sorted tokens xs (M, D): `down(swiglu(gate_up(xs)))`, one
        expert at a time, both matmuls and the SwiGLU in one op (`expert_swiglu`). `gate_up` then `down` are its
        unfused twin (the adapters' path), equal in value."""
        w_gu, w_d = self.gate_up_proj, self.down_proj
        if self.weight_transform is not None:
            w_gu, w_d = self.weight_transform(w_gu), self.weight_transform(w_d)
        return expert_swiglu(xs, counts, w_gu, w_d, self.limit)

    def gate_up(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Sorted rows xs (M, D) -> each through its expert's fused gate and up projection (M, 2I). With `down`,
        the two matmuls of `grouped`: an adapter on the bank (`qiusuo.lora.layers.LoraExperts`) adds its
        per-expert low-rank terms between them, on the same sorted rows."""
        w = self.gate_up_proj if self.weight_transform is None else self.weight_transform(self.gate_up_proj)
        return grouped_matmul(xs, counts, w)

    def down(self, a: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Sorted rows a (M, I) -> each through its expert's down projection (M, D)."""
        w = self.down_proj if self.weight_transform is None else self.weight_transform(self.down_proj)
        return grouped_matmul(a, counts, w)


def grouped_matmul(xs: torch.Tensor, counts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """xs (M, K) sorted by expert (`counts[e]` rows for expert e), w (E, N, K) -> each row times its expert's
    matrix, `F.linear(rows, w[e])`, (M, N); in autocast's dtype where autocast is on, as `F.linear` would (a custom
    op is not autocast). Eager: an autograd Function (a custom op costs ~30-70 us more per call through the
    dispatcher, as much as a decoding step's matmul on a small model); compiled: the custom op
    `qiusuo::grouped_mm`, which the graph keeps whole."""
    dev = xs.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        xs, w = xs.to(dt), w.to(dt)
    if torch.compiler.is_compiling():
        return torch.ops.qiusuo.grouped_mm(xs, counts, w)
    return _GroupedMatmul.apply(xs, counts, w)


def expert_swiglu(xs: torch.Tensor, counts: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor,
                  limit: float | None) -> torch.Tensor:
    """xs (M, D) sorted by expert, w_gu (E, 2I, D), w_d (E, D, I) -> (M, D): each row through its expert's SwiGLU,
    `down(swiglu(gate_up(row)))`, expert after expert, forward and backward: an expert's (rows, 2I) hidden state
    is still in cache when its SwiGLU and down projection read it. Two whole-batch grouped matmuls with the SwiGLU
    between (`grouped_matmul` twice) wrote and re-read the (M, 2I) state through memory: 4% slower per demo
    training step (fwd + bwd), and the per-expert loop this file had before was 4-15% faster fused than unfused
    for the same reason. Autocast and compile as `grouped_matmul` (the custom op `qiusuo::expert_swiglu`)."""
    dev = xs.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        xs, w_gu, w_d = xs.to(dt), w_gu.to(dt), w_d.to(dt)
    if torch.compiler.is_compiling():
        return torch.ops.qiusuo.expert_swiglu(xs, counts, w_gu, w_d, limit)[0]
    return _ExpertSwiGLU.apply(xs, counts, w_gu, w_d, limit)


def _spans(counts: torch.Tensor):
    """(expert, first row, rows) for each expert with rows, over rows sorted by expert."""
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            yield e, start, c
        start += c


def _expert_swiglu_impl(xs, counts, w_gu, w_d, limit):
    """`expert_swiglu`'s forward, no autograd: (output (M, D), hidden state (M, 2I) kept for the backward)."""
    xs = xs.contiguous()
    y, h = xs.new_empty(xs.shape[0], w_d.shape[1]), xs.new_empty(xs.shape[0], w_gu.shape[1])
    for e, s, c in _spans(counts):
        g, u = torch.mm(xs[s:s + c], w_gu[e].t(), out=h[s:s + c]).chunk(2, dim=-1)
        torch.mm(swiglu(g, u, limit), w_d[e].t(), out=y[s:s + c])
    return y, h


def _expert_swiglu_grads(dy, xs, h, counts, w_gu, w_d, limit, need_x: bool, need_w: bool):
    """(d xs, d w_gu, d w_d) of `expert_swiglu`, expert after expert. silu(g) u with g = min(g, limit) and u
    clamped to [-limit, limit] when V4's limit is set (a clamp passes the gradient where it did not clip). The
    gate's and up's gradients are written straight into their halves of one (rows, 2I) buffer, the gate's by
    aten's fused `silu_backward`: four elementwise passes per expert where the formula written out took ten."""
    dy, xs = dy.contiguous(), xs.contiguous()
    I = w_d.shape[2]
    dx = torch.zeros_like(xs) if need_x else None
    dw_gu = torch.zeros_like(w_gu) if need_w else None
    dw_d = torch.zeros_like(w_d) if need_w else None
    dh = h.new_empty(h.shape)  # (M, 2I): d gate | d up, rows as h's
    for e, s, c in _spans(counts):
        g, u = h[s:s + c].chunk(2, dim=-1)
        if limit is not None:
            g_on, u_on = g <= limit, (u >= -limit) & (u <= limit)
            g, u = g.clamp(max=limit), u.clamp(-limit, limit)
        silu = F.silu(g)
        da = dy[s:s + c] @ w_d[e]  # (c, I)
        d = dh[s:s + c]
        torch.ops.aten.silu_backward.grad_input(da * u, g, grad_input=d[:, :I])  # d gate: da u silu'(g)
        torch.mul(da, silu, out=d[:, I:])  # d up
        if limit is not None:
            d *= torch.cat([g_on, u_on], dim=-1)
        if need_w:
            torch.mm(dy[s:s + c].t(), silu * u, out=dw_d[e])
            torch.mm(d.t(), xs[s:s + c], out=dw_gu[e])
        if need_x:
            torch.mm(d, w_gu[e], out=dx[s:s + c])
    return dx, dw_gu, dw_d


class _ExpertSwiGLU(torch.autograd.Function):
    """Eager `expert_swiglu`."""

    @staticmethod
    def forward(ctx, xs, counts, w_gu, w_d, limit):
        y, h = _expert_swiglu_impl(xs, counts, w_gu, w_d, limit)
        ctx.save_for_backward(xs, h, counts, w_gu, w_d)
        ctx.limit = limit
        return y

    @staticmethod
    def backward(ctx, dy):
        xs, h, counts, w_gu, w_d = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, dw_gu, dw_d = _expert_swiglu_grads(dy, xs, h, counts, w_gu, w_d, ctx.limit, need[0], need[2] or need[3])
        return dx, None, dw_gu, dw_d, None


@torch.library.custom_op("qiusuo::expert_swiglu", mutates_args=())
def _expert_swiglu_op(xs: torch.Tensor, counts: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor,
                      limit: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    return _expert_swiglu_impl(xs, counts, w_gu, w_d, limit)


@_expert_swiglu_op.register_fake
def _(xs, counts, w_gu, w_d, limit):
    return xs.new_empty(xs.shape[0], w_d.shape[1]), xs.new_empty(xs.shape[0], w_gu.shape[1])


@torch.library.custom_op("qiusuo::expert_swiglu_backward", mutates_args=())
def _expert_swiglu_backward_op(dy: torch.Tensor, xs: torch.Tensor, h: torch.Tensor, counts: torch.Tensor,
                               w_gu: torch.Tensor, w_d: torch.Tensor, limit: float | None
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _expert_swiglu_grads(dy, xs, h, counts, w_gu, w_d, limit, True, True)


@_expert_swiglu_backward_op.register_fake
def _(dy, xs, h, counts, w_gu, w_d, limit):
    return torch.empty_like(xs), torch.empty_like(w_gu), torch.empty_like(w_d)


def _expert_swiglu_setup(ctx, inputs, output):
    xs, counts, w_gu, w_d, limit = inputs
    ctx.save_for_backward(xs, output[1], counts, w_gu, w_d)
    ctx.limit = limit


def _expert_swiglu_backward(ctx, dy, dh):
    xs, h, counts, w_gu, w_d = ctx.saved_tensors
    dx, dw_gu, dw_d = torch.ops.qiusuo.expert_swiglu_backward(dy, xs, h, counts, w_gu, w_d, ctx.limit)
    return dx, None, dw_gu, dw_d, None


_expert_swiglu_op.register_autograd(_expert_swiglu_backward, setup_context=_expert_swiglu_setup)


@functools.cache
def _grouped_mm_runs(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch's `torch._grouped_mm` runs on `device` in `dtype`, forward and both gradients' forms
    (tried once on tiny operands): torch 2.13 runs it on a CPU in fp32 and bf16 (a C++ loop of one matmul per
    group, into the output: ~3% faster than the same loop in Python, and the same values); CUDA runs bf16 (sm90+
    kernels) and falls back to a loop otherwise; older versions lack it."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        offs = torch.tensor([2, 4], dtype=torch.int32, device=device)
        a, b = torch.ones(4, 8, dtype=dtype, device=device), torch.ones(2, 8, 8, dtype=dtype, device=device)
        torch._grouped_mm(a, b.mT, offs=offs)
        torch._grouped_mm(a.t(), a, offs=offs)  # (2, 8, 8): a weight gradient's shape
        return True
    except (RuntimeError, NotImplementedError):
        return False


def _use_grouped_mm(a: torch.Tensor, b: torch.Tensor) -> bool:
    """`torch._grouped_mm` takes a and b: one dtype it runs in here, rows of whole 16-byte multiples (its stride
    rule: a tiny test model's odd widths go through the loop)."""
    return (a.dtype == b.dtype and a.shape[-1] * a.element_size() % 16 == 0
            and b.shape[-2] * b.element_size() % 16 == 0 and _grouped_mm_runs(a.device, a.dtype))


def _grouped_mm_impl(xs: torch.Tensor, counts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`grouped_matmul`'s arithmetic, no autograd: xs (M, K), w (E, N, K) -> (M, N)."""
    xs = xs.contiguous()
    if _use_grouped_mm(xs, w):
        return torch._grouped_mm(xs, w.mT, offs=counts.cumsum(0).to(torch.int32))
    out = xs.new_empty(xs.shape[0], w.shape[1])
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            torch.mm(xs[start:start + c], w[e].t(), out=out[start:start + c])
        start += c
    return out


def _grouped_wgrad_impl(grad: torch.Tensor, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The weight gradient of `grouped_matmul`: grad (M, N), xs (M, K) -> (E, N, K), expert e's rows'
    grad^T @ xs (zero for an expert without rows)."""
    grad, xs = grad.contiguous(), xs.contiguous()
    if _use_grouped_mm(grad.t(), xs):
        return torch._grouped_mm(grad.t(), xs, offs=counts.cumsum(0).to(torch.int32))
    out = grad.new_zeros(counts.shape[0], grad.shape[1], xs.shape[1])
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            torch.mm(grad[start:start + c].t(), xs[start:start + c], out=out[e])
        start += c
    return out


def _grouped_mm_grads(grad, xs, counts, w, need_x: bool, need_w: bool, mm, wgrad):
    """(d xs, d w) of `grouped_matmul`: d xs = each row's grad times its expert's w[e] (itself a grouped matmul,
    with w[e]^T), d w = `wgrad`; `mm`/`wgrad` are the eager functions or the custom ops."""
    return (mm(grad, counts, w.mT) if need_x else None), (wgrad(grad, xs, counts) if need_w else None)


class _GroupedMatmul(torch.autograd.Function):
    """Eager `grouped_matmul`. One call per matmul and one per gradient: no per-expert autograd nodes (slicing
    xs or indexing w per expert made autograd build a full-size zero gradient per expert and sum them)."""

    @staticmethod
    def forward(ctx, xs: torch.Tensor, counts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(xs, counts, w)
        return _grouped_mm_impl(xs, counts, w)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xs, counts, w = ctx.saved_tensors
        gx, gw = _grouped_mm_grads(grad, xs, counts, w, ctx.needs_input_grad[0], ctx.needs_input_grad[2],
                                   _grouped_mm_impl, _grouped_wgrad_impl)
        return gx, None, gw


@torch.library.custom_op("qiusuo::grouped_mm", mutates_args=())
def _grouped_mm_op(xs: torch.Tensor, counts: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _grouped_mm_impl(xs, counts, w)


@_grouped_mm_op.register_fake
def _(xs, counts, w):
    return xs.new_empty(xs.shape[0], w.shape[1])


@torch.library.custom_op("qiusuo::grouped_mm_wgrad", mutates_args=())
def _grouped_wgrad_op(grad: torch.Tensor, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return _grouped_wgrad_impl(grad, xs, counts)


@_grouped_wgrad_op.register_fake
def _(grad, xs, counts):
    return grad.new_empty(counts.shape[0], grad.shape[1], xs.shape[1])


def _grouped_mm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _grouped_mm_backward(ctx, grad):
    xs, counts, w = ctx.saved_tensors
    gx, gw = _grouped_mm_grads(grad, xs, counts, w, ctx.needs_input_grad[0], ctx.needs_input_grad[2],
                               torch.ops.qiusuo.grouped_mm, torch.ops.qiusuo.grouped_mm_wgrad)
    return gx, None, gw


_grouped_mm_op.register_autograd(_grouped_mm_backward, setup_context=_grouped_mm_setup)


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
