"""Multi-head Latent Attention (DeepSeek-V2 section 2.1).

Legend: B batch, T new tokens, S attended tokens (cache + new), H heads, R `kv_lora_rank`, P `qk_rope_head_dim`,
N `qk_nope_head_dim`, V `v_head_dim`, C = R + P (latent width cached per token).

Two mathematically equal paths:
- expanded (training, prefill): `kv_b_proj` expands the latents of all S tokens into per-head keys and values, then
  ordinary SDPA with a (N + P)-dim query and a V-dim value.
- absorbed (decoding): the key half of `kv_b_proj` is folded into the query and the value half into the output, so
  attention runs straight over the cached latents. That is multi-query attention with one shared "head" of width C
  (values: the first R dims); all H x T query rows attend to it in one SDPA call. Per step it reads S*C cached values instead of
  expanding S*H*(N+V): for the bench config at S=192 that is 80x less work in the attention's inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qiusuo.config import ModelConfig
from qiusuo.cache.spec import LayerCacheSpec
from qiusuo.model.rope import RMSNorm, apply_rotary


class LatentProjection(nn.Linear):
    """`kv_b_proj`: the latent (R) -> every head's key part and value (H * (N + V)). Its three uses are methods, so
    a kind that wraps it from outside (an adapter, `qiusuo.lora.layers.LoraLatent`) covers all of them: `forward`
    expands latents (the expanded path); `absorb_query` folds the key half into queries and `absorb_values` the
    value half into attention outputs (the absorbed path)."""

    def __init__(self, R: int, H: int, N: int, V: int):
        super().__init__(R, H * (N + V), bias=False)
        self.H, self.N, self.V = H, N, V

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope (B, T, H, N) -> the queries in latent space (B, H, T, R)."""
        B, T, H, N = q_nope.shape
        w_uk = self.weight.view(H, N + self.V, -1)[:, :N]  # (H, N, R)
        # heads lead so the weights multiply as they are: matmul against (H, N, R) would broadcast (copy) them B times
        q_lat = torch.bmm(q_nope.permute(2, 0, 1, 3).reshape(H, B * T, N), w_uk.to(q_nope.dtype))  # (H, B*T, R)
        return q_lat.view(H, B, T, -1).transpose(0, 1)

    def absorb_values(self, o_lat: torch.Tensor) -> torch.Tensor:
        """Attention outputs in latent space o_lat (B, H, T, R) -> per-head values (B, T, H, V)."""
        B, H, T, R = o_lat.shape
        w_uv = self.weight.view(H, self.N + self.V, R)[:, self.N:]  # (H, V, R)
        out = torch.bmm(o_lat.transpose(0, 1).reshape(H, B * T, R), w_uv.transpose(1, 2).to(o_lat.dtype))  # (H, B*T, V)
        return out.view(H, B, T, self.V).permute(1, 2, 0, 3)


