"""Residual kinds: the plain residual `x + f(x)` (V2/V3) and manifold-constrained hyper-connections (mHC, V4).

Legend: B batch, T tokens, N `hc_mult` residual streams, D hidden.

mHC keeps N residual streams per token, state (B, T, N, D). At each sublayer (attention, MLP) a small learned map
reads all N streams (flattened, RMS-normalised) and gives three weights: `pre` (N) collapses the streams into the
sublayer's input, `post` (N) spreads its output back over the streams, and `comb` (N, N) mixes the streams
themselves. `comb` is pushed onto the doubly stochastic matrices by Sinkhorn-Knopp, so the mixing can neither grow
nor shrink the residual signal however deep the stack (DeepSeek-V4 section 2.2). The model expands the embedding
to N copies at the start and collapses with its own `pre` weights (`HyperHead`) before the final norm.

The arithmetic follows transformers' `DeepseekV4HyperConnection` and DeepSeek's `hc_pre`/`hc_post`: the first
Sinkhorn pass is a row softmax then a column normalisation, the remaining `hc_sinkhorn_iters - 1` passes
normalise rows then columns; the new stream k is `post_k * f + sum_j comb[j, k] * x_j` (comb read transposed).
Both kinds have one interface: `residual(x, f) -> (x', aux)` where `f(h (B, T, D)) -> (y (B, T, D), aux)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qiusuo.config import ModelConfig


def _rms(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Unweighted RMS normalisation over the last dim, in fp32."""
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps)


def _tokens_last(c: torch.Tensor) -> torch.Tensor:
    """(..., N, N) -> (N, N, M) contiguous, M = every leading index."""
    return c.reshape(-1, c.shape[-2], c.shape[-1]).permute(1, 2, 0).contiguous()


