"""Layers whose weights stay in a packed format (`qiusuo.quant.formats`): `QuantLinear` for a linear layer and
`QuantExperts` for a bank of routed experts. They replace `nn.Linear` / `Experts` from outside the model
(`qiusuo.quant.apply`), the way expert parallelism swaps in its experts; the model's math is unchanged.

Two matmuls, chosen by the number of rows (tokens) in the call:
- few rows (decoding, speculative verification: <= `DECODE_ROWS`): the kernels of `qiusuo.quant.kernels`, which
  read each packed byte once. A decoding step is memory-bound, so its speed is set by the bytes it reads. Each
  module's `act` picks the kernels' activation arithmetic: "q8" (x quantised to int8 per block of 32, integer dot
  products, as llama.cpp decodes its Q8_0/Q4_0) by default for int8, int4 and mxfp4, whose float32-activation
  loop is compute-bound well below bandwidth on 2 cores; "fp32" (exact float32 activations) by choice
  (`qiusuo.quant.apply.set_activations`, `--activations fp32`) and for bf16 and fp8;
- many rows (prefill, evaluation): dequantise a band of output rows to the activation dtype and multiply with
  torch's GEMM, which is compute-bound and far faster per row than any matrix-vector loop. The band keeps the
  scratch small (a few MB), never a full float copy of the weight.
- a gradient to flow back to x (QLoRA: adapters train before and after frozen packed layers): the GEMM path at any
  row count, exact in float, through `_PackedMatmul`, whose backward dequantises the same bands again for
  dx = dy W. Autograd keeping each band's float copy for the backward would hold a float copy of the whole frozen
  base through every step; and the kernels have no backward at all (a gradient would silently stop there).

Codes and scales are buffers, not parameters: nothing here trains (adapters train next to them) and `Transformer
.cast` leaves them alone. State-dict names: `weight` (codes) and `scale` for a linear layer; `gate_up_proj`,
`down_proj` (codes) and `gate_up_proj_scale`, `down_proj_scale` for experts, so the checkpoint layouts that map hub
names to ours still point at the codes.
"""

from __future__ import annotations

import torch
from torch import nn

from qiusuo.model.moe import Experts, dispatch, swiglu
from qiusuo.quant import kernels
from qiusuo.quant.formats import Format

DECODE_ROWS = 16  # rows up to which the packed kernels beat dequantise + GEMM (bench quant)
EXPERT_ROWS = 64  # (token, expert) rows of a layer up to which its experts run through the packed kernels whatever
# the routing (decoding steps; above it, when no expert got more than DECODE_ROWS rows)
BAND = 256  # output rows dequantised at a time on the GEMM path


def _register(module: nn.Module, name: str, fmt: Format, N: int, K: int, lead: tuple[int, ...], device) -> None:
    (qs, qd), scale = fmt.shapes(N, K)
    module.register_buffer(name, torch.empty(*lead, *qs, dtype=qd, device=device))
    sname = "scale" if name == "weight" else f"{name}_scale"
    module.register_buffer(sname, None if scale is None else torch.empty(*lead, *scale[0], dtype=scale[1], device=device))


def packed_matmul(x: torch.Tensor, fmt: Format, q: torch.Tensor, scale: torch.Tensor | None, N: int,
                  act: str = "fp32", kernel_rows: int = DECODE_ROWS, bound: "kernels.Bound | None" = None
                  ) -> torch.Tensor:
    """x (M, K) -> x W^T (M, N) in x's dtype, W (N, K) stored as (q, scale) in `fmt`: through the kernels with
    activation arithmetic `act` (`kernels.ACTS`) up to `kernel_rows` rows (`bound`: the same call bound once,
    `kernels.Bound`), dequantised bands above, and always bands when x needs a gradient (`_PackedMatmul`)."""
    if x.requires_grad and torch.is_grad_enabled():
        return _PackedMatmul.apply(x, fmt, q, scale, N)
    M = x.shape[0]
    if M <= kernel_rows and x.device.type == "cpu":
        xf = x.float().contiguous()
        y = bound(xf) if bound is not None else kernels.mm(xf, fmt.name, q, scale, fmt.group or 32, fmt.block or 128,
                                                            act)
        return y.to(x.dtype)
    return _band_matmul(x, fmt, q, scale, N)


