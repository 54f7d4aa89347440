"""DeepSeek-V4's token compressor and lightning indexer (V4 report section 2.3).

Legend: B batch, T new tokens, m `ratio` (tokens per entry), w entry width, C = coff * w raw width (coff 2 with
overlapping windows, else 1), n entries, Hi indexer heads, P `qk_rope_head_dim`.

A compressor pools every m tokens into one entry: each token contributes a projection `kv` and a gate `gate`
(plus a learned bias per position in the window), and an entry is the gate-softmax-weighted sum over its window,
channel by channel, then RMS-normalised and rotated at the window's first position with the "compress" rotary.
CSA's windows overlap: entry w pools the second half of the channels of window w with the first half of window
w-1 (2m slots, stride m); HCA's windows do not (m slots). An entry exists once its window's last token has
been seen, so query t sees entry w iff (w + 1) * m <= t + 1: a query never sees an entry reaching past it.

One code path serves the full forward and the caches: the raw projections of the `span` tokens before the new
ones (none, -inf gates, without a cache) are prepended, and every window that closes among a row's new tokens is
pooled from that sequence. So prefill, chunked prefill and token-by-token decoding compute the same entries.

The pool protocol a cache implements (`qiusuo.cache.window`):
    history(kv, gate (B, T, C)) -> (L (B,), counts (B,), seq_kv, seq_gate (B, span + T, C))   and keeps the tail
    append(entries (B, n, w), valid (B, n), first (B,), select (B, T, k) | None)
        -> every entry of each row so far (B, n_all, w), or the selected ones per query (B, T, k, w)
where L are the tokens each row held before, counts its real new tokens (the rest is padding), and entry k of
row b is entry number first_b + k of its sequence.

The indexer (CSA only) is a compressor at `index_head_dim` with its own queries (from the attention's query
latent) and per-head weights: score(t, s) = sum_h w_{t,h} / sqrt(Hi) ReLU(q_{t,h} . k_s) / sqrt(Dk) (`index_scores`,
the one implementation, V3.2's `dsa.py` calls it too), and each query keeps the `index_topk` best visible entries.
Ties are broken towards the lower (older) entry on every path (`topk_lowest_index`); DeepSeek's inference code and
transformers call `torch.topk`, which leaves ties to the kernel, so on inputs without ties all three agree.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from qiusuo.config import CSA, ModelConfig
from qiusuo.model.rope import RMSNorm, RopeAt, apply_rotary


def rotate_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved rotary on the last P dims of x (B, T, H, d), the rest untouched (V4's `[nope | rope]`)."""
    P = 2 * cos.shape[-1]
    return torch.cat([x[..., :-P], apply_rotary(x[..., -P:], cos, sin, True)], dim=-1)


