"""What a cache stores its values in, component by component: `--kv-cache-dtype {auto,bf16,fp8}`.

A layer cache keeps a few *components* (MLA's latent, V3.2's indexer keys, V4's window ring and compressed
entries, its compressors' open windows), each a tensor of fixed-width rows addressed by slots (or by (state, slot)
for per-sequence rings). `CacheDtype` builds them:
- `auto` / `bf16` / `fp32`: every component `Plain`, one tensor in that dtype (auto: the model's).
- `fp8`: DeepSeek's layout (V3.2's and V4's inference code; vLLM's `fp8_ds_mla`, SGLang's V4 cache): a key's
  no-rotary part in FP8 e4m3 with one power-of-two scale per tile of 64 values (ue8m0: one byte, stored as its
  biased exponent), its rotary part (`rotary` trailing values, which the position makes large and precise) in
  bf16; V3.2's and V4's indexer keys (no part kept apart) all in FP8. A component whose values are not keys
  (V4's compressors' open windows: raw projections and gates, a constant few per sequence) stays `Plain` bf16.
  DeepSeek-V3's latent then costs 512 + 8 + 128 = 648 bytes per token and layer instead of 1,152 in bf16, V4's
  key 448 + 7 + 128 = 583 (SGLang pads its scales to 8: 584).

Why power-of-two scales: e4m3 holds 3 mantissa bits whatever the scale, so scaling by the exact amax / 448
gains at most the top half-binade of range, and a power of two makes dequantisation exact in bf16
(e4m3 x 2^e is a bf16 value): reading a component gives the same bits in bf16 or fp32. Scales per tile of
64 values, not per token: an outlier channel then costs precision in its own tile only.

Reads dequantise only the rows gathered (a decoding step's context, the k latents a sparse step picked), never
the whole component; writes quantise the new rows and, asked (`stored=True`), give them back as stored, so an
attention that reads its new tokens from its inputs (V4's window) sees exactly what later steps will. A layer
writes and reads a component in one `update` (one C pass for FP8 on a CPU; the reads first for a ring whose new
rows may take the slots it reads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from qiusuo.quant.kernels import Fp8Rows

KV_CACHE_DTYPES = ("auto", "bf16", "fp8")  # the command line's choices (`fp32` too, from the Python API)
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # e4m3's largest finite value
TILE = 64  # values per scale, at most (a power of two dividing the quantised width)
_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
          "fp16": torch.float16, "float16": torch.float16}


def _tile(width: int) -> int:
    """Values per scale for a quantised part of `width` values: the largest power of two <= TILE dividing it."""
    return math.gcd(TILE, width) if width else TILE


def flat_index(index: tuple[torch.Tensor, ...], dims: tuple[int, ...]) -> torch.Tensor:
    """One index into the rows of a (*dims, width) tensor viewed as (rows, width), from one tensor per leading dim
    (broadcast together): (state, slot) -> the row of the flattened ring. A gather by one index is one
    index_select (or one C pass), where indexing by two was ~10 torch ops."""
    if len(index) == 1:
        return index[0]
    index = torch.broadcast_tensors(*index)
    flat = index[0]
    for i, d in zip(index[1:], dims[1:]):
        flat = flat * d + i
    return flat


class Plain:
    """A component in one dtype: rows of `width` values in a tensor of shape (*shape, width)."""

    def __init__(self, shape: tuple[int, ...], width: int, dtype: torch.dtype, device, fill: float = 0.0):
        self.values = torch.full((*shape, width), fill, dtype=dtype, device=device)
        self.width, self.dtype = width, dtype
        self.flat = self.values.view(math.prod(shape), width)  # (rows, width), what `flat_index` addresses

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Every tensor it owns (for snapshots of a sequence state, and tests)."""
        return [self.values]

    def write(self, index: tuple[torch.Tensor, ...], rows: torch.Tensor, stored: bool = False) -> torch.Tensor | None:
        """rows (*index shape, width) to the positions `index` (one tensor per leading dim, broadcast together);
        index_put_, which inductor lowers to an in-place store (see `qiusuo.cache.pool.BlockPool`). With `stored`:
        the rows as reads will return them."""
        at = flat_index(index, self.values.shape[:-1]).reshape(-1)
        self.flat.index_put_((at,), rows.reshape(at.shape[0], self.width).to(self.dtype))
        return rows.to(self.dtype) if stored else None

    def read(self, index: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(*index shape, width) the rows at `index`."""
        flat = flat_index(index, self.values.shape[:-1])
        return self.flat.index_select(0, flat.reshape(-1)).view(*flat.shape, self.width)

    def update(self, write: tuple[torch.Tensor, ...], rows: torch.Tensor, read: tuple[torch.Tensor, ...],
               read_first: bool = False, stored: bool = False) -> torch.Tensor:
        """`write` then `read` (or the read first): the rows read (*read shape, width), with `stored` each read
        row's group (read's first dim) followed by its new rows as stored: (groups, n + T, width)."""
        return update_by_parts(self, write, rows, read, read_first, stored)


def update_by_parts(comp: "Plain | Fp8Tiles", write: tuple[torch.Tensor, ...], rows: torch.Tensor,
                    read: tuple[torch.Tensor, ...], read_first: bool, stored: bool) -> torch.Tensor:
    """A component's `update` as its read and write: what a plain component does, and an FP8 one where the C pass
    does not serve (the formulation the C pass is held to)."""
    old = comp.read(read) if read_first else None
    new = comp.write(write, rows, stored)
    old = old if read_first else comp.read(read)
    return torch.cat([old, new], 1) if stored else old


class Fp8Tiles:
    """A key component in FP8: the first `width - rotary` values in e4m3, one ue8m0 scale (a biased exponent,
    uint8) per tile of `_tile` values, the last `rotary` values in bf16. Reads return `dtype` (bf16, or float32 for
    a float32 model: the same values, each exact in bf16, without a conversion pass in the attention)."""

    def __init__(self, shape: tuple[int, ...], width: int, rotary: int, device, dtype: torch.dtype = torch.bfloat16):
        q = width - rotary
        self.width, self.q, self.tile = width, q, _tile(q)
        self.codes = torch.zeros(*shape, q, dtype=FP8, device=device)
        self.exps = torch.zeros(*shape, q // self.tile, dtype=torch.uint8, device=device)  # 2^(e - 127)
        self.rot = torch.zeros(*shape, rotary, dtype=torch.bfloat16, device=device)
        self.dtype = dtype  # what reads return
        n = self.codes.shape[:-1].numel()
        # the tensors viewed as (rows, values), the rows `flat_index` addresses, bound to the C passes once
        self._c = Fp8Rows(self.codes.view(torch.uint8).view(n, q), self.exps.view(n, q // self.tile),
                          self.rot.view(n, rotary), dtype)

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.exps, self.rot]

    def quantise(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """rows (..., width) -> (codes (..., q) e4m3, biased exponents (..., q / tile) uint8, rotary (..., r) bf16):
        the smallest power-of-two scale that brings each tile's largest magnitude within e4m3's range."""
        x = rows[..., : self.q].float()
        tiles = x.unflatten(-1, (-1, self.tile))  # (..., n_tiles, tile)
        amax = tiles.abs().amax(-1).clamp_min(2.0**-100)  # (..., n_tiles)
        m, k = torch.frexp(amax / FP8_MAX)  # exactly ceil(log2(.)), where log2's rounding can miss an integer
        e = (k - (m == 0.5).to(k.dtype)).clamp(-127, 127).float()
        scaled = (tiles * torch.exp2(-e)[..., None]).clamp(-FP8_MAX, FP8_MAX)
        return scaled.flatten(-2).to(FP8), (e + 127).to(torch.uint8), rows[..., self.q:].to(torch.bfloat16)

    def dequantise(self, codes: torch.Tensor, exps: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """The stored parts of rows (..., q), (..., q / tile), (..., r) -> (..., width) in `dtype`."""
        scale = torch.exp2(exps.to(torch.float32) - 127)  # (..., n_tiles)
        vals = codes.to(torch.float32).unflatten(-1, (-1, self.tile)) * scale[..., None]  # exact in bf16
        return torch.cat([vals.flatten(-2).to(self.dtype), rot.to(self.dtype)], -1)

    def write(self, index: tuple[torch.Tensor, ...], rows: torch.Tensor, stored: bool = False) -> torch.Tensor | None:
        """rows (*index shape, width) to `index` (one tensor per leading dim, broadcast together): on a CPU one C
        pass (`kernels.Fp8Rows`), else `quantise` and three index_put_. With `stored`: the rows as reads will
        return them (from the same pass)."""
        flat = flat_index(index, self.codes.shape[:-1])
        done = self._c.update(rows.reshape(-1, self.width), flat.reshape(-1), None, stored=stored)
        if done is not None:
            return done.view(rows.shape) if stored else None
        parts, at = self.quantise(rows), flat.reshape(-1)
        for t, part in zip(self._c.tensors, parts):  # the (rows, values) views `flat` indexes
            t.index_put_((at,), part.reshape(at.shape[0], t.shape[-1]).view(t.dtype))
        return self.dequantise(*parts) if stored else None

    def read(self, index: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """(*index shape, width) the rows at `index` (one tensor per leading dim, broadcast together); on a CPU
        one C pass over the rows' bytes (`kernels.Fp8Rows`), else gathers and `dequantise`."""
        flat = flat_index(index, self.codes.shape[:-1])
        at = flat.reshape(-1)
        rows = self._c.update(None, None, at)
        if rows is not None:
            return rows.view(*flat.shape, self.width)
        parts = [t.index_select(0, at).view(*flat.shape, t.shape[-1]) for t in self._c.tensors]
        return self.dequantise(parts[0].view(FP8), *parts[1:])

    def update(self, write: tuple[torch.Tensor, ...], rows: torch.Tensor, read: tuple[torch.Tensor, ...],
               read_first: bool = False, stored: bool = False) -> torch.Tensor:
        """As `Plain.update`, in one C pass on a CPU (one call where a read and a write were two, and no
        concatenation)."""
        dims = self.codes.shape[:-1]
        w, r = flat_index(write, dims), flat_index(read, dims)
        out = self._c.update(rows.reshape(-1, self.width), w.reshape(-1), r.reshape(-1), r.shape[0] if stored else 1,
                             read_first, stored)
        if out is None:
            return update_by_parts(self, write, rows, read, read_first, stored)
        return out.view(r.shape[0], -1, self.width) if stored else out.view(*r.shape, self.width)

    def roundtrip(self, rows: torch.Tensor) -> torch.Tensor:
        """rows (..., width) as the cache would return them, without a slot (the definition: torch ops)."""
        return self.dequantise(*self.quantise(rows))


