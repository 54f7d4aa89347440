"""The cache protocol the model calls, and its simplest implementation: one contiguous buffer per layer.

A layer's attention kind decides what it caches (its `LayerCacheSpec`); a cache hands each layer a layer cache
of that kind (`cache.layer(i)`), and the attention module calls that object's methods. MLA's kind is `latent`:
per token, exactly `kv_lora_rank + qk_rope_head_dim` values, the normalised latent `c_kv` followed by the
rotated shared key `k_pe` (DeepSeek-V3: 512 + 64 = 576). A new attention kind (V3.2's indexer keys, V4's
sliding ring and compressed pools) brings a new spec kind and a layer-cache class per cache implementation;
the model, the scheduler and the block accounting see only `Cache` and bytes per token.

Contract (`Cache`):
    positions(T) -> (B, T) long     positions of the T new tokens of each row (the cache owns them)
    layer(i) -> layer cache          the cache of layer i, of the kind its attention declared
    advance(T)                        the T new tokens are now part of the context: positions move on

Layer cache of kind `latent` (`LatentLayerCache`):
    update(latent (B, T, C)) -> (latent_all (B, S, C), mask (B, 1, T, S) bool | None)
`mask` is True where a query may attend; None means "attend to every cached token" (decoding one token for rows
of equal length). The serving engine implements the same protocol over a paged block pool (`infer/paged.py`).

Layer cache of kind `sparse_latent` (DeepSeek-V3.2's DSA; `_ContiguousSparseLatent`): per token the MLA latent
(C) and the lightning indexer's key (Dk) in TWO tensors, so that a decoding step can score the S keys first and then
read only the k latents it picked (the indexer keys are what it must read whole, Dk values a token):
    update(new: SparseContext of the T new tokens) -> (context: SparseContext of S tokens, mask (B, 1, T, S) bool)
    SparseContext.keys (B, S, Dk)                   every context token's indexer key
    SparseContext.latents(idx (B, n) long | None) -> (B, n, C)   the latents at context positions idx (None: all S)
`mask` as for `latent` (the indexer masks its scores with it, then the attention reads its choice). The paged
engine's context reads its blocks on demand (`infer/paged_sparse.py`); `SparseContext` itself holds both as
tensors (the contiguous cache's buffers, or the new tokens when there is no cache).

Layer cache of kind `window` (DeepSeek-V4; `WindowLayerCache`): the last `window` keys (= values) of the layer's
one shared head, plus one `pool(name)` per compressor (the main compressor; CSA layers also the indexer's):
    update(kv (B, T, hd)) -> (keys (B, W + T, hd), key_positions (B, W + T))   the W tokens before the new
                                            ones, then the T new ones, positions ascending (-1: before the start)
    pool(name): one compressor's pool, the protocol in `qiusuo.model.compressor` (`history`, `append`)
A V4 layer's cache is bounded by the window plus one pool entry per `ratio` tokens: per token it costs
`width / ratio` values per pool, the few percent of V3's latent that is V4's point at long context.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class PoolSpec:
    """One compressor's cache: an entry of `width` values per `ratio` tokens, and the raw projections of the last
    `span` tokens (kv and gate, `raw` values each) that the next entries still need (overlapping windows: 2m)."""

    name: str
    ratio: int
    width: int
    raw: int
    span: int


@dataclass(frozen=True)
class LayerCacheSpec:
    """What one layer keeps. `kind` names the layer-cache class a cache builds for it; `width` is values per
    cached token (`latent`: kv_lora_rank + qk_rope_head_dim; `sparse_latent`: that + index_head_dim) or per
    window slot (`window`: head_dim); `key_width`: the last values of `width` that `sparse_latent` keeps apart
    (the indexer key); `window` > 0 bounds the tokens kept; `pools`: V4's compressed caches."""

    kind: str
    width: int
    window: int = 0
    pools: tuple[PoolSpec, ...] = ()
    key_width: int = 0

    def bytes_per_token(self, itemsize: int, context: int | None = None) -> float:
        """Cache bytes per token of a sequence of `context` tokens (a latent cache: the same at any length)."""
        if not self.window and not self.pools:
            return self.width * itemsize
        if not context:
            raise ValueError(f"a {self.kind!r} layer's cache per token depends on the context length: pass context")
        fixed = min(self.window, context) * self.width + sum(2 * p.span * p.raw for p in self.pools)
        return (fixed + sum((context // p.ratio) * p.width for p in self.pools)) * itemsize / context


def compilable(specs: list[LayerCacheSpec]) -> bool:
    """Whether a decoding step over the *contiguous* cache of these specs has static shapes and no Python-side
    state changes, which is what `torch.compile` needs: latent caches do; the contiguous V4 pools count entries
    in Python as windows close (the paged engine's V4 caches compile: their state is all in tensors)."""
    return all(s.kind in ("latent", "sparse_latent") for s in specs)


class LatentLayerCache(Protocol):
    def update(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]: ...


class Cache(Protocol):
    def positions(self, T: int) -> torch.Tensor: ...

    def layer(self, i: int) -> LatentLayerCache: ...

    def advance(self, T: int) -> None: ...


class SparseContext:
    """What a `sparse_latent` layer cache returns: every context token's indexer key, and its latents on demand
    (`latents`), so the attention reads all S keys but only the latents it picked. This implementation holds
    both as tensors; the paged engine's (`infer/paged_sparse.py`) reads them from its blocks."""

    def __init__(self, latent: torch.Tensor, keys: torch.Tensor):
        self.latent, self.keys = latent, keys  # (B, S, C), (B, S, Dk)

    def latents(self, idx: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, C) the latents at positions idx (B, n) of each row; None: all S."""
        if idx is None:
            return self.latent
        return self.latent[torch.arange(idx.shape[0], device=idx.device)[:, None], idx]


def _length_mask(pos: torch.Tensor, S: int) -> torch.Tensor:
    """(B, 1, T, S) causal + length mask of queries at pos (B, T) over the first S cached positions."""
    return (torch.arange(S, device=pos.device)[None, None, :] <= pos[:, :, None])[:, None]


def _write(data: torch.Tensor, pos: torch.Tensor, values: torch.Tensor) -> None:
    """values (B, T, w) into data (B, max_len, w) at positions pos (B, T)."""
    B, T, w = values.shape
    data.scatter_(1, pos[:, :, None].expand(B, T, w), values.to(data.dtype))


class _ContiguousLatent:
    """Layer cache of kind `latent` over one (B, max_len, C) buffer, writing at the owner's current positions."""

    def __init__(self, owner: "ContiguousCache", spec: LayerCacheSpec, B: int, device, dtype):
        self.owner = owner
        self.data = torch.zeros(B, owner.max_len, spec.width, device=device, dtype=dtype)
        self.buffers = (self.data,)  # what `num_bytes_per_token` counts

    def update(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        pos = self.owner.current  # (B, T)
        _write(self.data, pos, latent)
        S = self.owner.max_len if latent.shape[1] == 1 else int(pos.max()) + 1
        return self.data[:, :S], _length_mask(pos, S)


class _ContiguousSparseLatent:
    """Layer cache of kind `sparse_latent`: a (B, max_len, C) latent buffer and a (B, max_len, Dk) key buffer.
    Decoding (T == 1) hands out the whole buffers (static shapes, like `latent`): the indexer scores max_len keys
    under the length mask and `SparseContext.latents` reads only the chosen k latents."""

    def __init__(self, owner: "ContiguousCache", spec: LayerCacheSpec, B: int, device, dtype):
        self.owner = owner
        self.latent = torch.zeros(B, owner.max_len, spec.width - spec.key_width, device=device, dtype=dtype)
        self.keys = torch.zeros(B, owner.max_len, spec.key_width, device=device, dtype=dtype)
        self.buffers = (self.latent, self.keys)

    def update(self, new: SparseContext) -> tuple[SparseContext, torch.Tensor]:
        pos = self.owner.current  # (B, T)
        _write(self.latent, pos, new.latent)
        _write(self.keys, pos, new.keys)
        S = self.owner.max_len if pos.shape[1] == 1 else int(pos.max()) + 1
        return SparseContext(self.latent[:, :S], self.keys[:, :S]), _length_mask(pos, S)


class _ContiguousWindow:
    """Layer cache of kind `window`: the last `window` keys per row in position order (rows advance together,
    so one slice keeps them; -1 marks slots before the sequence's start)."""

    def __init__(self, owner: "ContiguousCache", spec: LayerCacheSpec, B: int, device, dtype):
        W = spec.window
        self.owner, self.W, self.buffers = owner, W, ()
        self.keys = torch.zeros(B, W, spec.width, device=device, dtype=dtype)
        self.key_pos = torch.full((B, W), -1, dtype=torch.long, device=device)
        self.pools = {p.name: _ContiguousPool(owner, p, B, device, dtype) for p in spec.pools}

    def update(self, kv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        keys = torch.cat([self.keys, kv.to(self.keys.dtype)], 1)  # (B, W + T, hd), positions ascending
        key_pos = torch.cat([self.key_pos, self.owner.current], 1)
        self.keys, self.key_pos = keys[:, -self.W:], key_pos[:, -self.W:]
        return keys, key_pos

    def pool(self, name: str) -> "_ContiguousPool":
        return self.pools[name]


class _ContiguousPool:
    """One compressor's cache: a tail of raw projections (gate -inf where no token was) and the entries so far.
    Rows advance together (`ContiguousCache.length`), so every row closes its windows at the same step."""

    def __init__(self, owner: "ContiguousCache", spec: PoolSpec, B: int, device, dtype):
        self.owner, self.span, self.ratio = owner, spec.span, spec.ratio
        self.tail_kv = torch.zeros(B, spec.span, spec.raw, device=device, dtype=dtype)
        self.tail_gate = torch.full((B, spec.span, spec.raw), float("-inf"), device=device, dtype=dtype)
        self.entries = torch.zeros(B, owner.max_len // spec.ratio, spec.width, device=device, dtype=dtype)
        self.count = 0

    def history(self, kv: torch.Tensor, gate: torch.Tensor):
        B, T = kv.shape[:2]
        seq_kv = torch.cat([self.tail_kv, kv.to(self.tail_kv.dtype)], 1)
        seq_gate = torch.cat([self.tail_gate, gate.to(self.tail_gate.dtype)], 1)
        self.tail_kv, self.tail_gate = seq_kv[:, -self.span:], seq_gate[:, -self.span:]
        L = self.owner.length
        self.count_after = (L + T) // self.ratio
        full = torch.full((B,), L, dtype=torch.long, device=kv.device)
        return full, torch.full_like(full, T), seq_kv, seq_gate

    def append(self, entries: torch.Tensor, valid: torch.Tensor, first: torch.Tensor,
               select: torch.Tensor | None = None) -> torch.Tensor:
        n = self.count_after - self.count  # rows advance together: every entry of this call is valid
        self.entries[:, self.count: self.count_after] = entries[:, :n].to(self.entries.dtype)
        self.count = self.count_after
        every = self.entries[:, : self.count]
        if select is None:
            return every
        return every[torch.arange(every.shape[0], device=every.device)[:, None, None], select]


class ContiguousCache:
    """Contiguous cache for `B` sequences of up to `max_len` tokens: one (B, max_len, width) buffer per layer
    (`sparse_latent`: two, the latents and the indexer keys), one length per row. `specs`: one `LayerCacheSpec`
    per layer (`Transformer.cache_specs()`).

    Decoding steps (T == 1) attend over the whole buffer with a length mask, so every step has the same shapes:
    that is what lets `torch.compile` turn a decoding step into one fused kernel program (2.2x faster than eager
    on the bench config here). Prefill (T > 1) slices to the longest row instead.
    """

    def __init__(self, specs: list[LayerCacheSpec], batch_size: int, max_len: int, device=None,
                 dtype: torch.dtype = torch.float32):
        self.max_len = max_len
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens cached per row
        self.length = 0  # the same, as a Python int: rows always advance together here
        self.current = self.lengths[:, None]  # (B, T) positions of the tokens being written
        # one tensor per layer (not views of one): compiled steps then update them in place (see infer/paged.py)
        missing = sorted({s.kind for s in specs} - set(LAYER_KINDS))
        if missing:
            raise ValueError(f"ContiguousCache has no layer cache of kind {missing}")
        self._layers = [LAYER_KINDS[s.kind](self, s, batch_size, device, dtype) for s in specs]
        self.buffers = [b for layer in self._layers for b in layer.buffers]  # per-token buffers (not V4's)

    def positions(self, T: int) -> torch.Tensor:
        self.current = self.lengths[:, None] + torch.arange(T, device=self.lengths.device)  # (B, T)
        return self.current

    def layer(self, i: int):
        return self._layers[i]

    def advance(self, T: int) -> None:
        self.lengths += T
        self.length += T

    @property
    def num_bytes_per_token(self) -> int:
        """Bytes per token of the latent layers' buffers (what `count.cache_bytes_per_token` predicts)."""
        return sum(b.shape[-1] * b.element_size() for b in self.buffers)


# layer-cache kind (LayerCacheSpec.kind) -> its contiguous implementation: cls(owner, spec, B, device, dtype)
LAYER_KINDS = {"latent": _ContiguousLatent, "sparse_latent": _ContiguousSparseLatent, "window": _ContiguousWindow}
