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

The cache is MLA's `latent` kind with the indexer key appended (C + Dk values per token), so the contiguous cache,
the paged engine and its prefix sharing serve V3.2 unchanged. Training, as the V3.2 report does: the indexer reads
detached inputs and learns from its own loss (`indexer_loss`, KL to the main attention's distribution); first a
dense warm-up (`dense_warmup`: attention over every visible token, the KL over all of them; `qiusuo train
--train.indexer_warmup_steps=N`), then the sparse stage (attention over the top-k, the KL over the chosen ones).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qiusuo.config import ModelConfig
from qiusuo.model.cache import LayerCacheSpec
from qiusuo.model.compressor import indexer_loss, topk_lowest_index
from qiusuo.model.mla import MLA
from qiusuo.model.rope import apply_rotary


class DSAIndexer(nn.Module):
    """transformers' names: `indexer.{wq_b, wk, k_norm, weights_proj}`."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.dim, self.topk, self.P = cfg.index_n_heads, cfg.index_head_dim, cfg.index_topk, cfg.qk_rope_head_dim
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.heads * self.dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, self.dim, bias=False)
        self.k_norm = nn.LayerNorm(self.dim, eps=1e-6)
        self.weights_proj = nn.Linear(cfg.hidden_size, self.heads, bias=False)

    def rotate(self, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Half-split rotary on the first P dims of t (B, T, H, Dk)."""
        return torch.cat([apply_rotary(t[..., : self.P], cos, sin, False), t[..., self.P:]], dim=-1)

    def key(self, x: torch.Tensor, rope) -> torch.Tensor:
        """x (B, T, D) -> the indexer keys (B, T, Dk) the cache keeps."""
        return self.rotate(self.k_norm(self.wk(x))[:, :, None], *rope["main"])[:, :, 0]

    def scores(self, x: torch.Tensor, q_lat: torch.Tensor, keys: torch.Tensor, rope) -> torch.Tensor:
        """(B, T, S) fp32 index scores of the T queries against S keys."""
        B, T, _ = x.shape
        q = self.rotate(self.wq_b(q_lat).view(B, T, self.heads, self.dim), *rope["main"]).float()
        w = self.weights_proj(x).float() * (self.heads**-0.5 * self.dim**-0.5)  # (B, T, Hi)
        k = keys.float().transpose(1, 2)  # (B, Dk, S)
        if B * T * self.heads * k.shape[-1] <= 1 << 24:  # small (decoding): every head in one matmul
            s = F.relu(torch.bmm(q.reshape(B, T * self.heads, self.dim), k)).view(B, T, self.heads, -1)
            return (s * w[..., None]).sum(2)
        # head by head into one (B, T, S) sum: the (B, T, Hi, S) tensor of all heads' scores would be Hi times the
        # memory (2 GB for a 2,048-token prefill chunk over 32k cached tokens with 8 heads)
        out = torch.zeros(B, T, k.shape[-1], device=x.device)
        for h in range(self.heads):
            out.addcmul_(F.relu(torch.bmm(q[:, :, h], k)), w[:, :, h, None])
        return out


class SparseMLA(MLA):
    """MLA under the indexer's top-k selection (the `dsa` attention kind)."""

    @staticmethod
    def cache_spec(cfg: ModelConfig) -> LayerCacheSpec:
        """The `latent` kind, widened by the indexer key: C + index_head_dim values per token."""
        return LayerCacheSpec("latent", cfg.latent_dim + cfg.index_head_dim)

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        if cfg.q_lora_rank is None:
            raise ValueError("DeepSeek-V3.2's indexer reads the query latent: set q_lora_rank")
        self.indexer = DSAIndexer(cfg)
        self.dense_warmup = False  # the trainer turns it on for `train.indexer_warmup_steps` (dense stage)

    def stored(self, latent: torch.Tensor, x: torch.Tensor, rope) -> torch.Tensor:
        return torch.cat([latent, self.indexer.key(x, rope).to(latent.dtype)], dim=-1)  # (B, T, C + Dk)

    def select(self, stored, mask, causal, x, q_lat, rope):
        """Each query's top-k visible tokens as the attention mask (B, 1, T, S)."""
        B, T, _ = x.shape
        C = self.R + self.P
        latent, keys = stored[..., :C], stored[..., C:]
        S = latent.shape[1]
        if mask is not None:
            visible = mask[:, 0].expand(B, T, S)
        elif causal:
            visible = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(S - T)[None].expand(B, T, S)
        else:
            visible = torch.ones(B, T, S, dtype=torch.bool, device=x.device)
        score = self.indexer.scores(x.detach(), q_lat.detach(), keys, rope).masked_fill(~visible, float("-inf"))
        if self.dense_warmup:  # the report's warm-up: dense attention, the indexer learns to mimic all of it
            return latent, visible[:, None], False, (score, visible)
        idx = topk_lowest_index(score, min(self.indexer.topk, S))  # (B, T, k)
        if T == 1 and not torch.is_grad_enabled():  # decoding: read only the k chosen latents, not all under a mask
            rows = torch.arange(B, device=x.device)[:, None]
            return latent[rows, idx[:, 0]], visible[rows, 0, idx[:, 0]][:, None, None], False, None  # (B, k, C)
        keep = torch.zeros_like(visible).scatter_(-1, idx, True) & visible
        return latent, keep[:, None], False, (score, keep)

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
