"""LoRA adapters as layer kinds that wrap a frozen base from outside the model's math (LoRA: Hu et al. 2021; QLoRA
when the base is packed: Dettmers et al. 2023).

Legend: n adapters in a bank, r rank, K in features, N out features, E experts, B batch rows, M rows sorted by
expert, H heads, R `kv_lora_rank`.

A wrapped layer computes base(x) + scale * (x A^T) B^T and never forms B A: the base stays in whatever format it was
loaded in (float, or packed: `qiusuo.quant.modules`) and gets no gradient, so training copies nothing of it.
- `LoraLinear` wraps an `nn.Linear` or a `QuantLinear` (attention projections, dense and shared MLPs).
- `LoraLatent` wraps MLA's `kv_b_proj` (`LatentProjection`), inside the absorbed decoding path too, where the base
  matrix is folded into the queries and the outputs: the adapter's term folds the same way, (q B_k) A and
  (o A^T) B_v^T, exactly, so decoding never forms W + s B A either.
- `LoraExperts` wraps a routed-expert bank (`Experts` or `QuantExperts`) with one adapter per expert, stored as 3D
  tensors A (E, r, K) and B (E, N, r), applied to the rows already sorted by expert, between the base's own
  grouped `gate_up` and `down`: the grouped path stays grouped, and without an adapter a packed decoding step is
  still its two kernel calls.

Banks: a layer holds n adapters at once, A (n, ...) and B (n, ...), ranks zero-padded to the largest (exact: a padded
direction adds zero), a scale per adapter (alpha / r; alpha / sqrt(r) with rsLoRA). Training holds one (n = 1).
Serving stacks every adapter it serves and each batch row picks its own (`rows`): the rows' A and B are gathered and
the rows run as one batched matmul (punica's BGMV, as S-LoRA batches), so requests for different adapters share a
batch. Expert rows are gathered the same way when few (decoding); with many (prefill), each adapter present runs
over its own rows in the sorted loop instead of copying A and B per row.

Which adapter each row uses is set for one forward by `adapter_rows`, as peft passes `adapter_names` to its layers
(hooks around one forward): threading an argument through every layer's signature would put adapters into the
model's math. Outside it, `rows` is None: adapter 0 for every row, what training and a single adapter want.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from qiusuo.model.moe import Experts, dispatch, swiglu

GATHER_ROWS = 64  # sorted expert rows up to which each row's A and B are gathered (a decoding step)

Rows = torch.Tensor | int | None  # (B,) adapter per batch row (-1: none); an int for every row; None: adapter 0


def _device(module: nn.Module) -> torch.device:
    """Where a base layer lives (packed layers hold only buffers)."""
    return next(iter([*module.parameters(), *module.buffers()])).device


class LoraLayer(nn.Module):
    """What the kinds share: the wrapped `base_layer` (frozen), dropout on the adapter's input, the row selection,
    and the bank: `pairs` names each (A, B, scale) the layer adds to a matmul."""

    PAIRS: tuple[str, ...] = ("lora",)

    def __init__(self, base: nn.Module, dropout: float):
        super().__init__()
        self.base_layer = base
        self.dropout = dropout
        self.rows: Rows = None

    def pairs(self) -> list[tuple[str, nn.Parameter, nn.Parameter, torch.Tensor]]:
        """(name, A (n, [E,] r, K), B (n, [E,] N, r), scale (n,)) for each matmul this layer adapts."""
        return [(p, getattr(self, f"{p}_A"), getattr(self, f"{p}_B"), getattr(self, f"{p}_scale")) for p in self.PAIRS]

    @property
    def num_adapters(self) -> int:
        return self.pairs()[0][1].shape[0]

    def _register(self, name: str, n: int, lead: tuple[int, ...], r: int, K: int, N: int, device) -> None:
        self.register_parameter(f"{name}_A", nn.Parameter(torch.zeros(n, *lead, r, K, device=device)))
        self.register_parameter(f"{name}_B", nn.Parameter(torch.zeros(n, *lead, N, r, device=device)))
        self.register_buffer(f"{name}_scale", torch.zeros(n, device=device), persistent=False)

    def _drop(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x

    def _per_row(self, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor, n_rows: int):
        """Each batch row's (A (B, ..), B (B, ..), scale (B,)) under `rows`; None when no row has an adapter."""
        rows = self.rows
        if isinstance(rows, torch.Tensor):
            idx = rows.clamp(min=0)
            return A[idx], B[idx], scale[idx] * (rows >= 0)
        i = rows or 0
        if i < 0:
            return None
        return A[i].expand(n_rows, *A.shape[1:]), B[i].expand(n_rows, *B.shape[1:]), scale[i].expand(n_rows)

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{p}: r={A.shape[-2]}" for p, A, _, _ in self.pairs())
        return f"adapters={self.num_adapters}, {ranks}, dropout={self.dropout}"