class MLA(nn.Module):
    @staticmethod
    def cache_spec(cfg: ModelConfig) -> LayerCacheSpec:
        """MLA caches the latent: kv_lora_rank + qk_rope_head_dim values per token (the `latent` kind), the
        last qk_rope_head_dim rotated (kept in bf16 under an FP8 cache)."""
        return LayerCacheSpec("latent", cfg.latent_dim, rotary=cfg.qk_rope_head_dim)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.H, self.N, self.P, self.V, self.R = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                                  cfg.v_head_dim, cfg.kv_lora_rank)
        self.interleave = cfg.rope_interleave
        self.scale = cfg.softmax_scale
        D, H, qk = cfg.hidden_size, cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=cfg.attention_bias)
            # the latents' norms take RMSNorm's default eps, 1e-6, whatever `rms_norm_eps` says: so do DeepSeek's
            # inference code (`RMSNorm(self.q_lora_rank)`) and transformers' V2/V3 and their families; a checkpoint
            # with rms_norm_eps 1e-5 (Moonlight, Kimi-K2.5, GLM) was ~1e-4 off in the logits with the model's eps
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.R + self.P, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.R)  # eps 1e-6, as q_a_layernorm
        self.kv_b_proj = LatentProjection(self.R, H, self.N, self.V)
        self.o_proj = nn.Linear(H * self.V, D, bias=cfg.attention_bias)

    def forward(self, x: torch.Tensor, rope, cache=None,
                absorb: bool = False, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, None]:
        """x (B, T, D) -> (B, T, D); `rope`: the forward's `RopeAt` (MLA reads its "main" tables).
        `cache`: the cache protocol of `qiusuo.cache.spec` (this layer writes its latents there and
        attends to what it returns). `mask` (B, 1, T, T) without a cache: who may attend to whom (packed
        documents); None: causal."""
        B, T, _ = x.shape
        H, N, P, R = self.H, self.N, self.P, self.R
        cos, sin = rope["main"]
        q_lat = None if hasattr(self, "q_proj") else self.q_a_layernorm(self.q_a_proj(x))  # (B, T, q_lora_rank)
        q = (self.q_proj(x) if q_lat is None else self.q_b_proj(q_lat)).view(B, T, H, N + P)
        q_nope, q_pe = q.split([N, P], dim=-1)  # (B, T, H, N), (B, T, H, P)
        q_pe = apply_rotary(q_pe, cos, sin, self.interleave)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([R, P], dim=-1)  # (B, T, R), (B, T, P)
        k_pe = apply_rotary(k_pe[:, :, None, :], cos, sin, self.interleave)[:, :, 0]
        latent = self.stored(torch.cat([self.kv_a_layernorm(c_kv), k_pe], dim=-1), x, rope)  # (B, T, C [+ more])
        if cache is not None:
            latent, mask = cache.layer(self.layer_idx).update(latent)  # (B, S, ...), (B, 1, T, S) | None
        causal = cache is None and mask is None and T > 1
        latent, mask, causal, chosen = self.select(latent, mask, causal, x, q_lat, rope)  # (B, S, C)
        if absorb:
            out = self._absorbed(q_nope, q_pe, latent, mask, causal)
        else:
            out = self._expanded(q_nope, q_pe, latent, mask, causal)
        aux = self.aux_loss(q_nope, q_pe, latent, chosen)
        return self.o_proj(out.reshape(B, T, H * self.V)), aux

    def stored(self, latent: torch.Tensor, x: torch.Tensor, rope) -> torch.Tensor:
        """What this layer caches per token: the latent (V3.2's sparse kind appends its indexer key)."""
        return latent

    def select(self, stored, mask, causal, x, q_lat, rope):
        """(latent (B, S, C), mask, causal, what `aux_loss` needs) the attention reads: all of it (V3.2's sparse
        kind keeps the top-k)."""
        return stored, mask, causal, None

    def aux_loss(self, q_nope, q_pe, latent, chosen) -> torch.Tensor | None:
        """An auxiliary loss of this attention (V3.2's indexer objective); MLA has none."""
        return None

    def _expanded(self, q_nope, q_pe, latent, mask, causal) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        S = latent.shape[1]
        c_kv, k_pe = latent.split([self.R, self.P], dim=-1)
        kv = self.kv_b_proj(c_kv.to(q_nope.dtype)).view(B, S, H, self.N + self.V)
        k_nope, v = kv.split([self.N, self.V], dim=-1)  # (B, S, H, N), (B, S, H, V)
        k = torch.cat([k_nope, k_pe.to(k_nope.dtype)[:, :, None, :].expand(B, S, H, self.P)], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1)
        if self.V < self.N + self.P:
            # fused (flash) SDPA kernels want one head size for q, k and v; zero-padding v and slicing the output
            # is exact and was 1.5x faster per attention (fwd+bwd) than the unfused math path SDPA falls back to
            v = F.pad(v, (0, self.N + self.P - self.V))
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=causal, scale=self.scale)  # (B, H, T, N+P)
        return out.transpose(1, 2)[..., : self.V]

    def _absorbed(self, q_nope, q_pe, latent, mask, causal) -> torch.Tensor:
        B, T, H, _ = q_nope.shape
        S = latent.shape[1]
        q_lat = self.kv_b_proj.absorb_query(q_nope)  # (B, H, T, R)
        # every (head, token) pair is a query row of ONE shared key/value "head": no per-head copies of the cache
        q = torch.cat([q_lat, q_pe.transpose(1, 2)], dim=-1).reshape(B, H * T, self.R + self.P)
        kv = latent.to(q.dtype)  # (B, S, C)
        # plain bmm/softmax, not SDPA: values (R) are narrower than keys (C), which sends SDPA to its unfused math
        # path; that path scaled the whole (strided) cache every step: 1.5 ms of a 30 ms batch-32 decode step here
        scores = torch.bmm(q, kv.transpose(1, 2)).float() * self.scale  # (B, H*T, S)
        if causal:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
        if mask is not None:  # (B|1, 1, T, S) -> (B|1, H*T, S)
            scores = scores.view(B, H, T, S).masked_fill(~mask, float("-inf")).view(B, H * T, S)
        o_lat = torch.bmm(scores.softmax(-1).to(kv.dtype), kv[..., : self.R])  # (B, H*T, R)
        return self.kv_b_proj.absorb_values(o_lat.view(B, H, T, self.R))  # (B, T, H, V)
