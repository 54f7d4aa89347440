"""DeepSeek-V3.2's sparse attention (DSA): MLA that reads only the top-k tokens a lightning indexer picks.

Legend: B batch, T new tokens, S cached + new tokens, Hi indexer heads, Dk `index_head_dim`, P
`qk_rope_head_dim`, C the MLA latent (kv_lora_rank + P).

The indexer (transformers' `DeepseekV32Indexer`, DeepSeek's V3.2 `Indexer`): queries from the attention's query
latent (`wq_b`), one key per token (`wk`, then a LayerNorm), rotary on the FIRST P dims with the half-split
(non-interleaved) layout, unlike MLA's interleaved one (DeepSeek fixed exactly this in its V3.2 inference code in
November 2025); score(t, s) = sum_h w_{t,h} ReLU(q_{t,h} . k_s) / sqrt(Dk), w from `weights_proj` / sqrt(Hi);
DeepSeek's Hadamard rotation of q and k (before FP8 quantisation) cancels in that dot product and is skipped, as
transformers does. Each query keeps its `index_topk` best visible tokens (ties to the lower index: the
`topk_lowest_index` rule V4's indexer uses, on every path), and MLA's expanded or absorbed attention runs under
that mask; a decoding step (one query per row) gathers the k chosen latents and attends to those alone, so it
reads k latents instead of the whole context (plus the S indexer keys it scores). With `index_topk` >= the
context the selection is every visible token: dense MLA exactly.

The cache is the `sparse_latent` kind (`qiusuo.cache.sparse`): per token the latent (C) and the indexer key (Dk) in
two tensors, and the layer cache hands back a `SparseContext` whose latents are read on demand. A decoding step
reads the S keys (Dk values each), picks k, and only then reads k latents: in the paged engine the first version
(one C + Dk tensor) gathered all S latents before selecting, 32% of a V3.2 step at 32k context. Prefill and
verification (T > 1) still read every latent: each query keeps its own k and they differ.

GLM-5 (`glm_moe_dsa`) is this attention with two config values (transformers' `modeling_glm_moe_dsa.py`): its indexer
rotates interleaved pairs (`index_rope_interleave`), and layers marked "shared" in `indexer_types` have no indexer and
reuse the top-k of the full layer before them (`SharedSparseMLA`). The selection travels to the next layer in the
forward's `RopeAt.shared` (created per forward and passed to every layer, never stored on a module): the full layer
writes it, the shared layers after it read it. A shared layer caches its latents alone (`sparse_latent` with no key).

Training, as the V3.2 report does: the indexer reads detached inputs and learns from its own loss (`indexer_loss`,
KL to the main attention's distribution); first a dense warm-up (`dense_warmup`: attention over every visible
token, the KL over all of them; `qiusuo train --train.indexer_warmup_steps=N`), then the sparse stage (attention
over the top-k, the KL over the chosen ones).
"""

from __future__ import annotations

import torch
from torch import nn

from qiusuo.config import ModelConfig
from qiusuo.cache.sparse import SparseContext
from qiusuo.cache.spec import LayerCacheSpec
from qiusuo.model.compressor import index_scores, indexer_loss, topk_lowest_index
from qiusuo.model.mla import MLA
from qiusuo.model.rope import apply_rotary


class DSAIndexer(nn.Module):
    """transformers' names: `indexer.{wq_b, wk, k_norm, weights_proj}`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.dim, self.topk, self.P = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, cfg.qk_rope_head_dim
        self.interleave = cfg.index_rope_interleave  # GLM-5: interleaved pairs; DeepSeek-V3.2: halves
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.heads * self.dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.dim, bias=False)
        self.k_norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.heads, bias=False)

    def rotate(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary on the first P dims of t (B, T, H, Dk): half-split (V3.2) or interleaved pairs (GLM-5)."""
        return torch.cat([apply_rotary(t[..., : self.P], cos, sin, self.interleave), t[..., self.P:]], dim=-1)

    def key(self, x: torch.Tensor, rope) -> torch.Tensor:
        """x (B, T, D) -> the indexer keys (B, T, Dk) the cache keeps."""
        return self.rotate(self.k_norm(self.wk(x))[:, :, None], *rope["main"])[:, :, 0]

    def scores(self, x: torch.Tensor, q_lat: torch.Tensor, keys: torch.Tensor, rope) -> torch.Tensor:
        """(B, T, S) fp32 index scores of the T queries against S keys (`compressor.index_scores`, V4's formula)."""
        B, T, _ = x.shape
        q = self.rotate(self.wq_b(q_lat).view(B, T, self.heads, self.dim), *rope["main"])
        return index_scores(q, self.weights_proj(x), keys)


TOPK = "dsa_topk"  # the key of the last full layer's selection in `RopeAt.shared`


def _visible(mask, causal: bool, B: int, T: int, S: int, device) -> torch.Tensor:
    """(B, T, S) bool: which of the S context tokens each query may see (the cache's mask, causal, or all)."""
    if mask is not None:
        return mask[:, 0].expand(B, T, S)
    if causal:
        return torch.ones(T, S, dtype=torch.bool, device=device).tril(S - T)[None].expand(B, T, S)
    return torch.ones(B, T, S, dtype=torch.bool, device=device)