class LoraLinear(LoraLayer):
    """base(x) + scale * (x A^T) B^T over a linear layer (`nn.Linear` or `QuantLinear`): x (B, ..., K) -> (B, ..., N)."""

    def __init__(self, base: nn.Module, n: int, r: int, dropout: float = 0.0):
        super().__init__(base, dropout)
        self._register("lora", n, (), r, base.in_features, base.out_features, _device(base))

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        d = self.delta(x)
        return y if d is None else y + d.to(y.dtype)

    def delta(self, x: torch.Tensor) -> torch.Tensor | None:
        """The adapters' term alone (B, ..., N), None when no row has one."""
        rows = self.rows
        if isinstance(rows, int) and rows < 0:
            return None
        x = self._drop(x)
        if not isinstance(rows, torch.Tensor):  # one adapter for every row: two plain matmuls
            i = rows or 0
            return F.linear(F.linear(x, self.lora_A[i].to(x.dtype)), self.lora_B[i].to(x.dtype)) * self.lora_scale[i]
        A, B, s = self._per_row(self.lora_A, self.lora_B, self.lora_scale, x.shape[0])
        xf = x.reshape(x.shape[0], -1, x.shape[-1])  # (B, L, K)
        y = torch.bmm(torch.bmm(xf, A.transpose(1, 2).to(x.dtype)), B.transpose(1, 2).to(x.dtype))  # (B, L, N)
        return (y * s[:, None, None].to(y.dtype)).view(*x.shape[:-1], -1)


