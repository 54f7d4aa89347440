"""The output head and its cross-entropy as one chunked operation: hidden states (N, D) and the head's weight
(V, D) -> the mean loss over labelled rows, without ever holding the (N, V) logits.

Why: on a small model the head is most of the work. The demo's (192 wide, 8192 tokens) head is half its matmul
FLOPs, and `F.cross_entropy(h @ W.T)` wrote, re-read and differentiated 2048 x 8192 fp32 logits per step: memory
traffic, ~170 ms of a 560 ms step on 2 CPU cores. Here the rows go through in tiles that fit the cache (CPU: ~1M
logits, 128 rows at V = 8192; the best of 32..2048 rows measured), and the gradient is computed in the same pass
while each tile's logits are still hot (Liger-Kernel's fused linear cross-entropy): 3 matmuls a tile, one exp pass,
no recomputation; 92 instead of 172 ms forward + backward at that shape. On CUDA the tiles are larger (~128M
logits) and the win is memory: V3's 129k-token head never materialises (N, V) in fp32.

Exact: per tile, logits in fp32, loss = logsumexp - logit[label], gradient = softmax - onehot; the same values as
`F.cross_entropy(..., ignore_index=-100)` up to summation order (tests/model/test_head_loss.py). The gradient
is taken in forward only when autograd needs it; backward scales it by the incoming gradient. Not twice
differentiable (nothing here needs that).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def tile_rows(vocab: int, device: torch.device) -> int:
    """Rows per tile: ~2^20 fp32 logits (4 MiB, near a core's L2 share) on a CPU, ~2^27 on an accelerator."""
    budget = 1 << 20 if device.type == "cpu" else 1 << 27
    return max(16, budget // vocab)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, rows: int) -> torch.Tensor:
        n_valid = (labels != IGNORE_INDEX).sum()
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        # one compute dtype, cast once: autocast's weight cache is off inside a Function (no grad mode), so it
        # would recast the whole (V, D) weight for every tile's two matmuls
        dev = h.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h.dtype
        hc, wc = h.to(dt), weight.to(dt)
        grad_h = torch.empty_like(h) if want_h else None  # (N, D): every tile writes its rows
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None  # (V, D)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(dev, enabled=False):
            for s in range(0, h.shape[0], rows):
                hs, ys = hc[s:s + rows], labels[s:s + rows]  # (r, D), (r,)
                logits = F.linear(hs, wc).float()  # (r, V)
                keep = ys != IGNORE_INDEX
                safe = ys.clamp_min(0)
                top = logits.amax(dim=-1, keepdim=True)  # (r, 1)
                target = logits.gather(1, safe[:, None]) - top  # (r, 1)
                p = logits.sub_(top).exp_()  # in place of the logits: one exp pass serves the loss and the gradient
                norm = p.sum(dim=-1, keepdim=True)  # (r, 1); logsumexp = top + log(norm)
                total += ((norm.log() - target)[:, 0] * keep).sum()
                if not (want_h or want_w):
                    continue
                p.mul_(keep[:, None] / norm)  # softmax; an ignored row becomes 0 (no gradient)
                p.scatter_add_(1, safe[:, None], -keep[:, None].to(p.dtype))  # - onehot(label)
                p = p.to(dt)
                if want_h:
                    grad_h[s:s + rows] = p @ wc
                if want_w and dt == torch.float32:
                    grad_w.addmm_(p.t(), hs)
                elif want_w:  # bf16 compute (autocast, FSDP's mixed precision): accumulated in fp32
                    grad_w += (p.t() @ hs).float()
        scale = 1.0 / n_valid.float()  # inf when nothing is labelled: a NaN loss, as F.cross_entropy's mean gives
        ctx.save_for_backward(grad_h, grad_w, scale)
        ctx.weight_dtype = weight.dtype
        return total * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_h, grad_w, scale = ctx.saved_tensors
        g = grad * scale
        return (grad_h * g.to(grad_h.dtype) if grad_h is not None else None,
                (grad_w * g).to(ctx.weight_dtype) if grad_w is not None else None, None, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                         rows: int | None = None) -> torch.Tensor:
    """mean CE of `h @ weight.T` against `labels` over rows whose label is not -100.
    h (..., D), weight (V, D), labels (...) -> scalar fp32. `rows`: tile height (default `tile_rows`)."""
    h2, y = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    if h2.shape[0] != y.shape[0]:
        raise ValueError(f"{h2.shape[0]} hidden rows but {y.shape[0]} labels")
    return _LinearCrossEntropy.apply(h2, weight, y, rows or tile_rows(weight.shape[0], h.device))