def _bind(bound: "kernels.Bound | None", fmt: Format, q: torch.Tensor, scale: torch.Tensor | None,
          act: str) -> "kernels.Bound | None":
    """`bound` if it still points at (q, scale) with `act`, else a new binding; None while compiling (the graph
    calls the custom ops)."""
    if torch.compiler.is_compiling() or q.device.type != "cpu":
        return None
    if bound is None or not bound.is_for(q, scale, act):
        bound = kernels.Bound(fmt.name, q, scale, fmt.group or 32, fmt.block or 128, act)
    return bound


def grouped_kernel(cache: dict, name: str, fmt: Format, q: torch.Tensor, scale: torch.Tensor | None,
                   act: str):
    """`f(xs (M, K) float32 sorted by group, counts (G,)) -> (M, N)`: the grouped kernel over the bank (q, scale),
    bound once (`kernels.Bound`, kept in `cache[name]`) on a CPU eagerly, the checked call (the custom op)
    while compiling or off the CPU. The one way every packed module with banks (experts, MLA's heads, V4's
    grouped projection) reaches the kernels."""
    bound = _bind(cache.get(name), fmt, q, scale, act)
    if bound is None:
        return lambda xs, counts: kernels.grouped_mm(xs, counts, fmt.name, q, scale, fmt.group or 32,
                                                     fmt.block or 128, act)
    cache[name] = bound
    return bound


def _band_matmul(x: torch.Tensor, fmt: Format, q: torch.Tensor, scale: torch.Tensor | None, N: int) -> torch.Tensor:
    """x (M, K) -> x W^T (M, N), W dequantised a band of output rows at a time."""
    out = torch.empty(x.shape[0], N, dtype=x.dtype, device=x.device)
    for r0, r1, w in _bands(fmt, q, scale, N, x.dtype):
        out[:, r0:r1] = x @ w.t()
    return out


