"""MLA's `kv_b_proj` kept packed, laid out for the absorbed decoding path.

Decoding never expands latents: it folds the key half of `kv_b_proj` into each head's query and the value half into
each head's output (`LatentProjection.absorb_query` / `absorb_values`). Those are per-head matrix-vector products
over the whole matrix, every step: in float it is the largest weight an int4 model still reads in float (a V3
layer's 32768 x 512 is 64 MiB in float32, more than its int4 o_proj). Packed, each head's half is one matrix of a
bank, and a step is one call of the experts' grouped kernel with one "expert" per head:
- `uk` (H, R, N): head h's key half W_uk[h] (N, R) transposed, so q_lat[h] = q_nope[h] W_uk[h] = q_nope[h] uk[h]^T
  is the kernels' y = x W^T with K = N;
- `uv` (H, V, R): head h's value half as stored, out[h] = o_lat[h] uv[h]^T with K = R.
The expanded path (prefill, V3.2's indexer keys) dequantises a band of heads at a time into the stored layout and
multiplies with torch's GEMM, as `QuantLinear` does above its decoding rows.

Not a loading format: checkpoints store `kv_b_proj` as (H * (N + V), R), and the loader fills the float layer it
names; `pack_latents` (`qiusuo.quant.apply`) packs it afterwards, one layer at a time. Its state dict is the float
`weight` in the stored layout (dequantised), so saving a packed model writes what every reader of `kv_b_proj`
expects.
"""

from __future__ import annotations

import torch
from torch import nn

from qiusuo.model.mla import LatentProjection
from qiusuo.quant import kernels
from qiusuo.quant.formats import Format
from qiusuo.quant.modules import DECODE_ROWS, _register, fill_rows, grouped_kernel

HEAD_BAND = 16  # heads dequantised at a time on the expanded path (16 x (N + V) x R floats of scratch)


class QuantLatent(LatentProjection):
    """`kv_b_proj` (R -> H * (N + V)) as two packed banks, `uk` (H, R, N) and `uv` (H, V, R) (module docstring)."""

    def __init__(self, R: int, H: int, N: int, V: int, fmt: Format, device=None):
        nn.Module.__init__(self)
        if N % kernels.Q8_BLOCK or R % kernels.Q8_BLOCK:
            raise ValueError(f"a packed kv_b_proj needs qk_nope_head_dim ({N}) and kv_lora_rank ({R}) to be multiples "
                             f"of {kernels.Q8_BLOCK} (the kernels' inputs per step); keep it in float")
        fmt.check(R, N, "MLA's kv_b_proj key half (per head, transposed: K = qk_nope_head_dim)")
        fmt.check(V, R, "MLA's kv_b_proj value half (per head: K = kv_lora_rank)")
        self.in_features, self.out_features = R, H * (N + V)
        self.R, self.H, self.N, self.V, self.fmt = R, H, N, V, fmt
        self.act = kernels.default_act(fmt.name, fmt.group)
        self.kernel_rows = DECODE_ROWS  # rows per head up to which the absorbed products run through the kernels
        self._bound = {}
        _register(self, "uk", fmt, R, N, (H,), device)
        _register(self, "uv", fmt, V, R, (H,), device)

    @classmethod
    @torch.no_grad()
    def from_projection(cls, proj: LatentProjection, fmt: Format) -> "QuantLatent":
        m = cls(proj.in_features, proj.H, proj.N, proj.V, fmt, device=proj.weight.device)
        m.fill(proj.weight)
        return m

    @torch.no_grad()
    def fill(self, w: torch.Tensor) -> None:
        """Quantise the float weight w (H * (N + V), R) in the stored layout, head by head."""
        w = w.view(self.H, self.N + self.V, self.R)
        for h in range(self.H):
            fill_rows(self.fmt, self.uk[h], None if self.uk_scale is None else self.uk_scale[h], w[h, : self.N].t().contiguous())
            fill_rows(self.fmt, self.uv[h], None if self.uv_scale is None else self.uv_scale[h], w[h, self.N:])

    def _heads(self, h0: int, h1: int) -> torch.Tensor:
        """Heads h0..h1 dequantised in the stored layout: ((h1 - h0) * (N + V), R) float32."""
        f = self.fmt
        k = torch.stack([f.dequantize(self.uk[h], None if self.uk_scale is None else self.uk_scale[h]).t()
                         for h in range(h0, h1)])  # (h, N, R)
        v = torch.stack([f.dequantize(self.uv[h], None if self.uv_scale is None else self.uv_scale[h])
                         for h in range(h0, h1)])  # (h, V, R)
        return torch.cat([k, v], dim=1).reshape(-1, self.R)

    def dequantized(self) -> torch.Tensor:
        """The float32 weight (H * (N + V), R): the slow reference."""
        return self._heads(0, self.H)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantised float32 weight (a copy: what a reader of `kv_b_proj.weight` outside the model's math
        gets, e.g. a LoRA merge)."""
        return self.dequantized()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.dequantized()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight" in state_dict:
            self.fill(state_dict[prefix + "weight"].float())
        elif strict:
            missing_keys.append(prefix + "weight")

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        """Latents c (..., R) -> every head's key part and value (..., H * (N + V)), HEAD_BAND heads at a time."""
        w = self.N + self.V
        out = c.new_empty(*c.shape[:-1], self.out_features)
        for h0 in range(0, self.H, HEAD_BAND):
            h1 = min(self.H, h0 + HEAD_BAND)
            out[..., h0 * w: h1 * w] = c @ self._heads(h0, h1).t().to(c.dtype)
        return out

    def _per_head(self, x: torch.Tensor, name: str) -> torch.Tensor:
        """x (H, M, K) -> (H, M, out) through bank `name`: the grouped kernel with one expert per head for few rows,
        dequantised heads and a batched matmul for many."""
        H, M, _ = x.shape
        if M <= self.kernel_rows and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled()):
            q, scale = getattr(self, name), getattr(self, f"{name}_scale")
            counts = torch.full((H,), M, dtype=torch.int64)
            xf = x.reshape(H * M, -1).float().contiguous()
            y = grouped_kernel(self._bound, name, self.fmt, q, scale, self.act)(xf, counts)
            return y.view(H, M, -1).to(x.dtype)
        f, q, scale = self.fmt, getattr(self, name), getattr(self, f"{name}_scale")
        w = torch.stack([f.dequantize(q[h], None if scale is None else scale[h]) for h in range(H)])  # (H, out, K)
        return torch.bmm(x, w.transpose(1, 2).to(x.dtype))

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope (B, T, H, N) -> the queries in latent space (B, H, T, R)."""
        B, T, H, N = q_nope.shape
        q_lat = self._per_head(q_nope.permute(2, 0, 1, 3).reshape(H, B * T, N), "uk")  # (H, B*T, R)
        return q_lat.view(H, B, T, -1).transpose(0, 1)

    def absorb_values(self, o_lat: torch.Tensor) -> torch.Tensor:
        """Attention outputs in latent space o_lat (B, H, T, R) -> per-head values (B, T, H, V)."""
        B, H, T, R = o_lat.shape
        out = self._per_head(o_lat.transpose(0, 1).reshape(H, B * T, R), "uv")  # (H, B*T, V)
        return out.view(H, B, T, self.V).permute(1, 2, 0, 3)

    def extra_repr(self) -> str:
        return f"R={self.R}, heads={self.H}, N={self.N}, V={self.V}, fmt={self.fmt}, act={self.act}"
