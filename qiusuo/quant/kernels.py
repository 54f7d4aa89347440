"""Weight-only quantised matmuls for CPU decoding: y = x @ dequantised(W).T, W read once in its packed form.

At decode batch sizes (1-16 rows) a matmul should be memory-bound: its cost is reading the weight. torch 2.13's CPU
kernels read packed weights slower than fp32 ones (1 thread, W 4096 x 7168: fp32 `x @ w.t()` 20 GB/s of weights;
`_weight_int8pack_mm` 9 GB/s with bf16 x, 31 ms with fp32 x; `_weight_int4pack_mm_for_cpu` 2.6 GB/s of packed bytes
with bf16 x), so kernels.c does it: compiled here on first use, loaded with ctypes, and exposed as torch custom ops
that a compiled model calls without a graph break.

Layouts (W is (N, K) = (out, in) features, row-major, K a multiple of 32; experts add a leading E dimension;
qiusuo/quant/formats.py writes them):
- "bf16":  q bfloat16 (or its bits as uint16/int16) (N, K), no scale.
- "int8":  q int8 (N, K), scale float32 (N,): w = q * scale[n].
- "int4":  q uint8 (N, K/2), byte j = column 2j (low nibble), 2j + 1 (high nibble); scale bfloat16 (N, K/G),
           G = `group`: w = (nibble - 8) * scale[n, k // G].
- "mxfp4": q uint8 (N, K/2), the same nibbles as e2m1 codes (qiusuo/hf/fp4.py); scale uint8 / float8_e8m0fnu
           (N, K/32): w = e2m1(code) * 2^(scale - 127).
- "fp8":   q uint8 / float8_e4m3fn (N, K); scale float32 (ceil(N/B), ceil(K/B)), B = `block`, edge blocks partial:
           w = e4m3(q) * scale[n // B, k // B].

Arithmetic: weight-only. x stays float32; each weight is dequantised to its exact float32 value, bit for bit the one
`dequantize` gives, and multiplied into float32 accumulators, so results equal x @ dequantize(W).T up to summation
order. `dequantize` is the slow, obviously-correct twin; the fallback (no compiler, tensors off the CPU or not
contiguous, an int4 group or fp8 block not a multiple of 16, or QIUSUO_KERNELS=0) is x @ dequantize(rows).T, BAND
rows at a time. The alternative measured and left out: applying int4's scale once per group instead of per weight
(sum of codes times x, then times the scale) ran the M = 1 inner loop 1.4x faster (2.35 against 3.25 cycles per 16
weights of a row, in L1), but a product rounded before its scale is applied is not the dequantised weight's product.

Threads. kernels.c is built with -fopenmp and so links libgomp.so.1; torch's wheel has loaded its own libgomp.so.1
(torch/lib) first, and the dynamic loader resolves ours to that one: one OpenMP runtime and one thread pool per
calling thread for both (checked: one libgomp in /proc/self/maps; 3 threads in the process before and after mixing
torch ops and these kernels at 1 and 2 threads; tests/quant/test_kernels.py checks the first). The thread count
travels with each call, as torch.get_num_threads(): OpenMP's count is per calling thread, and a thread that has not
run a torch op yet still has OpenMP's default of one per core (measured: main thread at 1, a new thread's
omp_get_max_threads() was 2 until its first torch call). ctypes releases the GIL for the call.

Measured: each call timed on a fresh copy of W (copies totalling 128 MB, beyond the 32 MB L3), best of 11, one thread,
on a 2-core AMD EPYC (Zen 3) VM, AVX2, no AVX-512, with another process on the other core; W 4096 x 7168; GB/s of
weight + scale bytes. Same run: 256 MB fp32 `big.sum()` 19.4 GB/s; fp32 `x @ w.t()` 22.0 GB/s (5.3 ms) at M = 1,
19.7 ms at M = 8. Runs minutes apart on this VM differed up to 2x, compute-bound rows most; ratios within a run held.

    M = 1, GB/s:  bf16 18.6   int8 11.3   int4 G32 5.5   int4 G128 5.9   mxfp4 4.1   fp8 8.1
    M = 8, ms:    bf16  9.4   int8  8.1   int4 G32 8.6   int4 G128 7.9   mxfp4 10.2  fp8 9.7

bf16 reads at the memory's rate. The others are compute-bound on one core (kernels.c counts their vector ops per
weight: int4 at M = 1 is 9 per 16 weights, 3.25 cycles), so more threads add throughput up to the memory's rate. At
M = 8 one dequantisation serves 8 rows and the time goes to the FMAs (int4 G128: 30 G weight-rows/s, 2/3 of this
core's FMA peak).
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

from qiusuo.hf.fp4 import E2M1
from qiusuo.hf.fp8 import decode_scale
from qiusuo.runtime import cache_dir, cpu_flags

FORMATS = ("bf16", "int8", "int4", "mxfp4", "fp8")
MX_GROUP = 32  # mxfp4's inputs per scale, fixed by the format
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


# ---- the slow twin ----

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


def _mm_torch(x: Tensor, fmt: str, q: Tensor, scale: Tensor | None, group: int, block: int) -> Tensor:
    N = q.shape[-2]
    y = x.new_empty(x.shape[0], N)
    for n0 in range(0, N, BAND):
        y[:, n0:n0 + BAND] = x @ dequantize(fmt, q, scale, group, block, slice(n0, n0 + BAND)).T
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
    lib.qs_grouped_mm.argtypes = [ctypes.c_int, ptr, i64, i64, i64, i64, ptr, ptr, ptr, i64, i64, ptr, ctypes.c_int]
    lib.qs_grouped_mm.restype = ctypes.c_int
    lib.qs_simd.restype = ctypes.c_int
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
    if os.environ.get("QIUSUO_KERNELS", "1") == "0" or (fmt == "int4" and group % 16) or (fmt == "fp8" and block % 16):
        return None
    for t in tensors:
        if t is not None and (t.device.type != "cpu" or not t.is_contiguous()):
            return None
    return _load()[0]


def _run_c(lib: ctypes.CDLL, x: Tensor, counts: int, experts: int, fmt: str, q: Tensor, scale: Tensor | None,
           group: int, block: int) -> Tensor:
    """One call of kernels.c for `experts` experts whose row counts (int64) are at address `counts` (one expert for a
    plain matmul); ctypes releases the GIL for the call."""
    R, K = x.shape
    y = torch.empty(R, q.shape[-2], dtype=torch.float32)
    rc = lib.qs_grouped_mm(FORMATS.index(fmt), x.data_ptr(), R, K, q.shape[-2], experts, counts, q.data_ptr(),
                           None if scale is None else scale.data_ptr(), group, block, y.data_ptr(),
                           torch.get_num_threads())
    if rc:
        raise RuntimeError(f"qs_grouped_mm refused {fmt} x {tuple(x.shape)} q {tuple(q.shape)} (or ran out of memory)")
    return y


def _check_x(x: Tensor, K: int) -> None:
    if x.dtype != torch.float32 or x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"x must be float32 (rows, {K}), got {x.dtype} {tuple(x.shape)}")


def _mm(x: Tensor, fmt: str, q: Tensor, scale: Tensor | None, group: int, block: int) -> Tensor:
    N, K = _shape(fmt, q, scale, group, block, 0)
    _check_x(x, K)
    lib = _library(fmt, group, block, x, q, scale)
    if lib is None:
        return _mm_torch(x, fmt, q, scale, group, block)
    rows = ctypes.c_int64(x.shape[0])
    return _run_c(lib, x, ctypes.addressof(rows), 1, fmt, q, scale, group, block)


def _grouped_mm(xs: Tensor, counts: Tensor, fmt: str, q: Tensor, scale: Tensor | None, group: int,
                block: int) -> Tensor:
    N, K = _shape(fmt, q, scale, group, block, 1)
    _check_x(xs, K)
    if counts.dim() != 1 or counts.numel() != q.shape[0]:
        raise ValueError(f"counts {tuple(counts.shape)} must hold one row count per expert ({q.shape[0]})")
    counts = counts.to("cpu", torch.int64).contiguous()
    if counts.numel() and (counts.min() < 0 or counts.sum() != xs.shape[0]):
        raise ValueError(f"counts {counts.tolist()} must be >= 0 and sum to the {xs.shape[0]} rows of xs")
    lib = _library(fmt, group, block, xs, q, scale)
    if lib is not None:
        return _run_c(lib, xs, counts.data_ptr(), counts.numel(), fmt, q, scale, group, block)
    y = xs.new_empty(xs.shape[0], N)
    r0 = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            y[r0:r0 + c] = _mm_torch(xs[r0:r0 + c], fmt, q[e], None if scale is None else scale[e], group, block)
        r0 += c
    return y


# ---- the custom ops ----

# The custom ops are what a compiled graph calls (no graph break; the fake gives the output shape). Eager calls skip
# them: a call through the dispatcher into a Python kernel cost ~40 us here (measured: 70 us through the op, 27 us
# calling its body), more than a decode-sized matmul's arithmetic on small layers.

@torch.library.custom_op("qiusuo::quant_mm", mutates_args=())
def _quant_mm(x: Tensor, fmt: str, q: Tensor, scale: Tensor | None, group: int, block: int) -> Tensor:
    return _mm(x, fmt, q, scale, group, block)


@_quant_mm.register_fake
def _(x, fmt, q, scale, group, block):
    return x.new_empty(x.shape[0], q.shape[-2])


@torch.library.custom_op("qiusuo::quant_grouped_mm", mutates_args=())
def _quant_grouped_mm(xs: Tensor, counts: Tensor, fmt: str, q: Tensor, scale: Tensor | None, group: int,
                      block: int) -> Tensor:
    return _grouped_mm(xs, counts, fmt, q, scale, group, block)


@_quant_grouped_mm.register_fake
def _(xs, counts, fmt, q, scale, group, block):
    return xs.new_empty(xs.shape[0], q.shape[-2])


def mm(x: Tensor, fmt: str, q: Tensor, scale: Tensor | None, group: int = 32, block: int = 128) -> Tensor:
    """x (M, K) float32, W (N, K) in `fmt` -> x @ dequantize(W).T, (M, N) float32."""
    if torch.compiler.is_compiling():
        return torch.ops.qiusuo.quant_mm(x, fmt, q, scale, group, block)
    return _mm(x, fmt, q, scale, group, block)


def grouped_mm(xs: Tensor, counts: Tensor, fmt: str, q: Tensor, scale: Tensor | None, group: int = 32,
               block: int = 128) -> Tensor:
    """xs (R, K) float32, rows sorted by expert, counts (E,) int64 rows per expert, q/scale with a leading E ->
    (R, N): each expert's rows times its weight. One C call for all experts; only experts with rows are read."""
    if torch.compiler.is_compiling():
        return torch.ops.qiusuo.quant_grouped_mm(xs, counts, fmt, q, scale, group, block)
    return _grouped_mm(xs, counts, fmt, q, scale, group, block)