def _bands(fmt: Format, q: torch.Tensor, scale: torch.Tensor | None, N: int, dtype: torch.dtype):
    """(r0, r1, W[r0:r1] (band, K) dequantised to `dtype`) band by band."""
    step = BAND if fmt.name != "fp8" else max(fmt.block, BAND // fmt.block * fmt.block)
    for r0 in range(0, N, step):
        r1 = min(N, r0 + step)
        s0, s1 = fmt.scale_rows(r0, r1)
        yield r0, r1, fmt.dequantize(q[r0:r1], None if scale is None else scale[s0:s1]).to(dtype)


class _PackedMatmul(torch.autograd.Function):
    """y = x W^T with a gradient for x only (W is frozen), each band of W dequantised in the forward and again in
    the backward (dx = dy W, summed band by band): nothing of W's float form outlives its band."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: Format, q: torch.Tensor, scale: torch.Tensor | None, N: int):
        ctx.fmt, ctx.N = fmt, N
        ctx.save_for_backward(q, scale)
        return _band_matmul(x, fmt, q, scale, N)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        q, scale = ctx.saved_tensors
        dx = None
        for r0, r1, w in _bands(ctx.fmt, q, scale, ctx.N, dy.dtype):
            part = dy[:, r0:r1] @ w  # (M, K)
            dx = part if dx is None else dx + part
        return dx, None, None, None, None


class QuantLinear(nn.Module):
    """y = x W^T (+ bias) with W (out_features, in_features) kept as `fmt` codes and scales."""

    def __init__(self, in_features: int, out_features: int, fmt: Format, bias: bool = False, device=None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        fmt.check(out_features, in_features, "a linear layer")
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        self.act = kernels.default_act(fmt.name, fmt.group)
        self.kernel_rows = DECODE_ROWS  # rows up to which a call runs through the kernels (more: dequantised bands)
        self._bound = None  # the weight bound to the kernels on the first decoding call (`kernels.Bound`)
        _register(self, "weight", fmt, out_features, in_features, (), device)
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, fmt: Format) -> "QuantLinear":
        """Quantise an existing layer (band by band: the float weight plus one band at a time)."""
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, fmt, linear.bias is not None, device=w.device,
                dtype=w.dtype)
        m.fill(w)
        if linear.bias is not None:
            m.bias.copy_(linear.bias)
        return m

    @torch.no_grad()
    def fill(self, w: torch.Tensor, r0: int = 0) -> None:
        """Quantise float rows `w` (n, K) into output rows [r0, r0 + n), in bands."""
        fill_rows(self.fmt, self.weight, self.scale, w, r0)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (N, K): the slow reference."""
        return self.fmt.dequantize(self.weight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)
        bound = None
        if rows.shape[0] <= self.kernel_rows:
            bound = self._bound = _bind(self._bound, self.fmt, self.weight, self.scale, self.act)
        y = packed_matmul(rows, self.fmt, self.weight, self.scale, self.out_features, self.act,
                          self.kernel_rows, bound)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, format={self.fmt}, act={self.act}"


class QuantGroupedLinear(QuantLinear):
    """V4's grouped output projection (`GroupedLinear`, the hub's `wo_a`) packed: G independent (in -> out/G)
    projections stored as one (out, in) matrix, so its codes and scales are `QuantLinear`'s and load from the
    checkpoint's rows as they are. x (..., G, in) -> (..., G, out/G). Few rows: the rows of each group are one
    "expert" of the grouped kernel over the codes viewed as a bank (G, out/G, in); many: each group's rows through
    `packed_matmul`'s dequantised bands."""

    def __init__(self, in_features: int, out_features: int, groups: int, fmt: Format, device=None,
                 dtype: torch.dtype = torch.float32):
        if out_features % groups or (fmt.name == "fp8" and out_features // groups % fmt.block):
            raise ValueError(f"a grouped projection of {out_features} rows in {groups} groups needs whole groups"
                             + (f" of whole {fmt.block}-row fp8 blocks" if fmt.name == "fp8" else ""))
        super().__init__(in_features, out_features, fmt, False, device, dtype)
        self.groups = groups
        self._banks = {}  # "weight" -> its bank bound to the grouped kernel (`grouped_kernel`)
        self._views = None  # (weight, scale, bank codes, bank scales) while the buffers are these

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, fmt: Format) -> "QuantGroupedLinear":
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, linear.groups, fmt, device=w.device, dtype=w.dtype)
        m.fill(w)
        return m

    def _bank(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The codes and scales viewed as G matrices of out/G rows (the same memory)."""
        v = self._views
        if v is None or v[0] is not self.weight or v[1] is not self.scale:
            G, s = self.groups, self.scale
            sv = None if s is None else s.view(G, -1, *s.shape[1:])
            v = self._views = (self.weight, s, self.weight.view(G, -1, self.weight.shape[-1]), sv)
        return v[2], v[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        G, K = self.groups, self.in_features
        rows = x.reshape(-1, G, K)  # (M, G, in)
        M, R = rows.shape[0], self.out_features // G
        if M <= self.kernel_rows and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
            q, scale = self._bank()
            xs = rows.transpose(0, 1).reshape(G * M, K).float().contiguous()  # sorted by group
            counts = torch.full((G,), M, dtype=torch.int64)
            y = grouped_kernel(self._banks, "weight", self.fmt, q, scale, self.act)(xs, counts)
            return y.view(G, M, R).transpose(0, 1).reshape(*x.shape[:-1], R).to(x.dtype)
        out = []
        for g in range(G):
            s0, s1 = self.fmt.scale_rows(g * R, (g + 1) * R)
            out.append(packed_matmul(rows[:, g], self.fmt, self.weight[g * R: (g + 1) * R],
                                     None if self.scale is None else self.scale[s0:s1], R, self.act, 0))
        return torch.stack(out, 1).view(*x.shape[:-1], R)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", groups={self.groups}"


@torch.no_grad()
def fill_rows(fmt: Format, q: torch.Tensor, scale: torch.Tensor | None, w: torch.Tensor, r0: int = 0) -> None:
    """Quantise float rows `w` (n, K) into rows [r0, r0 + n) of codes `q` and their scales, `BAND` rows (fp8: whole
    blocks) at a time, so only one band of float32 scratch exists."""
    n = w.shape[0]
    step = BAND if fmt.name != "fp8" else max(fmt.block, BAND // fmt.block * fmt.block)
    for a in range(0, n, step):
        b = min(n, a + step)
        codes, s = fmt.quantize(w[a:b])
        q[r0 + a: r0 + b].copy_(codes)
        if s is not None:
            s0, s1 = fmt.scale_rows(r0 + a, r0 + b)
            scale[s0:s1].copy_(s)


class QuantExperts(Experts):
    """E SwiGLU experts with `gate_up_proj` (E, 2I, D) and `down_proj` (E, D, I) kept as `fmt` codes and scales.
    The token dispatch is `Experts`' (`qiusuo.model.moe.dispatch`); the sorted rows run through
    `kernels.grouped_mm`, which touches only the experts that received rows, so a decoding step reads the chosen
    experts' bytes and no others. With many rows per expert (prefill) each such expert is dequantised band by band
    and multiplied with torch's GEMM instead."""

    def __init__(self, num_experts: int, hidden: int, width: int, fmt: Format, limit: float | None = None,
                 device=None):
        nn.Module.__init__(self)
        fmt.check(2 * width, hidden, "routed experts' gate_up_proj")
        fmt.check(hidden, width, "routed experts' down_proj")
        if fmt.name == "fp8" and width % fmt.block:
            raise ValueError(f"fp8 experts need moe_intermediate_size ({width}) to be a multiple of the {fmt.block}"
                             f"-row block (gate and up are fused); keep the experts in another format")
        self.num_experts, self.hidden, self.width, self.fmt, self.limit = num_experts, hidden, width, fmt, limit
        self.act = kernels.default_act(fmt.name, fmt.group)
        self.kernel_rows = DECODE_ROWS  # an expert's rows up to which its calls run through the kernels
        self.weight_transform = None
        self._bound = {}  # bank name -> `kernels.Bound`, bound on the first decoding call
        _register(self, "gate_up_proj", fmt, 2 * width, hidden, (num_experts,), device)
        _register(self, "down_proj", fmt, hidden, width, (num_experts,), device)

    @classmethod
    @torch.no_grad()
    def from_experts(cls, experts: Experts, fmt: Format) -> "QuantExperts":
        E, two_i, D = experts.gate_up_proj.shape
        m = cls(E, D, two_i // 2, fmt, experts.limit, device=experts.gate_up_proj.device)
        for e in range(E):
            fill_rows(fmt, m.gate_up_proj[e], m.gate_up_proj_scale[e] if m.gate_up_proj_scale is not None else None,
                      experts.gate_up_proj[e])
            fill_rows(fmt, m.down_proj[e], m.down_proj_scale[e] if m.down_proj_scale is not None else None,
                      experts.down_proj[e])
        return m

    def dequantized(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up (E, 2I, D), down (E, D, I)) in float32: the slow reference."""
        def deq(q, s):
            return torch.stack([self.fmt.dequantize(q[e], None if s is None else s[e]) for e in range(q.shape[0])])
        return deq(self.gate_up_proj, self.gate_up_proj_scale), deq(self.down_proj, self.down_proj_scale)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """x (N, D), weights (N, K), idx (N, K) -> (N, D). No compiled special case: `run_sorted` is one opaque
        op per matmul whatever the routing, so a compiled decoding step has no data-dependent shapes here."""
        return dispatch(x, weights, idx, self.num_experts, self.run_sorted)

    def _few(self, xs: torch.Tensor, counts: torch.Tensor) -> bool:
        """Whether these sorted rows run through the packed kernels (decoding) rather than dequantised bands."""
        if xs.requires_grad and torch.is_grad_enabled():  # the kernels have no backward (module docstring)
            return False
        few = xs.shape[0] <= max(EXPERT_ROWS, self.kernel_rows) or torch.compiler.is_compiling() or \
            int(counts.max()) <= self.kernel_rows
        return few and xs.device.type == "cpu"

    def grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs (M, D) sorted by expert, counts (E,) -> (M, D): two kernel calls with few rows."""
        if self._few(xs, counts):
            h = self._kernel("gate_up_proj")(xs.float().contiguous(), counts)  # (M, 2I)
            g, u = h.chunk(2, dim=-1)
            return self._kernel("down_proj")(swiglu(g, u, self.limit).contiguous(), counts).to(xs.dtype)
        return _expert_bands(xs, counts, self)

    def _kernel(self, name: str):
        """The bank `name` through the grouped kernel (`grouped_kernel`)."""
        return grouped_kernel(self._bound, name, self.fmt, getattr(self, name), getattr(self, f"{name}_scale"),
                              self.act)

    def gate_up(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`grouped`'s first matmul alone: xs (M, D) -> (M, 2I), float32 from the kernels (few rows), xs' dtype
        from the bands. With `down`, what an adapter on the bank composes (`Experts.gate_up`)."""
        return self._matmul(xs, counts, "gate_up_proj", 2 * self.width)

    def down(self, a: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """`grouped`'s second matmul alone: a (M, I) -> (M, D), dtypes as `gate_up`."""
        return self._matmul(a, counts, "down_proj", self.hidden)

    def _matmul(self, xs: torch.Tensor, counts: torch.Tensor, name: str, N: int) -> torch.Tensor:
        if self._few(xs, counts):
            return self._kernel(name)(xs.float().contiguous(), counts)
        return _packed_loop(xs, counts, self.fmt, getattr(self, name), getattr(self, f"{name}_scale"), N)


@torch.compiler.disable
def _packed_loop(xs: torch.Tensor, counts: torch.Tensor, fmt: Format, q: torch.Tensor, scale: torch.Tensor | None,
                 N: int) -> torch.Tensor:
    """One packed matrix per expert that received rows (`packed_matmul`'s GEMM path): xs (M, K) -> (M, N)."""
    outs = [packed_matmul(x_e, fmt, q[e], None if scale is None else scale[e], N)
            for e, x_e in enumerate(xs.split(counts.tolist())) if len(x_e)]
    return torch.cat(outs) if outs else xs.new_zeros(0, N)


@torch.compiler.disable
def _expert_bands(xs: torch.Tensor, counts: torch.Tensor, m: QuantExperts) -> torch.Tensor:
    """Many rows: each expert that received rows, through `packed_matmul`'s GEMM path (dequantised in bands)."""
    outs = []
    sl = lambda s, e: None if s is None else s[e]  # noqa: E731
    for e, x_e in enumerate(xs.split(counts.tolist())):
        if len(x_e):
            h = packed_matmul(x_e, m.fmt, m.gate_up_proj[e], sl(m.gate_up_proj_scale, e), 2 * m.width)
            g, u = h.chunk(2, dim=-1)
            outs.append(packed_matmul(swiglu(g, u, m.limit), m.fmt, m.down_proj[e], sl(m.down_proj_scale, e), m.hidden))
    return torch.cat(outs) if outs else xs.new_zeros(0, m.hidden)