def sinkhorn(c: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn-Knopp on c (..., N, N) > 0: a column normalisation, then `iters - 1` row-then-column passes,
    each `c / (sum + eps)` (transformers' and DeepSeek's order). With gradients: `_Sinkhorn`; without (decoding),
    in place, in the (N, N, M) layout only when M is large enough for it to pay (measured: at M = 1..8 the
    permutes cost more than they save; at M = 2048, 5x faster; 117 small ops either way: 175 us at M = 1)."""
    if c.requires_grad:
        return _Sinkhorn.apply(c, iters, eps)
    big = c.numel() >= 4096
    y = _tokens_last(c) if big else c.clone()
    col, row = (0, 1) if big else (-2, -1)
    e = torch.full((), eps, dtype=y.dtype, device=y.device)  # a Python float here costs a conversion per add
    for d in [col] + [row, col] * (iters - 1):
        y.div_(y.sum(d, keepdim=True).add_(e))
    return y.permute(2, 0, 1).reshape(c.shape) if big else y


class _Sinkhorn(torch.autograd.Function):
    """`sinkhorn` with gradients. Two things make it fast on tiny N: it runs on an (N, N, M) layout (M = every
    token), so every sum and division is over long contiguous rows instead of broadcasting over a last axis of
    2 or 4 (10x less time per op here); and its backward is the closed form of one normalisation,
    `(g - sum(g * y)) / den` over the same axis, from the saved y and den, instead of autograd's record of the
    loop. Together an mHC site's forward + backward went from 17.7 to 6.6 ms on v4-tiny's training shapes
    (8 x 256 tokens, N = 2; the 8 sites had been 40% of the step)."""

    @staticmethod
    def forward(ctx, c: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
        ctx.shape, ctx.dims = c.shape, [0] + [1, 0] * (iters - 1)  # 0: columns sum to 1; 1: rows
        c, saved = _tokens_last(c), []
        for d in ctx.dims:
            den = c.sum(d, keepdim=True) + eps
            c = c / den
            saved += [c, den]
        ctx.save_for_backward(*saved)
        return c.permute(2, 0, 1).reshape(ctx.shape)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        g, saved = _tokens_last(g), ctx.saved_tensors
        for k in reversed(range(len(ctx.dims))):
            y, den = saved[2 * k], saved[2 * k + 1]
            g = (g - (g * y).sum(ctx.dims[k], keepdim=True)) / den
        return g.permute(2, 0, 1).reshape(ctx.shape), None, None


class PlainResidual(nn.Module):
    """x + f(x). No parameters, so it adds nothing to a state dict."""

    def __init__(self, cfg: ModelConfig | None = None):
        super().__init__()

    def forward(self, x: torch.Tensor, f):
        y, aux = f(x)
        return x + y, aux


class HyperConnection(nn.Module):
    """One sublayer's mHC site. `fn` ((2+N)*N, N*D), `base` ((2+N)*N,), `scale` (3,): transformers' names
    (`attn_hc.fn`, ...; the hub's `hc_attn_fn`, ...). Kept in fp32 like DeepSeek's."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        N, D = cfg.hc_mult, cfg.hidden_size
        self.N, self.iters, self.eps, self.norm_eps = N, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
        self.fn = nn.Parameter(torch.empty((2 + N) * N, N * D))
        self.base = nn.Parameter(torch.zeros((2 + N) * N))
        self.scale = nn.Parameter(torch.ones(3))

    def weights(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, N, D) -> pre (B, T, N), post (B, T, N), comb (B, T, N, N), all fp32."""
        B, T, N, _ = x.shape
        mixes = F.linear(_rms(x.reshape(B, T, -1), self.norm_eps), self.fn.float())  # (B, T, (2+N)*N)
        pre_w, post_w, comb_w = mixes.split([N, N, N * N], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([N, N, N * N])
        s = self.scale.float()
        pre = torch.sigmoid(pre_w * s[0] + pre_b) + self.eps
        post = 2 * torch.sigmoid(post_w * s[1] + post_b)
        comb = torch.softmax((comb_w * s[2] + comb_b).view(B, T, N, N), dim=-1) + self.eps
        return pre, post, sinkhorn(comb, self.iters, self.eps)

    def forward(self, x: torch.Tensor, f):
        """x (B, T, N, D) -> (B, T, N, D) and f's aux."""
        pre, post, comb = self.weights(x)
        dt = x.dtype
        y, aux = f((pre[..., None] * x).sum(2).to(dt))  # collapse: (B, T, D)
        return post.to(dt)[..., None] * y[..., None, :] + torch.matmul(comb.to(dt).transpose(-1, -2), x), aux


class HyperHead(nn.Module):
    """The final collapse of the N streams into one (B, T, N, D) -> (B, T, D): sigmoid `pre` weights from the
    normalised streams, no Sinkhorn. transformers' `hc_head.{hc_fn, hc_base, hc_scale}`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        N, D = cfg.hc_mult, cfg.hidden_size
        self.eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps
        self.hc_fn = nn.Parameter(torch.empty(N, N * D))
        self.hc_base = nn.Parameter(torch.zeros(N))
        self.hc_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixes = F.linear(_rms(x.flatten(2), self.norm_eps), self.hc_fn.float())  # (B, T, N)
        pre = torch.sigmoid(mixes * self.hc_scale.float() + self.hc_base.float()) + self.eps
        return (pre[..., None] * x).sum(2).to(x.dtype)


RESIDUAL_KINDS: dict[str, type[nn.Module]] = {"plain": PlainResidual, "mhc": HyperConnection}


def residual_kind(cfg: ModelConfig) -> str:
    """mHC for V4, and for any model with `use_mhc` (V4's recipe on an MLA model); else the plain residual."""
    return "mhc" if cfg.use_mhc else "plain"


def expand_streams(cfg: ModelConfig, x: torch.Tensor) -> torch.Tensor:
    """The residual state the first block reads: x itself (plain) or N copies (B, T, N, D) (mHC)."""
    if residual_kind(cfg) == "plain":
        return x
    return x[:, :, None, :].expand(-1, -1, cfg.hc_mult, -1).contiguous()