class LoraLatent(LoraLinear):
    """`LoraLinear` over MLA's `kv_b_proj`, with the base's absorbed forms (`LatentProjection`): W' = W + s B A
    splits into its key half B_k A and value half B_v A like W, so q W'_k = q W_k + s (q B_k) A and
    o W'_v^T = o W_v^T + s (o A^T) B_v^T, per head, per row."""

    def _halves(self, n_rows: int):
        sel = self._per_row(self.lora_A, self.lora_B, self.lora_scale, n_rows)
        if sel is None:
            return None
        A, B, s = sel  # (B, r, R), (B, H * (N + V), r), (B,)
        base = self.base_layer
        Bh = B.view(n_rows, base.H, base.N + base.V, -1)  # (B, H, N + V, r)
        return A, Bh[:, :, : base.N], Bh[:, :, base.N:], s

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope (B, T, H, N) -> (B, H, T, R)."""
        out = self.base_layer.absorb_query(q_nope)
        halves = self._halves(q_nope.shape[0])
        if halves is None:
            return out
        A, B_k, _, s = halves
        t = torch.einsum("bthn,bhnr->bhtr", q_nope, B_k.to(q_nope.dtype))
        d = torch.einsum("bhtr,brk->bhtk", t, A.to(t.dtype)) * s[:, None, None, None].to(t.dtype)
        return out + d.to(out.dtype)

    def absorb_values(self, o_lat: torch.Tensor) -> torch.Tensor:
        """o_lat (B, H, T, R) -> (B, T, H, V)."""
        out = self.base_layer.absorb_values(o_lat)
        halves = self._halves(o_lat.shape[0])
        if halves is None:
            return out
        A, _, B_v, s = halves
        t = torch.einsum("bhtk,brk->bhtr", o_lat, A.to(o_lat.dtype))
        d = torch.einsum("bhtr,bhvr->bthv", t, B_v.to(t.dtype)) * s[:, None, None, None].to(t.dtype)
        return out + d.to(out.dtype)


def expert_dims(bank: nn.Module) -> tuple[int, int, int]:
    """(E, D, I) of an `Experts` bank or a packed one (`QuantExperts`, whose codes' shapes are not the matrices')."""
    if isinstance(bank, Experts) and isinstance(bank.gate_up_proj, nn.Parameter):
        E, two_i, D = bank.gate_up_proj.shape
        return E, D, two_i // 2
    if isinstance(bank, Experts):
        return bank.num_experts, bank.hidden, bank.width
    raise TypeError(f"adapters wrap Experts or QuantExperts banks, not {type(bank).__name__}")


class LoraExperts(LoraLayer):
    """A routed-expert bank with one adapter per expert on each of its matmuls: `gate_up` A (n, E, r, D), B (n, E,
    2I, r) and `down` A (n, E, r', I), B (n, E, D, r'). Same interface as the bank: forward(x (N, D), weights (N, K),
    idx (N, K)) -> (N, D), through the one token `dispatch`."""

    PAIRS = ("gate_up", "down")

    def __init__(self, base: nn.Module, n: int, r_gate_up: int, r_down: int, dropout: float = 0.0):
        super().__init__(base, dropout)
        E, D, I = expert_dims(base)
        self._register("gate_up", n, (E,), r_gate_up, D, 2 * I, _device(base))
        self._register("down", n, (E,), r_down, I, D, _device(base))

    @property
    def num_experts(self) -> int:
        return self.base_layer.num_experts

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        N, K = idx.shape
        rows = self.rows
        if isinstance(rows, torch.Tensor):  # the adapter of each (token, expert) slot, in dispatch's sorted order
            token_rows = rows.repeat_interleave(N // rows.shape[0])  # (N,) tokens are rows x positions
            order = idx.flatten().argsort(stable=True)  # the same permutation `dispatch` makes
            rows = token_rows.index_select(0, order // K)  # (N*K,)
        return dispatch(x, weights, idx, self.num_experts, lambda xs, counts: self.grouped(xs, counts, rows))

    def grouped(self, xs: torch.Tensor, counts: torch.Tensor, rows: Rows = None) -> torch.Tensor:
        """xs (M, D) sorted by expert -> (M, D): the base's gate_up, plus the adapter's; SwiGLU; the base's down,
        plus the adapter's. `rows`: each sorted row's adapter (M,), or one for all."""
        base = self.base_layer
        h = base.gate_up(xs, counts)  # (M, 2I)
        d = self._delta(xs, counts, self.gate_up_A, self.gate_up_B, self.gate_up_scale, rows)
        if d is not None:
            h = h + d.to(h.dtype)
        g, u = h.chunk(2, dim=-1)
        a = swiglu(g, u, base.limit)  # (M, I)
        y = base.down(a, counts)
        d = self._delta(a, counts, self.down_A, self.down_B, self.down_scale, rows)
        if d is not None:
            y = y + d.to(y.dtype)
        return y.to(xs.dtype)

    def _delta(self, x: torch.Tensor, counts: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: torch.Tensor,
               rows: Rows) -> torch.Tensor | None:
        """x (M, K) sorted by expert -> each row's scale * (x A[a, e]^T) B[a, e]^T (M, N), a its adapter, e its
        expert; None when no row has an adapter."""
        if isinstance(rows, int) and rows < 0:
            return None
        x = self._drop(x)
        M, E = x.shape[0], counts.shape[0]
        per_row = isinstance(rows, torch.Tensor)
        if M <= GATHER_ROWS:  # decoding: gather each row's matrices, one batched matmul
            expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=M)  # (M,)
            a = rows.clamp(min=0) if per_row else torch.full_like(expert, rows or 0)
            t = torch.bmm(A[a, expert].to(x.dtype), x[:, :, None])  # (M, r, 1)
            y = torch.bmm(B[a, expert].to(x.dtype), t)[:, :, 0]  # (M, N)
            s = scale[a] * (rows >= 0) if per_row else scale[a]
            return y * s[:, None].to(y.dtype)
        if not per_row:
            i = rows or 0
            return _lowrank_loop(x, counts, A[i], B[i]) * scale[i]
        out = x.new_zeros(M, B.shape[-2])
        expert = torch.repeat_interleave(torch.arange(E, device=x.device), counts, output_size=M)
        for a in rows.unique().tolist():  # the batch's adapters one after another, each over its own rows
            if a >= 0:
                sel = (rows == a).nonzero(as_tuple=True)[0]  # increasing: still sorted by expert
                sub = torch.bincount(expert.index_select(0, sel), minlength=E)
                out.index_copy_(0, sel, _lowrank_loop(x.index_select(0, sel), sub, A[a], B[a]) * scale[a])
        return out


@torch.compiler.disable
def _lowrank_loop(x: torch.Tensor, counts: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """x (M, K) sorted by expert, A (E, r, K), B (E, N, r) -> (x A[e]^T) B[e]^T per row (M, N), one expert with rows
    at a time (unbind, so autograd builds no full-size gradient per expert)."""
    counts = counts.tolist()
    outs = [F.linear(F.linear(x_e, a_e.to(x.dtype)), b_e.to(x.dtype))
            for x_e, a_e, b_e, c in zip(x.split(counts), A.unbind(0), B.unbind(0), counts) if c]
    return torch.cat(outs) if outs else x.new_zeros(0, B.shape[-2])


@torch.no_grad()
def init_adapter(layer: LoraLayer, index: int, generator: torch.Generator | None = None) -> None:
    """A fresh adapter at `index`: A as `nn.Linear` initialises its weight (Kaiming-uniform, a = sqrt(5): peft's
    default), B zero, so the wrapped layer starts exactly as its base."""
    for _, A, B, _ in layer.pairs():
        bound = 1 / math.sqrt(A.shape[-1])  # kaiming_uniform_(a=sqrt(5)) on a (r, K) matrix
        A[index].copy_(torch.rand(A[index].shape, generator=generator) * 2 * bound - bound)
        B[index].zero_()


def lora_layers(model: nn.Module) -> list[LoraLayer]:
    """The adapter layers of `model`, in module order."""
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adapter_rows(layers: list[LoraLayer], rows: Rows) -> Iterator[None]:
    """For the forwards inside: batch row b runs adapter `rows[b]` (-1: the base alone); an int: every row that
    adapter (-1: the base model); None: adapter 0."""
    for m in layers:
        m.rows = rows
    try:
        yield
    finally:
        for m in layers:
            m.rows = None