@dataclass(frozen=True)
class CacheDtype:
    """The cache's precision: `plain` for everything (fp8=False), or FP8 keys with their rotary parts and the
    non-key components in `plain` (bf16), the keys read as `read` (the model's float32, else bf16)."""

    plain: torch.dtype
    fp8: bool = False
    read: torch.dtype = torch.bfloat16

    @staticmethod
    def of(choice: "CacheDtype | torch.dtype | str | None", model_dtype: torch.dtype = torch.float32) -> "CacheDtype":
        """`auto` (or None: the model's dtype), `bf16`, `fp32`, `fp8`, a torch dtype, or a CacheDtype."""
        if isinstance(choice, CacheDtype):
            return choice
        if choice is None or choice == "auto":
            return CacheDtype(model_dtype)
        if isinstance(choice, torch.dtype):
            if not choice.is_floating_point or choice.itemsize < 2:
                raise ValueError(f"a cache dtype must be a 16- or 32-bit float, got {choice}; for FP8 caches pass "
                                 "'fp8'")
            return CacheDtype(choice)
        if choice == "fp8":
            return CacheDtype(torch.bfloat16, fp8=True, read=torch.float32 if model_dtype == torch.float32
                              else torch.bfloat16)
        if choice in _NAMES:
            return CacheDtype(_NAMES[choice])
        raise ValueError(f"unknown kv cache dtype {choice!r}; choose one of {', '.join(KV_CACHE_DTYPES)} (or fp32)")

    @property
    def name(self) -> str:
        return "fp8" if self.fp8 else {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(self.plain, str(self.plain))

    def key(self, shape: tuple[int, ...], width: int, rotary: int, device) -> Plain | Fp8Tiles:
        """A key-like component (latents, keys, compressed entries): FP8 tiles under fp8, else plain."""
        if self.fp8 and width > rotary:
            return Fp8Tiles(shape, width, rotary, device, self.read)
        return Plain(shape, width, self.plain, device)

    def state(self, shape: tuple[int, ...], width: int, device, fill: float = 0.0) -> Plain:
        """A component kept whole (V4's compressors' open windows)."""
        return Plain(shape, width, self.plain, device, fill)

    def key_bytes(self, width: int, rotary: int) -> int:
        """Bytes one row of a key component of `width` values (the last `rotary` kept apart) takes."""
        if not self.fp8 or width == rotary:
            return width * self.plain.itemsize
        q = width - rotary
        return q + q // _tile(q) + 2 * rotary

    def state_bytes(self, width: int) -> int:
        return width * self.plain.itemsize