def topk_lowest_index(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest fp32 scores along the last dim, equal scores ordered by lower index: one exact
    int64 key per score (order-preserving float bits, then the reversed index), so every path and device picks
    the same entries. -0.0 counts as +0.0."""
    n = scores.shape[-1]
    bits = (scores.float() + 0.0).contiguous().view(torch.int32).to(torch.int64)
    key = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # monotone in the float value
    key = key * n + (n - 1 - torch.arange(n, device=scores.device))
    return key.topk(k, dim=-1).indices


def index_scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The lightning indexer's formula, one implementation for V3.2's (`dsa.py`) and V4's (`Indexer`): q (B, T, Hi, Dk)
    rotated queries, w (B, T, Hi) the `weights_proj` output, keys (B, S, Dk) -> (B, T, S) fp32 scores
    sum_h w_{t,h} / sqrt(Hi) ReLU(q_{t,h} . k_s) / sqrt(Dk).

    Queries in pieces of at most 2^24 / (Hi S) (decoding: one piece): every head of a piece in one matmul, ReLU
    in place, then the heads' weighted sum as a second (batched 1 x Hi by Hi x S) matmul, so each score is
    written and read once. The whole (B, T, Hi, S) at once would be 2 GB for a 2,048-token chunk over 32k
    tokens with 8 heads; head by head into one sum (`addcmul_`) passed over (T, S) five times per head and
    was 1.7x slower at T = 2,048, S = 8,192 (V3.2, the 2-core Xeon VM, 2026-12-01: docs/models.md)."""
    B, T, H, Dk = q.shape
    w = w.float() * (H**-0.5 * Dk**-0.5)
    k = keys.float().transpose(1, 2)  # (B, Dk, S)
    q = q.float()
    S = k.shape[-1]
    step = max(1, (1 << 24) // (H * max(S, 1)))
    pieces = []
    for t0 in range(0, max(T, 1), step):  # T = 0 still gives one (empty) piece
        t = min(step, T - t0)
        s = torch.bmm(q[:, t0: t0 + t].reshape(B, t * H, Dk), k).relu_().view(B * t, H, S)
        pieces.append(torch.bmm(w[:, t0: t0 + t].reshape(B * t, 1, H), s).view(B, t, S))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 1)


def visible_entries(positions: torch.Tensor, n: int, ratio: int) -> torch.Tensor:
    """(B|1, T, n) True where the query at `positions` (B|1, T) may see compressed entry w: (w+1)*m <= t+1."""
    return torch.arange(n, device=positions.device) < ((positions + 1) // ratio)[..., None]


class Compressor(nn.Module):
    """Pools every `ratio` tokens into one entry of `width`. Names are transformers' (`kv_proj`, `gate_proj`,
    `position_bias`, `kv_norm`; the hub's `wkv`, `wgate`, `ape`, `norm`)."""

    def __init__(self, cfg: ModelConfig, ratio: int, width: int, overlap: bool):
        super().__init__()
        self.ratio, self.width, self.overlap = ratio, width, overlap
        coff = 2 if overlap else 1
        self.span = coff * ratio  # raw tokens kept between calls
        self.kv_proj = nn.Linear(cfg.hidden_size, coff * width, bias=False)
        self.gate_proj = nn.Linear(cfg.hidden_size, coff * width, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(ratio, coff * width))
        self.kv_norm = RMSNorm(width, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, rope: RopeAt, pool=None, select: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D) -> every entry so far (B, n, w): this call's and, with a cache `pool`, the earlier ones;
        with a pool and `select` (B, T, k) entry numbers, only those, per query (B, T, k, w) (CSA decoding reads
        the indexer's k choices, not all n). Rows may stand at different lengths and add different counts of
        tokens (the paged engine's batches): each row pools the windows that close among its own new tokens."""
        B, T, _ = x.shape
        m, w = self.ratio, self.width
        kv, gate = self.kv_proj(x), self.gate_proj(x)  # (B, T, C)
        if pool is None:
            L = torch.zeros(B, dtype=torch.long, device=x.device)
            counts = torch.full((B,), T, dtype=torch.long, device=x.device)
            seq_kv = torch.cat([kv.new_zeros(B, self.span, kv.shape[-1]), kv], 1)
            seq_gate = torch.cat([gate.new_full((B, self.span, gate.shape[-1]), float("-inf")), gate], 1)
        else:
            L, counts, seq_kv, seq_gate = pool.history(kv, gate)  # (B,), (B,); row b's seq[0] is position L_b - span
        first = L // m  # (B,) the first entry that can close now
        n_row = (L + counts) // m - first  # (B,) entries closing among each row's new tokens
        # a bound known from the shapes alone (no host sync, the same in a compiled step): at most ceil(T / m)
        # windows close among T tokens; without a cache exactly T // m
        n = T // m if pool is None else -(-T // m)
        if n == 0:
            entries, valid = kv.new_zeros(B, 0, w), n_row.new_zeros(B, 0, dtype=torch.bool)
        else:
            # seq index of each row's window `first`'s first token (>= m + 1 with overlap), then n * m tokens on
            idx = (first * m - (L - self.span))[:, None] + torch.arange(n * m, device=x.device)  # (B, n*m)
            idx = idx.clamp(max=seq_kv.shape[1] - 1)  # windows past a row's count: computed, marked invalid

            def windows(t: torch.Tensor, back: int) -> torch.Tensor:
                return t.gather(1, (idx - back)[..., None].expand(-1, -1, t.shape[-1])).view(B, n, m, -1)

            cur_kv, cur_g = windows(seq_kv, 0), windows(seq_gate, 0) + self.position_bias  # (B, n, m, C)
            if self.overlap:  # first m slots: window w-1's first w channels; next m: window w's last w
                prev_kv, prev_g = windows(seq_kv, m), windows(seq_gate, m) + self.position_bias
                cur_kv = torch.cat([prev_kv[..., :w], cur_kv[..., w:]], 2)  # (B, n, 2m, w)
                cur_g = torch.cat([prev_g[..., :w], cur_g[..., w:]], 2)
            pooled = (cur_kv * cur_g.softmax(2, dtype=torch.float32).to(cur_kv.dtype)).sum(2)  # (B, n, w)
            k = torch.arange(n, device=x.device)
            cos, sin = rope.at("compress", (first[:, None] + k) * m)  # (B, n, P/2): each window's first token
            entries = rotate_tail(self.kv_norm(pooled)[:, :, None], cos, sin)[:, :, 0]
            valid = k < n_row[:, None]  # (B, n)
        return entries if pool is None else pool.append(entries, valid, first, select)


class IndexScorer(nn.Module):
    """Per-query head weights of the indexer (transformers' `indexer.scorer.weights_proj`)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.weights_proj = nn.Linear(cfg.hidden_size, cfg.index_n_heads, bias=False)


class Indexer(Compressor):
    """The lightning indexer: a compressor at `index_head_dim` plus queries from the attention's query latent."""

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, cfg.compress_rate(CSA), cfg.index_head_dim, overlap=True)
        self.heads, self.topk = cfg.index_n_heads, cfg.index_topk
        self.q_b_proj = nn.Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.scorer = IndexScorer(cfg)

    def select(self, x: torch.Tensor, q_lat: torch.Tensor, rope: RopeAt, positions: torch.Tensor,
               pool=None) -> Selection:
        """x (B, T, D), q_lat (B, T, q_lora_rank), positions (B|1, T) -> each query's `index_topk` best visible
        entries (fewer visible: the rest marked invalid)."""
        B, T, _ = x.shape
        keys = self(x, rope, pool)  # (B, n, w)
        n = keys.shape[1]
        q = rotate_tail(self.q_b_proj(q_lat).view(B, T, self.heads, self.width), *rope["compress"])
        score = index_scores(q, self.scorer.weights_proj(x), keys)  # (B, T, n)
        score = score.masked_fill(~visible_entries(positions, n, self.ratio), float("-inf"))
        idx = topk_lowest_index(score, min(self.topk, n))  # (B, T, k)
        chosen = score.gather(-1, idx)
        return Selection(idx, chosen > float("-inf"), chosen, n)


class Selection(NamedTuple):
    """The indexer's choice per query: `idx` (B, T, k) entries, `valid` (B, T, k) False where a query had fewer
    than k visible entries, `score` (B, T, k) fp32 their indexer scores, `n` entries in all."""

    idx: torch.Tensor
    valid: torch.Tensor
    score: torch.Tensor
    n: int

    def mask(self) -> torch.Tensor:
        """(B, T, n) bool: the chosen entries as a dense mask (the reference attention path's form)."""
        B, T, _ = self.idx.shape
        out = torch.zeros(B, T, self.n, dtype=torch.bool, device=self.idx.device)
        return out.scatter_(-1, self.idx, self.valid)


def indexer_loss(score: torch.Tensor, chosen: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
    """The indexer's own objective (DeepSeek-V3.2 report eq. 3-4; V4 trains CSA's indexer the same way):
    KL(p || softmax(score)) over each query's chosen keys, where p is the main attention's probability of those
    keys summed over heads and renormalised (the sparse stage; the dense warm-up passes every visible key as
    chosen). The selection itself is discrete, so this is the only signal that teaches the indexer what attention
    would have wanted; the target is detached and the indexer reads detached inputs, so the loss trains the
    indexer alone. score, attn (B, T, n) fp32, chosen (B, T, n) bool -> scalar, mean over queries with a choice."""
    p = attn.detach() * chosen
    mass = p.sum(-1, keepdim=True)
    rows = mass[..., 0] > 0
    if not bool(rows.any()):
        return score.new_zeros(())
    p = p[rows] / mass[rows]
    logq = score.masked_fill(~chosen, float("-inf"))[rows].log_softmax(-1)
    return torch.where(p > 0, p * (p.clamp_min(1e-30).log() - logq), torch.zeros_like(p)).sum(-1).mean()
