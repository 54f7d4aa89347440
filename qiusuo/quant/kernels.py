"""Quantised matmuls for CPU decoding: y = x @ W.T with W read once in its packed form (and, with the same build,
the FP8 cache's gather-and-dequantise and quantise-and-scatter, `Fp8Rows`).

At decode batch sizes (1-16 rows) a matmul should be memory-bound: its cost is reading the weight. torch 2.13's CPU
kernels read packed weights slower than fp32 ones (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`; figures in
docs/quant.md), so kernels.c does it: compiled here on first use, loaded with ctypes, and exposed as torch custom ops
that a compiled model calls without a graph break.

Layouts (W is (N, K) = (out, in) features, row-major, K a multiple of 32; experts add a leading E dimension;
qiusuo/quant/formats.py writes them):
- "bf16":  q bfloat16 (or its bits as uint16/int16) (N, K), no scale.
- "int8":  q int8 (N, K), scale float32 (N,): w = q * scale[n].
- "int4":  q uint8 (N, K/2), byte j = column 2j (low nibble), 2j + 1 (high nibble); scale bfloat16 (N, K/G),
           G = `group`: w = (nibble - 8) * scale[n, k // G].
- "mxfp4": q uint8 (N, K/2), the same nibbles as e2m1 codes (qiusuo/quant/fp4.py); scale uint8 / float8_e8m0fnu
           (N, K/32): w = e2m1(code) * 2^(scale - 127).
- "fp8":   q uint8 / float8_e4m3fn (N, K); scale float32 (ceil(N/B), ceil(K/B)), B = `block`, edge blocks partial:
           w = e4m3(q) * scale[n // B, k // B].

Arithmetic, chosen per call by `act`:
- "fp32": x stays float32, the weight's codes (int8 q, int4 nibble - 8, fp8's e4m3 value) are converted exactly to
  float32 and multiplied into float32 accumulators, and a scale multiplies the sum of its group once:
  y = sum_g s_g (sum_{k in g} q_k x_k), g an int4 group of G inputs, the B inputs of an fp8 block in a row, or
  (int8) the whole row. That is x @ W.T up to rounding: one more rounding per term than the dequantised weight
  times x (the scale's), still within gamma_{K+1} (|x| @ |W|.T) of the exact sum (u = 2^-24; tests/quant/
  test_kernels.py derives it). It saves the per-weight multiply, and int4's -8 moves from the FMA pipes to the
  adders. mxfp4 keeps its scale in the 8-entry table it decodes through (exact: a power of two). bf16 has no scale.
- "q8" (int8, int4 with G a multiple of 32, mxfp4), as llama.cpp decodes: each row of x is quantised to int8 per
  block of 32 inputs (Q8_0: d = max|x| / 127 in float32, codes round(x / d), half to even; `quantize_q8`), the
  block's dot product with the weight's integer codes (`q8_codes`: int8 q, int4 nibble - 8, mxfp4 2 e2m1 in
  [-12, 12]) is an exact integer (AVX2 maddubs + madd, or vpdpbusd on AVX-VNNI / AVX512-VNNI targets), and the
  block sums are scaled by d * s (s the weight's scale for the block, mxfp4's halved) in float32: within
  gamma_{K/32+1} sum_b |d_b s_b P_b| of the same arithmetic done exactly. Why: with float32 x the 4-bit loop is
  compute-bound (unpacking, converting and FMAs per weight) well below the memory's rate on a few cores, while
  integer products of 32 codes at once keep up with it. What it changes is x (half a step of 1/127 of its block's
  largest value); docs/quant.md gives what that costs in y and in bits per byte.

`dequantize` (and `q8_codes`, `quantize_q8`) are the slow, obviously-correct twins; the fallback (no compiler,
tensors off the CPU or not contiguous, an int4 group or fp8 block not a multiple of 16, or QIUSUO_KERNELS=0) is
x @ dequantize(rows).T, BAND rows at a time, or for q8 the blocks' integer dot products in float64 (exact).

Threads. kernels.c is built with -fopenmp and so links libgomp.so.1; torch's wheel has loaded its own libgomp.so.1
(torch/lib) first, and the dynamic loader resolves ours to that one: one OpenMP runtime and one thread pool per
calling thread for both (tests/quant/test_kernels.py checks that one libgomp is mapped). The thread count travels
with each call, as torch.get_num_threads(): OpenMP's count is per calling thread, and a thread that has not run a
torch op yet still has OpenMP's default of one per core. ctypes releases the GIL for the call.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import uuid
from pathlib import Path

import torch
from torch import Tensor

from qiusuo.quant.fp4 import E2M1
from qiusuo.quant.fp8 import decode_scale
from qiusuo.runtime import cache_dir, cpu_flags

FORMATS = ("bf16", "int8", "int4", "mxfp4", "fp8")
ACTS = ("fp32", "q8")  # activation arithmetic: float32 x, or x quantised to int8 per block of Q8_BLOCK (Q8_0)
Q8_FORMATS = ("int8", "int4", "mxfp4")  # the weight formats whose codes are small integers: the q8 path's
MX_GROUP = 32  # mxfp4's inputs per scale, fixed by the format
Q8_BLOCK = 32  # inputs per scale of quantised x
BAND = 256  # rows the fallback dequantises at a time: 256 * K * 4 bytes of scratch, not N * K * 4
SOURCE = Path(__file__).with_name("kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
_PACKED = {"bf16": (torch.bfloat16, torch.uint16, torch.int16), "int8": (torch.int8,),
           "int4": (torch.uint8, torch.int8), "mxfp4": (torch.uint8, torch.int8, torch.float4_e2m1fn_x2),
           "fp8": (torch.uint8, torch.int8, torch.float8_e4m3fn)}
_SCALE = {"int8": (torch.float32,), "int4": (torch.bfloat16, torch.uint16, torch.int16),
          "mxfp4": (torch.uint8, torch.float8_e8m0fnu), "fp8": (torch.float32,)}


# ---- the layouts, checked once for every path ----

def _shape(fmt: str, q: Tensor, scale: Tensor | None, group: int, block: int, lead: int) -> tuple[int, int]:
    """(N, K) of a weight in `fmt` with `lead` leading (expert) dimensions, after checking q and scale against it."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}: one of {FORMATS}")
    if q.dim() != 2 + lead:
        raise ValueError(f"{fmt} weight has shape {tuple(q.shape)}: expected {2 + lead} dims "
                         f"({'(E, N, K)' if lead else '(N, K)'}, K halved for packed nibbles)")
    if q.dtype not in _PACKED[fmt]:
        raise ValueError(f"{fmt} weight of dtype {q.dtype}: expected one of {_PACKED[fmt]}")
    N, K = q.shape[-2], q.shape[-1] * (2 if fmt in ("int4", "mxfp4") else 1)
    if K % 32:
        raise ValueError(f"{fmt} weight {tuple(q.shape)} has K = {K} inputs, not a multiple of 32")
    if fmt == "bf16":
        if scale is not None:
            raise ValueError("bf16 weights have no scale: pass scale=None")
        return N, K
    if scale is None or scale.dtype not in _SCALE[fmt]:
        raise ValueError(f"{fmt} needs a scale of dtype {_SCALE[fmt]}, got {None if scale is None else scale.dtype}")
    if fmt == "int4" and (group <= 0 or K % group):
        raise ValueError(f"int4 group {group} does not divide K = {K}")
    if fmt == "mxfp4" and group != MX_GROUP:
        raise ValueError(f"mxfp4 has one scale per {MX_GROUP} inputs by definition, got group={group}")
    if fmt == "fp8" and block <= 0:
        raise ValueError(f"fp8 block must be positive, got {block}")
    want = {"int8": (N,), "int4": (N, K // group), "mxfp4": (N, K // MX_GROUP),
            "fp8": (-(-N // block), -(-K // block))}[fmt]
    if tuple(scale.shape) != (*q.shape[:lead], *want):
        raise ValueError(f"{fmt} scale has shape {tuple(scale.shape)}; weight {tuple(q.shape)} needs "
                         f"{(*q.shape[:lead], *want)}")
    return N, K


def default_act(fmt: str, group: int = 32) -> str:
    """The activation arithmetic a packed layer decodes with unless told otherwise: "q8" where the format allows it
    (its codes are small integers with one scale per 32 inputs or more), "fp32" elsewhere."""
    return "q8" if fmt in Q8_FORMATS and (fmt != "int4" or (group or 32) % Q8_BLOCK == 0) else "fp32"


def _check_act(act: str, fmt: str, group: int) -> None:
    if act not in ACTS:
        raise ValueError(f"unknown activation arithmetic act={act!r}: one of {ACTS}")
    if act == "q8" and fmt not in Q8_FORMATS:
        raise ValueError(f"act='q8' is for integer weight codes ({', '.join(Q8_FORMATS)}), not {fmt}")
    if act == "q8" and fmt == "int4" and group % Q8_BLOCK:
        raise ValueError(f"act='q8' needs int4 groups that are a multiple of {Q8_BLOCK} (one weight scale per block "
                         f"of x), got group={group}")


# ---- the slow twins ----

def dequantize(fmt: str, q: Tensor, scale: Tensor | None, group: int = 32, block: int = 128,
               rows: slice | None = None) -> Tensor:
    """q (..., N, K or K/2) -> float32 (..., n, K), n the rows in `rows` (a slice of 0..N with step 1; all if None),
    element by element from the layout's definition in plain torch."""
    N, K = _shape(fmt, q, scale, group, block, q.dim() - 2)
    n0, n1, step = (rows or slice(None)).indices(N)
    if step != 1:
        raise ValueError(f"rows must be a contiguous slice, got step {step}")
    qr = q[..., n0:n1, :]
    if fmt == "bf16":
        return qr.view(torch.bfloat16).float()
    if fmt == "int8":
        return qr.float() * scale[..., n0:n1, None]
    if fmt == "fp8":
        s = scale.repeat_interleave(block, -2)[..., n0:n1, :].repeat_interleave(block, -1)[..., :K]
        return qr.view(torch.float8_e4m3fn).float() * s
    u = qr.view(torch.uint8)
    codes = torch.stack((u & 15, u >> 4), -1).flatten(-2).long()  # column 2j from the low nibble of byte j
    if fmt == "int4":
        return (codes - 8).float() * scale[..., n0:n1, :].view(torch.bfloat16).float().repeat_interleave(group, -1)
    return E2M1.to(q.device)[codes] * decode_scale(scale[..., n0:n1, :]).repeat_interleave(MX_GROUP, -1)


def quantize_q8(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (M, K) float32 -> (codes int8 (M, K), scales float32 (M, K / 32)), llama.cpp's Q8_0: per block of 32 inputs
    d = max|x| / 127 and codes round(x / d), half to even (0 where d = 0): the C kernels' quantisation, bit for bit."""
    xb = x.reshape(x.shape[0], -1, Q8_BLOCK)
    d = xb.abs().amax(-1) / 127
    codes = torch.where(d[..., None] > 0, torch.round(xb / d[..., None]), 0)
    return codes.to(torch.int8).reshape(x.shape), d


def q8_codes(fmt: str, q: Tensor, scale: Tensor, group: int = 32, rows: slice | None = None) -> tuple[Tensor, Tensor]:
    """The integer codes (..., n, K) int8 and per-32-block scales (..., n, K / 32) float32 of a weight in one of
    Q8_FORMATS, w = code * scale[k // 32]: int8 q and its row scale, int4 nibble - 8 and its group's scale, mxfp4
    2 e2m1 (integers in [-12, 12]) and half its e8m0 scale (exact)."""
    N, K = _shape(fmt, q, scale, group, 128, q.dim() - 2)
    n0, n1, _ = (rows or slice(None)).indices(N)
    qr, sr = q[..., n0:n1, :], scale[..., n0:n1] if fmt == "int8" else scale[..., n0:n1, :]
    if fmt == "int8":
        return qr, sr[..., None].expand(*sr.shape, K // Q8_BLOCK)
    u = qr.view(torch.uint8)
    nib = torch.stack((u & 15, u >> 4), -1).flatten(-2).long()
    if fmt == "int4":
        return (nib - 8).to(torch.int8), sr.view(torch.bfloat16).float().repeat_interleave(group // Q8_BLOCK, -1)
    return (2 * E2M1.to(q.device)[nib]).to(torch.int8), decode_scale(sr) / 2


def _mm_torch(x: Tensor, fmt: str, q: Tensor, scale: Tensor | None, group: int, block: int, act: str) -> Tensor:
    N = q.shape[-2]
    y = x.new_empty(x.shape[0], N)
    if act == "q8":  # block dot products of codes, exact in float64, then their scales, in float64
        cx, dx = quantize_q8(x)
        cx = cx.double().reshape(x.shape[0], -1, Q8_BLOCK).transpose(0, 1)  # (nb, M, 32)
    for n0 in range(0, N, BAND):
        rows = slice(n0, n0 + BAND)
        if act == "fp32":
            y[:, rows] = x @ dequantize(fmt, q, scale, group, block, rows).T
            continue
        cw, sw = q8_codes(fmt, q, scale, group, rows)
        cw = cw.double().reshape(cw.shape[0], -1, Q8_BLOCK).permute(1, 2, 0)  # (nb, 32, n)
        dots = torch.bmm(cx, cw)  # (nb, M, n)
        y[:, rows] = torch.einsum("bmn,mb,nb->mn", dots, dx.double(), sw.double()).float()
    return y


# ---- building and loading kernels.c ----

def _compiler() -> list[str] | None:
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    cc = shutil.which("gcc") or shutil.which("cc")
    return [cc] if cc else None


class _BuildError(Exception):
    pass


def _build(extra: tuple[str, ...]) -> Path:
    """Compile kernels.c (once per source, compiler, flags and CPU) into the cache folder; the library's path."""
    cc = _compiler()
    if cc is None:
        raise _BuildError("no C compiler: neither $CC, gcc nor cc is on this machine")
    flags = [*FLAGS, *extra]
    try:
        version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise _BuildError(f"cannot run the C compiler {shlex.join(cc)}: {e}") from e
    try:
        source = SOURCE.read_text()
    except OSError as e:  # a wheel built without the package data
        raise _BuildError(f"cannot read the kernels' source: {e}") from e
    key = "\0".join([source, shlex.join(cc), version, *flags, *sorted(cpu_flags())])
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    folder = cache_dir()
    path = folder / f"quant_kernels-{key}.so"
    if path.exists():
        return path
    tmp = folder / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    cmd = [*cc, *flags, "-o", str(tmp), str(SOURCE)]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise _BuildError(f"{shlex.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(tmp, path)  # atomic: a concurrent build of the same key writes the same bytes
    except (OSError, subprocess.SubprocessError) as e:
        raise _BuildError(f"{shlex.join(cmd)}: {e}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


@functools.lru_cache(maxsize=None)
def _load(extra: tuple[str, ...] = ()) -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) or (None, why not); built with FLAGS + extra (the tests add -DQS_SCALAR)."""
    try:
        lib = ctypes.CDLL(str(_build(extra)))
    except _BuildError as e:
        return None, str(e)
    except OSError as e:
        return None, f"built but could not load: {e}"
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.qs_grouped_mm.argtypes = [ctypes.c_int, ctypes.c_int, ptr, i64, i64, i64, i64, ptr, ptr, ptr, i64, i64, ptr,
                                  ctypes.c_int]
    lib.qs_grouped_mm.restype = ctypes.c_int
    lib.qs_simd.restype = ctypes.c_int
    lib.qs_vnni.restype = ctypes.c_int
    for name in ("qs_grouped_mm_a", "qs_fp8_update_a"):  # argument blocks (`_block`)
        getattr(lib, name).restype = ctypes.c_int
    return lib, None


def available() -> bool:
    """The C kernels are built and loaded (whatever QIUSUO_KERNELS says)."""
    return _load()[0] is not None


def build_error() -> str | None:
    """Why the C kernels are not available, or None."""
    return _load()[1]


def _library(fmt: str, group: int, block: int, *tensors: Tensor | None) -> ctypes.CDLL | None:
    """The C library when it serves this call: built, not switched off (QIUSUO_KERNELS=0), every tensor on the CPU
    and contiguous, and the group / block a multiple of 16 (what the kernels step by)."""
    if (fmt == "int4" and group % 16) or (fmt == "fp8" and block % 16):
        return None
    return _cpu_library(*tensors)


def _cpu_library(*tensors: Tensor | None) -> ctypes.CDLL | None:
    """The C library when it serves a call on these tensors: built, not switched off (QIUSUO_KERNELS=0), every
    tensor on the CPU and contiguous."""
    if os.environ.get("QIUSUO_KERNELS", "1") == "0":
        return None
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or not t.is_contiguous()):
            return None
    return _load()[0]


def _run_c(lib: ctypes.CDLL, x: Tensor, counts: int, experts: int, fmt: str, q: Tensor, scale: Tensor | None,
           group: int, block: int, act: str = "fp32") -> Tensor:
    """One call of kernels.c for `experts` experts whose row counts (int64) are at address `counts` (one expert for a
    plain matmul); ctypes releases the GIL for the call."""
    R, K = x.shape
    y = torch.empty(R, q.shape[-2], dtype=torch.float32)
    rc = lib.qs_grouped_mm(FORMATS.index(fmt), ACTS.index(act), x.data_ptr(), R, K, q.shape[-2], experts, counts,
                           q.data_ptr(),
                           None if scale is None else scale.data_ptr(), group, block, y.data_ptr(),
                           torch.get_num_threads())
    if rc:
        raise RuntimeError(f"qs_grouped_mm refused {fmt} act={act} x {tuple(x.shape)} q {tuple(q.shape)} (or ran out "
                           "of memory)")
    return y


def _check_x(x: Tensor, K: int) -> None:
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"x must be float32 (rows, {K}), got {x.dtype} {tuple(x.shape)}")


def _mm(x: Tensor, fmt: str, q: Tensor, scale: Tensor | None, group: int, block: int, act: str) -> Tensor:
    N, K = _shape(fmt, q, scale, group, block, 0)
    _check_act(act, fmt, group)
    _check_x(x, K)
    lib = _library(fmt, group, block, x, q, scale)
    if lib is None:
        return _mm_torch(x, fmt, q, scale, group, block, act)
    rows = ctypes.c_int64(x.shape[0])
    return _run_c(lib, x, ctypes.addressof(rows), 1, fmt, q, scale, group, block, act)


def _grouped_mm(xs: Tensor, counts: Tensor, fmt: str, q: Tensor, scale: Tensor | None, group: int,
                block: int, act: str) -> Tensor:
    N, K = _shape(fmt, q, scale, group, block, 1)
    _check_act(act, fmt, group)
    _check_x(xs, K)
    if counts.dim() != 1 or counts.numel() != q.shape[0]:
        raise ValueError(f"counts {tuple(counts.shape)} must hold one row count per expert ({q.shape[0]})")
    counts = counts.to("cpu", torch.int64).contiguous()
    if counts.numel() and (counts.min() < 0 or counts.sum() != xs.shape[0]):
        raise ValueError(f"counts {counts.tolist()} must be >= 0 and sum to the {xs.shape[0]} rows of xs")
    lib = _library(fmt, group, block, xs, q, scale)
    if lib is not None:
        return _run_c(lib, xs, counts.data_ptr(), counts.numel(), fmt, q, scale, group, block, act)
    y = xs.new_empty(xs.shape[0], N)
    r0 = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            y[r0:r0 + c] = _mm_torch(xs[r0:r0 + c], fmt, q[e], None if scale is None else scale[e], group, block, act)
        r0 += c
    return y


def _block(*args: int | None) -> ctypes.Array:
    """The arguments of a C entry taking them as one int64 array (kernels.c, "argument blocks"), plus one spare
    int64 a call may point at: those that do not change are set once, a call sets the rest and passes one pointer.
    Why: ctypes converts each argument of a call through its `argtypes`, and for a dozen arguments that cost more
    than a short call's work right after a large matmul had flushed the caches, as in every decoding step
    (docs/quant.md). A block belongs to one bound weight or cache component, which one thread at a time calls
    (the decoding loop's: the engine's thread or `generate`'s), so no other thread refills it during a call; the
    calls release the GIL (holding it decoded slower)."""
    return (ctypes.c_int64 * (len(args) + 1))(*[a or 0 for a in args])


class Bound:
    """One packed matrix, or a bank of them (experts), bound to the C kernels: the checks `mm` and `grouped_mm`
    make of the weight on every call (shapes, dtypes, format, activation arithmetic, the library) made once, so an
    eager decoding call is an output allocation and one ctypes call. Why: a decoding step makes one call per packed
    layer (~70 at the 760M shape), and those checks in Python cost more than a small layer's arithmetic. Same
    kernel, same bytes out as the checked calls (tests/quant/test_kernels.py). Holds the tensors it points into, so
    a module rebinds when its buffers are replaced (`is_for`). Without the library (or with QIUSUO_KERNELS=0 when
    bound) it calls the checked path."""

    def __init__(self, fmt: str, q: Tensor, scale: Tensor | None, group: int = 32, block: int = 128,
                 act: str = "fp32"):
        self.lead = q.dim() - 2
        if self.lead not in (0, 1):
            raise ValueError(f"{fmt} weight of shape {tuple(q.shape)}: a matrix (N, K) or a bank (E, N, K)")
        self.N, self.K = _shape(fmt, q, scale, group, block, self.lead)
        _check_act(act, fmt, group)
        self.fmt, self.q, self.scale, self.group, self.block, self.act = fmt, q, scale, group, block, act
        lib = _library(fmt, group, block, q, scale)
        self._fn = None if lib is None else lib.qs_grouped_mm_a
        # qs_grouped_mm's arguments: fmt, act, x, M, K, N, experts, counts, q, scale, group, block, y, threads
        self._args = _block(FORMATS.index(fmt), ACTS.index(act), 0, 0, self.K, self.N, 1, 0, q.data_ptr(),
                            None if scale is None else scale.data_ptr(), group, block, 0, 1)
        self._one = ctypes.addressof(self._args) + 8 * 14  # the spare int64: a plain matmul's one row count

    def is_for(self, q: Tensor, scale: Tensor | None, act: str) -> bool:
        return self.q is q and self.scale is scale and self.act == act

    def __call__(self, x: Tensor, counts: Tensor | None = None) -> Tensor:
        """x (M, K) float32 contiguous on the CPU -> (M, N) float32; a bank takes `counts` (E,) int64, rows per
        expert (x sorted by expert)."""
        if self._fn is None or torch.compiler.is_compiling():
            if counts is None:
                return mm(x, self.fmt, self.q, self.scale, self.group, self.block, self.act)
            return grouped_mm(x, counts, self.fmt, self.q, self.scale, self.group, self.block, self.act)
        M = x.shape[0]
        if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != self.K or not x.is_contiguous():
            raise ValueError(f"x must be contiguous float32 (rows, {self.K}), got {x.dtype} {tuple(x.shape)}")
        y = torch.empty(M, self.N, dtype=torch.float32)
        a = self._args
        if counts is None:
            a[14], a[6], a[7] = M, 1, self._one
        else:
            counts = counts.to(torch.int64).contiguous()
            if counts.numel() != self.q.shape[0]:
                raise ValueError(f"counts {tuple(counts.shape)} must hold one row count per expert ({self.q.shape[0]})")
            a[6], a[7] = counts.numel(), counts.data_ptr()
        a[2], a[3], a[12], a[13] = x.data_ptr(), M, y.data_ptr(), torch.get_num_threads()
        if self._fn(a):
            raise RuntimeError(f"qs_grouped_mm refused {self.fmt} act={self.act} x {tuple(x.shape)} q "
                               f"{tuple(self.q.shape)}" + ("" if counts is None else f" counts {counts.tolist()} "
                                                           "(they must sum to the rows of x)") + " or ran out of memory")
        return y

    def __deepcopy__(self, memo):
        return None  # a copied module binds its own copies of the weights on its first call

    def __reduce__(self):
        return type(None), ()  # a pickled weight (kept on it by `bound`) binds again where it is loaded


def bound(fmt: str, q: Tensor, scale: Tensor | None, group: int, block: int, act: str) -> Bound:
    """The `Bound` of (q, scale) kept on the weight tensor q itself, made on the first call: what the custom ops
    (a compiled graph's calls) reuse. Why on the tensor: a compiled graph hands the op the module's own buffers
    (the same Python objects every step) but not the module, and checking the weight on every call (`mm`'s and
    `grouped_mm`'s shapes, formats and row counts, ~25 small torch ops) cost several times a decode-sized
    layer's arithmetic."""
    b = getattr(q, "_qiusuo_bound", None)
    if b is None or not b.is_for(q, scale, act) or (b.fmt, b.group, b.block) != (fmt, group, block):
        b = Bound(fmt, q, scale, group, block, act)
        q._qiusuo_bound = b
    return b


class Fp8Rows:
    """An FP8 cache component's storage (`qiusuo.cache.precision.Fp8Tiles`'s layout) bound to the C pass: codes
    (S, q) e4m3 bytes, exps (S, q / tile) biased exponents, rot (S, r) bf16, rows read as `dtype` (float32 or
    bfloat16: the same values either way). One call quantises and scatters new rows, gathers and dequantises rows
    read, or both in either order (`update`). Everything about the storage is checked once here, as `Bound` does for
    weights, and a call checks only its own tensors: a decoding step reads and writes every layer's components, and
    each torch call costs tens of microseconds right after a large matmul has flushed the caches. A call returns
    None where the C kernels do not serve it (off the CPU, while compiling, QIUSUO_KERNELS=0 when bound, an index
    that is not contiguous int64): the caller's torch formulation then, which is the reference
    (tests/cache/test_precision.py)."""

    def __init__(self, codes: Tensor, exps: Tensor, rot: Tensor, dtype: torch.dtype):
        self.tensors = (codes, exps, rot)  # held: the library points into them
        self.S, self.q = codes.shape
        self.r, self.tile = rot.shape[1], self.q // max(1, exps.shape[1])
        self.width, self.dtype = self.q + self.r, dtype
        serves = codes.dtype == torch.uint8 and dtype in (torch.float32, torch.bfloat16)
        lib = _cpu_library(codes, exps, rot) if serves else None  # QIUSUO_KERNELS read now
        self._fn = None if lib is None else lib.qs_fp8_update_a
        # codes, exps, rot, S, q, tile, r, bf16, rows, n_new, widx, ridx, n_read, groups, read_first, stored, out,
        # threads (kernels.c, qs_fp8_update_a)
        self._args = _block(*[t.data_ptr() for t in self.tensors], self.S, self.q, self.tile, self.r,
                            int(dtype == torch.bfloat16), 0, 0, 0, 0, 0, 1, 0, 0, 0, 1)

    def update(self, rows: Tensor | None, write: Tensor | None, read: Tensor | None, groups: int = 1,
               read_first: bool = False, stored: bool = False) -> Tensor | bool | None:
        """rows (n_new, q + r) quantised into slots `write` (n_new,), slots `read` (n_read,) read back, the reads
        first or last. Returns (n_read [+ n_new], q + r) in `dtype`: in `groups` groups, each group's rows read then,
        with `stored`, its new rows as now stored; True for a write alone."""
        if self._fn is None or torch.compiler.is_compiling():
            return None
        a, n_new, n_read = self._args, 0, 0
        if write is not None:
            n_new = write.numel()
            if not _index(write) or not rows.is_cpu or rows.shape != (n_new, self.width):
                return None
            rows = rows.to(torch.float32).contiguous()  # exact: quantisation reads float32 whatever the model's dtype
            a[8], a[10] = rows.data_ptr(), write.data_ptr()
        if read is not None:
            if not _index(read):
                return None
            n_read, a[11] = read.numel(), read.data_ptr()
        wanted = read is not None or stored  # a tensor back, however few rows (none: a read of no slots)
        out = torch.empty(n_read + (n_new if stored else 0), self.width, dtype=self.dtype) if wanted else None
        a[9], a[12], a[13], a[14], a[15] = n_new, n_read, groups, int(read_first), int(stored)
        a[16], a[17] = 0 if out is None else out.data_ptr(), torch.get_num_threads()  # (0 for an empty tensor)
        rc = self._fn(a)
        if rc == -2:
            raise IndexError(f"cache slots out of range [0, {self.S})")
        if rc:
            raise RuntimeError(f"qs_fp8_update refused codes ({self.S}, {self.q}), tiles of {self.tile}, rotary "
                               f"{self.r}: {n_new} rows written, {n_read} read in {groups} groups")
        return True if out is None else out


def _index(index: Tensor) -> bool:
    """An index the C passes read as it is: contiguous int64 on the CPU."""
    return index.dtype == torch.int64 and index.is_cpu and index.is_contiguous()


# ---- the custom ops ----

# The custom ops are what a compiled graph calls (no graph break; the fake gives the output shape). Eager calls skip
# them: a call through the dispatcher into a Python kernel costs more than a decode-sized matmul's arithmetic on
# small layers. Defined through `torch.library.Library` with one CompositeExplicitAutograd kernel rather than
# `torch.library.custom_op`, whose wrapper layers cost ~60 us a call here against ~28 (a 64 x 64 int4 call, warm):
# the ops are inference-only (packed weights take no gradient; training through them runs `modules.packed_matmul`'s
# autograd Function eagerly), so they need no autograd formula.

_OPS = torch.library.Library("qiusuo", "FRAGMENT")  # the registrations live as long as this object
_OPS.define("quant_mm(Tensor x, str fmt, Tensor q, Tensor? scale, int group, int block, str act) -> Tensor")
_OPS.define("quant_grouped_mm(Tensor xs, Tensor counts, str fmt, Tensor q, Tensor? scale, int group, int block, "
            "str act) -> Tensor")


def _quant_mm(x: Tensor, fmt: str, q: Tensor, scale: Tensor | None, group: int, block: int, act: str) -> Tensor:
    return bound(fmt, q, scale, group, block, act)(x.contiguous())


def _quant_grouped_mm(xs: Tensor, counts: Tensor, fmt: str, q: Tensor, scale: Tensor | None, group: int,
                      block: int, act: str) -> Tensor:
    return bound(fmt, q, scale, group, block, act)(xs.contiguous(), counts)


_OPS.impl("quant_mm", _quant_mm, "CompositeExplicitAutograd")
_OPS.impl("quant_grouped_mm", _quant_grouped_mm, "CompositeExplicitAutograd")


@torch.library.register_fake("qiusuo::quant_mm", lib=_OPS)
def _(x, fmt, q, scale, group, block, act):
    return x.new_empty(x.shape[0], q.shape[-2])


@torch.library.register_fake("qiusuo::quant_grouped_mm", lib=_OPS)
def _(xs, counts, fmt, q, scale, group, block, act):
    return xs.new_empty(xs.shape[0], q.shape[-2])


def mm(x: Tensor, fmt: str, q: Tensor, scale: Tensor | None, group: int = 32, block: int = 128,
       act: str = "fp32") -> Tensor:
    """x (M, K) float32, W (N, K) in `fmt` -> x @ W.T, (M, N) float32; act="q8" (int8, int4, mxfp4) quantises x
    to int8 per block of 32 first (see the module docstring)."""
    if torch.compiler.is_compiling():
        return torch.ops.qiusuo.quant_mm(x, fmt, q, scale, group, block, act)
    return _mm(x, fmt, q, scale, group, block, act)


def grouped_mm(xs: Tensor, counts: Tensor, fmt: str, q: Tensor, scale: Tensor | None, group: int = 32,
               block: int = 128, act: str = "fp32") -> Tensor:
    """xs (R, K) float32, rows sorted by expert, counts (E,) int64 rows per expert, q/scale with a leading E ->
    (R, N): each expert's rows times its weight. One C call for all experts; only experts with rows are read."""
    if torch.compiler.is_compiling():
        return torch.ops.qiusuo.quant_grouped_mm(xs, counts, fmt, q, scale, group, block, act)
    return _grouped_mm(xs, counts, fmt, q, scale, group, block, act)
