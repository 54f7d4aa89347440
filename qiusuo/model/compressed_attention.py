"""DeepSeek-V4 attention: one shared key = value head over a sliding window plus compressed entries (V4 report 2.3).

Legend: B batch, T new tokens, S attended keys, H heads, hd `head_dim`, P `qk_rope_head_dim`, W
`sliding_window`, G `o_groups`, R `o_lora_rank`, n compressed entries.

Three attention kinds share this module, named as in transformers' `layer_types`:
- `sliding_attention`: the last W tokens only ("main" rotary: `rope_theta`, no scaling);
- `compressed_sparse_attention` (CSA): the window plus the compressed entries (m = 4) the lightning indexer
  keeps for each query (top `index_topk`);
- `heavily_compressed_attention` (HCA): the window plus every visible entry of a coarser compressor (m' = 128).
CSA and HCA use the "compress" rotary (`compress_rope_theta` with YaRN).

Queries: q LoRA with its norm, then an unweighted RMS norm per head, rotary on the last P dims. Keys = values:
one normalised projection per token, rotated the same way; so the attention output carries the keys' rotation
on its last P dims, and it is rotated back by the query's position before the output projection (making each
entry's contribution depend on relative position only). A learnable logit per head (`sinks`) joins every
softmax's denominator and nothing else, so a head can attend to nothing. The output projection is grouped and
low rank: heads in G groups, each group (H/G * hd) -> R, then G * R -> D.

Two paths, equal (tested): `banded_sink_attention` scores each query against only its window (queries in chunks,
keys through a strided view) and its own chosen CSA entries (gathered), so cost grows with T (W + k) instead of
T^2; `sink_attention` (`dense_reference = True`) scores every key under one boolean mask built from positions,
the slow reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qiusuo.config import CSA, HCA, SLIDING, ModelConfig
from qiusuo.cache.spec import LayerCacheSpec, PoolSpec
from qiusuo.model.compressor import Compressor, Indexer, indexer_loss, rotate_tail, visible_entries
from qiusuo.model.rope import RMSNorm, RopeAt


class GroupedLinear(nn.Linear):
    """G independent (in -> out/G) projections stored as one (out, in) weight (transformers'
    `DeepseekV4GroupedLinear`, the hub's `wo_a`). x (..., G, in) -> (..., G, out/G)."""

    def __init__(self, in_per_group: int, out_features: int, groups: int):
        super().__init__(in_per_group, out_features, bias=False)
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.view(self.groups, -1, x.shape[-1])  # (G, R, in)
        return torch.einsum("...gi,gri->...gr", x, w)


def sink_attention(q: torch.Tensor, keys: torch.Tensor, visible: torch.Tensor, sinks: torch.Tensor,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense reference: q (B, T, H, hd), keys = values (B, S, hd), visible (B, T, S) bool, sinks (H,) ->
    (B, T, H, hd) and the probabilities (B, H, T, S) fp32. Every query scores every key; the mask decides."""
    B, T, H, hd = q.shape
    S = keys.shape[1]
    scores = torch.bmm(q.transpose(1, 2).reshape(B, H * T, hd), keys.transpose(1, 2).to(q.dtype))
    scores = scores.float().view(B, H, T, S).mul_(scale).masked_fill_(~visible[:, None], float("-inf"))
    logits = torch.cat([scores, sinks.float().view(1, H, 1, 1).expand(B, H, T, 1)], -1)
    probs = logits.softmax(-1)[..., :S]  # the sink's share is dropped: it has no value
    out = torch.bmm(probs.reshape(B, H * T, S).to(keys.dtype), keys)  # (B, H*T, hd)
    return out.view(B, H, T, hd).transpose(1, 2).to(q.dtype), probs


def banded_sink_attention(q: torch.Tensor, keys: torch.Tensor, key_ok: torch.Tensor, W: int, sinks: torch.Tensor,
                          scale: float, extra: torch.Tensor | None = None,
                          extra_ok: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The fast path: each query scores only its own window and its own compressed entries.

    q (B, T, H, hd); keys = values (B, W + T, hd) in position order, so query t's window is keys[t+1 : t+W+1];
    key_ok (B|1, W + T) False for slots before the sequence; extra: compressed entries, shared (B, n, hd) (HCA)
    or chosen per query (B, T, k, hd) (CSA), with extra_ok (B, T, n|k). Queries go in chunks of C = min(T, W):
    chunk c scores the C + W - 1 keys its queries can reach, one batched matmul for all chunks over a strided
    view, so a window costs T (C + W) instead of T^2. One softmax over window, entries and sink, as the
    reference. -> (B, T, H, hd) and the entries' probabilities summed over heads (B, T, n|k) (None without)."""
    B, T, H, hd = q.shape
    C = max(1, min(T, W))
    nC = -(-T // C)
    pad, K1 = nC * C - T, C + W - 1
    kw = F.pad(keys[:, 1:], (0, 0, 0, pad)).unfold(1, K1, C)  # (B, nC, hd, K1) view: chunk c's keys
    okw = F.pad(key_ok[:, 1:], (0, pad), value=False).unfold(1, K1, C)  # (B|1, nC, K1)
    qc = F.pad(q, (0, 0, 0, 0, 0, pad)).view(B, nC, C, H, hd)
    i, k = torch.arange(C, device=q.device)[:, None], torch.arange(K1, device=q.device)[None]
    ok = ((k >= i) & (k < i + W))[None, None, None] & okw[:, :, None, None, :]  # (B|1, nC, 1, C, K1)
    parts = [torch.einsum("bnchd,bndk->bnhck", qc, kw.to(q.dtype)).float().mul_(scale)
             .masked_fill_(~ok, float("-inf"))]
    if extra is not None:
        per_query = extra.dim() == 4
        ex = F.pad(extra, (0, 0, 0, 0, 0, pad)).view(B, nC, C, -1, hd) if per_query else extra
        exs = torch.einsum("bnchd,bnckd->bnhck" if per_query else "bnchd,bkd->bnhck", qc, ex.to(q.dtype))
        ex_ok = F.pad(extra_ok, (0, 0, 0, pad), value=False).view(B, nC, 1, C, -1)
        parts.append(exs.float().mul_(scale).masked_fill_(~ex_ok, float("-inf")))
    parts.append(sinks.float().view(1, 1, H, 1, 1).expand(B, nC, H, C, 1))
    probs = torch.cat(parts, -1).softmax(-1)  # (B, nC, H, C, K1 [+ n|k] + 1)
    out = torch.einsum("bnhck,bndk->bnchd", probs[..., :K1].to(q.dtype), kw.to(q.dtype))  # (B, nC, C, H, hd)
    attn = None
    if extra is not None:
        pe = probs[..., K1:-1]
        out = out + torch.einsum("bnhck,bnckd->bnchd" if per_query else "bnhck,bkd->bnchd", pe.to(q.dtype),
                                 ex.to(q.dtype))
        attn = pe.sum(2).reshape(B, nC * C, -1)[:, :T]
    return out.reshape(B, nC * C, H, hd)[:, :T], attn


class CompressedAttention(nn.Module):
    @staticmethod
    def cache_spec(cfg: ModelConfig, kind: str) -> LayerCacheSpec:
        """The `window` kind: W slots of head_dim, plus the compressor's pool (and the indexer's, CSA)."""
        pools = []
        if kind in (CSA, HCA):
            m, overlap = cfg.compress_rate(kind), kind == CSA
            coff = 2 if overlap else 1
            pools.append(PoolSpec("compressor", m, cfg.head_dim, coff * cfg.head_dim, coff * m, cfg.qk_rope_head_dim))
            if kind == CSA:  # the indexer's keys: no part kept apart (all FP8 under an FP8 cache, as DeepSeek's)
                pools.append(PoolSpec("indexer", m, cfg.index_head_dim, 2 * cfg.index_head_dim, 2 * m))
        return LayerCacheSpec("window", cfg.head_dim, window=cfg.sliding_window, pools=tuple(pools),
                              rotary=cfg.qk_rope_head_dim)

    def __init__(self, cfg: ModelConfig, layer_idx: int, kind: str):
        super().__init__()
        self.layer_idx, self.kind = layer_idx, kind
        self.rope_kind = "main" if kind == SLIDING else "compress"
        H, hd, D, G = cfg.num_attention_heads, cfg.head_dim, cfg.hidden_size, cfg.o_groups
        self.H, self.hd, self.W, self.eps = H, hd, cfg.sliding_window, cfg.rms_norm_eps
        self.q_a_proj = nn.Linear(D, cfg.q_lora_rank, bias=False)
        self.q_a_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, H * hd, bias=False)
        self.kv_proj = nn.Linear(D, hd, bias=False)
        self.kv_norm = RMSNorm(hd, cfg.rms_norm_eps)
        self.o_a_proj = GroupedLinear(H * hd // G, G * cfg.o_lora_rank, G)
        self.o_b_proj = nn.Linear(G * cfg.o_lora_rank, D, bias=False)
        self.sinks = nn.Parameter(torch.zeros(H))
        self.dense_reference = False  # tests switch to the slow reference path (`_dense`)
        self.compressor = None
        if kind == CSA:
            self.compressor = Compressor(cfg, cfg.compress_rate(CSA), hd, overlap=True)
            self.compressor.indexer = Indexer(cfg)
        elif kind == HCA:
            self.compressor = Compressor(cfg, cfg.compress_rate(HCA), hd, overlap=False)

    def forward(self, x: torch.Tensor, rope: RopeAt, cache=None, absorb: bool = False,
                mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x (B, T, D) -> (B, T, D) and, for CSA when gradients are on, the indexer's loss (`indexer_loss`).
        `cache`: a `Cache` whose layer `layer_idx` is of kind `window`. `absorb` has no meaning here (nothing
        to absorb); packed-document masks are not supported."""
        if mask is not None:
            raise ValueError("DeepSeek-V4 attention does not take packed documents (doc_ids): its compressed "
                             "windows would pool across them; train on unpacked rows (SFT: --sft.pack=false)")
        B, T, _ = x.shape
        cos, sin = rope[self.rope_kind]
        pos = rope.positions if rope.positions.dim() == 2 else rope.positions[None]  # (B|1, T)
        q_lat = self.q_a_norm(self.q_a_proj(x))  # (B, T, q_lora_rank)
        q = self.q_b_proj(q_lat).view(B, T, self.H, self.hd)
        q = rotate_tail(F.rms_norm(q.float(), (self.hd,), eps=self.eps).to(q.dtype), cos, sin)
        kv = rotate_tail(self.kv_norm(self.kv_proj(x))[:, :, None], cos, sin)[:, :, 0]  # (B, T, hd)
        layer = cache.layer(self.layer_idx) if cache is not None else None
        if layer is not None:
            keys, key_pos = layer.update(kv)  # (B, W + T, hd), (B, W + T): the W tokens before, then the new
        else:
            keys = torch.cat([kv.new_zeros(B, self.W, self.hd), kv], 1)
            key_pos = torch.cat([pos.new_full((pos.shape[0], self.W), -1), pos], 1)
        extra = extra_ok = sel = None
        if self.compressor is not None:
            c = self.compressor
            main = layer.pool("compressor") if layer is not None else None
            if self.kind == CSA:  # the indexer reads detached inputs: only its own loss trains it
                sel = c.indexer.select(x.detach(), q_lat.detach(), rope, pos,
                                       layer.pool("indexer") if layer is not None else None)
                # from a cache, only the chosen entries are read (decoding: k of n / m); the reference needs all
                entries = c(x, rope, main, None if self.dense_reference else sel.idx)  # (B, T, k, hd) | (B, n, hd)
                extra = entries if entries.dim() == 4 else entries[torch.arange(B, device=x.device)[:, None, None],
                                                                       sel.idx]
                extra_ok = sel.valid
            else:
                entries = c(x, rope, main)  # (B, n, hd)
                extra, extra_ok = entries, visible_entries(pos, entries.shape[1], c.ratio).expand(B, T, -1)
        if self.dense_reference:
            out, attn = self._dense(q, keys, key_pos, pos, entries if extra is not None else None, extra_ok, sel)
        else:
            out, attn = banded_sink_attention(q, keys, key_pos >= 0, self.W, self.sinks, self.hd**-0.5, extra,
                                              extra_ok)
        out = rotate_tail(out, cos, -sin)  # undo the keys' rotation at the query's position
        grouped = self.o_a_proj(out.reshape(B, T, self.o_a_proj.groups, -1))  # (B, T, G, R)
        aux = indexer_loss(sel.score, sel.valid, attn) if sel is not None and sel.n and torch.is_grad_enabled() else None
        return self.o_b_proj(grouped.flatten(2)), aux

    def _dense(self, q, keys, key_pos, pos, entries, entries_ok, sel):
        """The reference path (`dense_reference = True`): one mask over every window key and every entry, built
        from positions, and `sink_attention`. -> (B, T, H, hd) and the chosen entries' probabilities."""
        B, T = q.shape[:2]
        kp, qp = key_pos[:, None, :], pos[:, :, None]
        visible = ((kp <= qp) & (kp > qp - self.W) & (kp >= 0)).expand(B, T, -1)  # (B, T, W + T)
        if entries is not None:
            keys = torch.cat([keys, entries.to(keys.dtype)], 1)
            visible = torch.cat([visible, sel.mask() if sel is not None else entries_ok], -1)
        out, probs = sink_attention(q, keys, visible, self.sinks, self.hd**-0.5)
        if entries is None:
            return out, None
        attn = probs[..., -entries.shape[1]:].sum(1)  # (B, T, n)
        return out, attn.gather(-1, sel.idx) if sel is not None else attn