def topk_mask_lowest_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(..., S) bool: True at the k entries `topk_lowest_index` picks (ties at the k-th score to the lower
    index), without its int64 keys: the k-th largest score, everything above it, then the first ties at it
    (a running count). What prefill needs (a mask, not indices): 2x faster at (2,048, 8,192), k = 256 here."""
    kth = scores.topk(k, dim=-1, sorted=False).values.amin(-1, keepdim=True)  # (..., 1)
    above = scores > kth
    tie = scores == kth
    need = k - above.sum(-1, keepdim=True, dtype=torch.int32)
    return above | (tie & (tie.cumsum(-1, dtype=torch.int32) <= need))


class SparseMLA(MLA):
    """MLA under the indexer's top-k selection (the `dsa` attention kind)."""

    @staticmethod
    def cache_spec(cfg: ModelConfig) -> LayerCacheSpec:
        """The `sparse_latent` kind: C latent values and an index_head_dim indexer key per token, kept apart."""
        return LayerCacheSpec("sparse_latent", cfg.latent_dim + cfg.index_head_dim, key_width=cfg.index_head_dim,
                              rotary=cfg.qk_rope_head_dim)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        if cfg.q_lora_rank is None:
            raise ValueError("DeepSeek-V3.2's indexer reads the query latent: set q_lora_rank")
        self.indexer = DSAIndexer(cfg)
        self.dense_warmup = False  # the trainer turns it on for `train.indexer_warmup_steps` (dense stage)

    def stored(self, latent: torch.Tensor, x: torch.Tensor, rope) -> SparseContext:
        return SparseContext(latent, self.indexer.key(x, rope).to(latent.dtype))  # (B, T, C), (B, T, Dk)

    def select(self, stored: SparseContext, mask, causal, x, q_lat, rope):
        """Each query's top-k visible tokens as the attention mask (B, 1, T, S); decoding: the k latents alone.
        The selection is left in `rope.shared` for the "shared" layers after this one (GLM-5)."""
        B, T, _ = x.shape
        keys = stored.keys  # (B, S, Dk)
        S = keys.shape[1]
        visible = _visible(mask, causal, B, T, S, x.device)
        score = self.indexer.scores(x.detach(), q_lat.detach(), keys, rope).masked_fill(~visible, float("-inf"))
        if self.dense_warmup:  # the report's warm-up: dense attention, the indexer learns to mimic all of it
            rope.shared[TOPK] = (None, visible)
            return stored.latents(), visible[:, None], False, (score, visible)
        k = min(self.indexer.topk, S)
        if T == 1 and not torch.is_grad_enabled():  # decoding: read only the k chosen latents, not all under a mask
            idx = topk_lowest_index(score, k)  # (B, 1, k)
            # k > visible tokens (short or padded contexts) picks -inf scores too: masked out again here
            keep = visible.gather(-1, idx)  # (B, 1, k)
            rope.shared[TOPK] = (idx, keep)
            return stored.latents(idx[:, 0]), keep[:, None], False, None  # (B, k, C), (B, 1, 1, k)
        keep = topk_mask_lowest_index(score, k) & visible  # (B, T, S)
        rope.shared[TOPK] = (None, keep)
        return stored.latents(), keep[:, None], False, (score, keep)

    def aux_loss(self, q_nope, q_pe, latent, chosen) -> torch.Tensor | None:
        """With gradients on, `indexer_loss` against the main attention's probabilities of the chosen tokens
        (recomputed here in fp32 from the expanded keys: SDPA does not return them)."""
        if chosen is None or not torch.is_grad_enabled():
            return None
        score, keep = chosen  # (B, T, S)
        with torch.no_grad():
            B, S = latent.shape[0], latent.shape[1]
            c_kv, k_pe = latent.split([self.R, self.P], dim=-1)
            k_nope = self.kv_b_proj(c_kv.to(q_nope.dtype)).view(B, S, self.H, self.N + self.V)[..., : self.N]
            logits = (torch.einsum("bthn,bshn->bhts", q_nope.float(), k_nope.float())
                      + torch.einsum("bthp,bsp->bhts", q_pe.float(), k_pe.float())) * self.scale
            probs = logits.masked_fill(~keep[:, None], float("-inf")).softmax(-1).nan_to_num(0.0).sum(1)
        return indexer_loss(score, keep, probs)


class SharedSparseMLA(SparseMLA):
    """GLM-5's "shared" indexer layer (the `dsa_shared` attention kind): MLA under the top-k of the last full layer
    of the same forward (`rope.shared`), with no indexer of its own; it caches its latents only."""

    @staticmethod
    def cache_spec(cfg: ModelConfig) -> LayerCacheSpec:
        return LayerCacheSpec("sparse_latent", cfg.latent_dim, key_width=0, rotary=cfg.qk_rope_head_dim)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        MLA.__init__(self, cfg, layer_idx)
        if cfg.q_lora_rank is None:
            raise ValueError("DeepSeek-V3.2's attention reads a query latent: set q_lora_rank")
        self.indexer = None
        self.dense_warmup = False

    def stored(self, latent: torch.Tensor, x: torch.Tensor, rope) -> SparseContext:
        return SparseContext(latent, latent.new_empty(*latent.shape[:2], 0))  # (B, T, C), no indexer key

    def select(self, stored: SparseContext, mask, causal, x, q_lat, rope):
        if TOPK not in rope.shared:
            raise ValueError(f"layer {self.layer_idx} reuses the previous layer's top-k (indexer_types 'shared') but "
                             f"no full indexer layer ran before it in this forward")
        idx, keep = rope.shared[TOPK]
        if idx is not None:  # decoding: the same k positions of this layer's own latents
            return stored.latents(idx[:, 0]), keep[:, None], False, None
        return stored.latents(), keep[:, None], False, None

    def aux_loss(self, q_nope, q_pe, latent, chosen) -> torch.Tensor | None:
        return None
