"""What each layer caches (`LayerCacheSpec`), the one registry of layer-cache kinds, and the bytes they cost.

A layer's attention kind decides what it caches (its `LayerCacheSpec`, from `Transformer.cache_specs()`); the
spec's `kind` names the class in `LAYER_KINDS` that owns that layer's storage in a block pool
(`qiusuo.cache.pool.BlockPool`), its per-batch tensors and, where it keeps per-sequence state, its snapshots.
The serving engine's pool and the contiguous cache of `Transformer.generate` (a private pool whose rows hold
consecutive blocks, `qiusuo.cache.contiguous`) are the same classes; a new attention kind adds one class here.

The cache protocol the model calls (`PagedBatch` for one forward; `ContiguousCache` builds one per forward):
    positions(T) -> (B, T) long     positions of the T new tokens of each row (the cache owns them)
    layer(i) -> layer cache          the cache of layer i, of the kind its attention declared
    advance(T)                        the T new tokens are now part of the context: positions move on

Kinds (each class's docstring has its layout):
- `latent` (MLA, `latent.py`): per token the normalised latent `c_kv` then the rotated shared key `k_pe`,
  kv_lora_rank + qk_rope_head_dim values (DeepSeek-V3: 576).
      update(latent (B, T, C)) -> (latent_all (B, S, C), mask (B, 1, T, S) bool | None)
  `mask` is True where a query may attend; None: every gathered token (one new token per row, equal lengths).
- `sparse_latent` (V3.2's DSA, `sparse.py`): the latent and the lightning indexer's key in two components, so
  a decoding step scores the S keys first and then reads only the k latents it picked:
      update(new: SparseContext of the T new tokens) -> (context: SparseContext of S tokens, mask as above)
- `window` (V4, `window.py`): the last `window` keys (= values) of the layer's one head, plus one pool per
  compressor (the main one; CSA layers also the indexer's):
      update(kv (B, T, hd)) -> (keys (B, W + T, hd), key_positions (B, W + T))   the W tokens before the new
                               ones, then the T new ones, positions ascending (-1: before the start)
      pool(name): one compressor's pool, the protocol in `qiusuo.model.compressor` (`history`, `append`)

Precision is per component (`qiusuo.cache.precision.CacheDtype`): keys in FP8 with their rotary parts in bf16
under `fp8`, everything in one dtype otherwise; every byte count here takes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qiusuo.cache.latent import LatentCache
from qiusuo.cache.precision import CacheDtype
from qiusuo.cache.sparse import SparseLatentCache
from qiusuo.cache.window import WindowCache


@dataclass(frozen=True)
class PoolSpec:
    """One compressor's cache: an entry of `width` values per `ratio` tokens (its last `rotary` values rotated),
    and the raw projections of the last `span` tokens (kv and gate, `raw` values each) that the next entries
    still need (overlapping windows: 2m)."""

    name: str
    ratio: int
    width: int
    raw: int
    span: int
    rotary: int = 0


@dataclass(frozen=True)
class LayerCacheSpec:
    """What one layer keeps. `kind` names its class in `LAYER_KINDS`; `width` is values per cached token
    (`latent`: kv_lora_rank + qk_rope_head_dim; `sparse_latent`: that + index_head_dim) or per window slot
    (`window`: head_dim); `key_width`: the last values of `width` that `sparse_latent` keeps apart (the indexer
    key); `rotary`: the rotated values at the end of the latent or window key (kept in bf16 under FP8);
    `window` > 0 bounds the tokens kept; `pools`: V4's compressed caches."""

    kind: str
    width: int
    window: int = 0
    pools: tuple[PoolSpec, ...] = ()
    key_width: int = 0
    rotary: int = 0

    def bytes_per_token(self, dtype: CacheDtype, context: int | None = None) -> float:
        """Cache bytes per token of a sequence of `context` tokens (a latent cache: the same at any length)."""
        return kind_of(self).bytes_per_token(self, dtype, context)


# layer-cache kind (LayerCacheSpec.kind) -> the class that owns such a layer's storage in a pool
LAYER_KINDS = {"latent": LatentCache, "sparse_latent": SparseLatentCache, "window": WindowCache}


def kind_of(spec: LayerCacheSpec):
    if spec.kind not in LAYER_KINDS:
        raise ValueError(f"no layer cache of kind {spec.kind!r}; known kinds: {', '.join(LAYER_KINDS)}")
    return LAYER_KINDS[spec.kind]


def block_bytes(specs: list[LayerCacheSpec], block_size: int, dtype: CacheDtype) -> int:
    """Bytes one block holds over all layers (what the memory budget divides by)."""
    return sum(kind_of(s).block_bytes(s, block_size, dtype) for s in specs)


def state_bytes(specs: list[LayerCacheSpec], dtype: CacheDtype, slack: int = 0) -> int:
    """Bytes one sequence state holds over all layers (0 without stateful kinds), rings `slack` slots longer."""
    return sum(kind_of(s).state_bytes(s, dtype, slack) for s in specs)


def block_size_for(specs: list[LayerCacheSpec], block_size: int) -> int:
    """The smallest multiple of `block_size` that every kind's block granularity divides (V4: its compression
    rates, so a block holds whole compressed entries)."""
    return math.lcm(block_size, *[kind_of(s).block_multiple(s) for s in specs])
