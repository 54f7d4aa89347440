"""DeepSeekMoE: dense SwiGLU MLP, router, grouped routed experts, shared experts, and load balancing.

Legend: N tokens (B*T flattened), D hidden, E routed experts, K experts per token, I expert width, G groups.

Routed experts are 3D weights. Tokens are sorted by expert and run as one grouped matmul
(`torch._grouped_mm` on CUDA in bf16; on CPU its backward is not implemented in torch 2.13, so a loop over the experts
that received tokens runs the same sorted slices). Nothing loops over tokens, or over experts that got none.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qiusuo.config import ModelConfig


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). Dense layers and the shared experts."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


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
    weights = scores.gather(1, idx)
    if cfg.norm_topk_prob and K > 1:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx


class Router(nn.Module):
    """Scores in fp32 (softmax for V2, sigmoid for V3), top-k selection, and the bookkeeping balancing needs:
    `tokens_per_expert` accumulates this step's load in training (the aux-loss-free bias update reads and clears
    it), and `balance_loss` holds the sequence-wise balance loss of the last forward when `balance_alpha > 0`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        # selection bias, moved by `update_balance_bias`; a buffer, not a parameter: no gradient flows into it
        self.register_buffer("e_score_correction_bias", torch.zeros(E), persistent=cfg.topk_method == "noaux_tc")
        self.register_buffer("tokens_per_expert", torch.zeros(E), persistent=False)
        self.balance_alpha = 0.0
        self.balance_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> weights (N, K) fp32, indices (N, K)."""
        B, T, D = x.shape
        logits = F.linear(x.reshape(-1, D).float(), self.weight.float())  # (N, E)
        scores = logits.sigmoid() if self.cfg.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        bias = self.e_score_correction_bias if self.cfg.topk_method == "noaux_tc" else None
        weights, idx = route(scores, bias, self.cfg)
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(idx.flatten(), minlength=scores.shape[1]).float()
            self.balance_loss = self._sequence_balance_loss(scores.view(B, T, -1), idx.view(B, T, -1)) \
                if self.balance_alpha > 0 else None
        return weights, idx

    def _sequence_balance_loss(self, scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 eq. 17-20: alpha * sum_i f_i * P_i per sequence, averaged over sequences.
        f_i = E/(K*T) * #tokens of the sequence routed to i; P_i = mean over tokens of normalised scores."""
        B, T, E = scores.shape
        K = idx.shape[-1]
        counts = torch.zeros(B, E, device=scores.device).scatter_add_(1, idx.view(B, -1),
                                                                      torch.ones(B, T * K, device=scores.device))
        f = counts * E / (K * T)
        p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (B, E)
        return self.balance_alpha * (f * p).sum(-1).mean()


class Experts(nn.Module):
    """E SwiGLU experts as 3D weights: gate and up fused in `gate_up_proj` (E, 2I, D), `down_proj` (E, D, I).
    Fusing gate and up halves the number of grouped matmuls (transformers 5 packs them the same way)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        E, D, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, I))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (N, D), weights (N, K), idx (N, K) -> (N, D)."""
        N, K = idx.shape
        E = self.gate_up_proj.shape[0]
        if torch.compiler.is_compiling() and not torch.is_grad_enabled() and N * K <= 8 * E and not x.is_cuda:
            return self._gathered(x, weights, idx)  # compiled decoding steps (batch 32 here: 27 vs 39 ms a step)
        flat = idx.flatten()  # (N*K,) slot n*K+k is token n's k-th expert
        order = flat.argsort(stable=True)  # slots sorted by expert
        counts = torch.bincount(flat, minlength=E)  # (E,)
        xs = x[order // K]  # (N*K, D) tokens in expert order
        ys = self.grouped(xs, counts)  # (N*K, D)
        ys = ys * weights.flatten()[order, None].to(ys.dtype)
        out = torch.empty_like(ys).index_copy_(0, order, ys)  # back to slot order: deterministic, no atomics
        return out.view(N, K, -1).sum(1)

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
        y = (self.down_proj[flat] * (F.silu(g) * u)[:, None, :]).sum(-1).to(x.dtype)  # (N*K, D)
        return (y.view(N, K, -1) * weights[..., None].to(y.dtype)).sum(1)

    def grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Run each expert on its contiguous slice of the sorted tokens xs (M, D)."""
        w_gu, w_d = self.gate_up_proj, self.down_proj
        dt = torch.get_autocast_dtype("cuda") if xs.is_cuda and torch.is_autocast_enabled("cuda") else xs.dtype
        if xs.is_cuda and dt == torch.bfloat16:  # grouped_mm's CUDA kernels are bf16 (sm90+)
            offs = counts.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(xs.to(dt), w_gu.to(dt).transpose(1, 2), offs=offs)  # (M, 2I)
            g, u = h.chunk(2, dim=-1)
            return torch._grouped_mm(F.silu(g) * u, w_d.to(dt).transpose(1, 2), offs=offs)  # (M, D)
        return _expert_loop(xs, counts, w_gu, w_d)


@torch.compiler.disable
def _expert_loop(xs: torch.Tensor, counts: torch.Tensor, w_gu: torch.Tensor, w_d: torch.Tensor) -> torch.Tensor:
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
            outs.append(F.linear(F.silu(g) * u, w_d_e))
    return torch.cat(outs) if outs else xs.new_zeros(0, w_d.shape[1])


class MoE(nn.Module):
    """Routed experts plus `n_shared_experts` shared experts run as one dense MLP of width n_shared * I."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        n_shared = cfg.n_shared_experts or 0
        self.shared_experts = MLP(cfg.hidden_size, cfg.moe_intermediate_size * n_shared) if n_shared else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        weights, idx = self.gate(x)
        out = self.experts(x.reshape(-1, D), weights, idx).view(B, T, D)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out


def moe_routers(model: nn.Module) -> list[Router]:
    return [m for m in model.modules() if isinstance(m, Router)]


@torch.no_grad()
def update_balance_bias(model: nn.Module, gamma: float, all_reduce=None) -> dict[str, list[float]]:
    """Aux-loss-free balancing (DeepSeek-V3 section 2.1.2), once per optimizer step:
    `bias_i += gamma * sign(mean_load - load_i)` from the step's token counts, then clear the counts.

    `all_reduce(tensor)` sums counts over ranks (the distributed trainer passes one) so every rank applies the same
    update. Returns per-router loads and MaxVio = (max - mean) / mean for logging.
    """
    routers = moe_routers(model)
    if not routers:
        return {"max_vio": [], "load": []}
    counts = torch.stack([r.tokens_per_expert for r in routers])  # (L_moe, E)
    if all_reduce is not None:
        all_reduce(counts)
    mean = counts.mean(-1, keepdim=True)
    max_vio = ((counts.amax(-1) - mean[:, 0]) / mean[:, 0].clamp_min(1e-9)).tolist()
    for r, c in zip(routers, counts):
        if gamma > 0 and r.cfg.topk_method == "noaux_tc" and c.sum() > 0:
            r.e_score_correction_bias += gamma * torch.sign(c.mean() - c)
        r.tokens_per_expert.zero_()
    return {"max_vio": max_vio, "load": counts.tolist()}
