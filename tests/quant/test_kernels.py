"""Quantised matmul kernels (qiusuo/quant/kernels.c) against their slow twin, x @ dequantize(W).T.

- `dequantize` itself against the layouts' definitions, element by element (codes decoded from their bits here, not
  from the module's tables), and against qiusuo.hf's FP4 / FP8 readers.
- `mm` and `grouped_mm`, C path and pure-torch fallback, every format, M in {1, 3, 8, 16, 17} (every register block
  of rows and a remainder), N not a multiple of any block (fp8: partial edge blocks both ways).
- the portable scalar build (-DQS_SCALAR) as well as the vector one this machine compiles by default.
- experts: some with no rows, one with all; inactive experts' weights poisoned with NaN, so reading them would show.
- one OpenMP runtime (torch's libgomp) in the process, and 2 threads giving the same answers as 1.
- the custom ops under torch.compile (fullgraph) and torch.library.opcheck.

Codes cover every nibble value and every e4m3 byte but NaN; scales span 2^-40..2^40 across rows (`weights`).

The bound. Each weight is dequantised exactly (it is representable in float32, and both paths produce that value), so
the only error is float32 arithmetic over K products: whatever the order, a sum of K float32 products computed with
(fused or not) multiply-adds errs by at most gamma = (K + 1) u / (1 - (K + 1) u) times sum_k |x_k w_k| (u = 2^-24;
Higham, Accuracy and Stability of Numerical Algorithms, 3.1). The reference is computed in float64, whose own error
is ~2^-29 of that bound. So the test checks |y - ref| <= gamma * (|x| @ |W|.T) elementwise, plus K * 2^-149 for
products that fall below float32's normal range. It is the worst case, not a guess: the observed errors are
~100x smaller, and a wrong weight (one code, one scale, one nibble order) exceeds it.
"""

import ctypes
import math
import struct
import sys

import pytest
import torch

from qiusuo.hf.fp4 import dequantize_fp4
from qiusuo.hf.fp8 import dequantize_blocks
from qiusuo.quant import kernels
from qiusuo.quant.kernels import dequantize, grouped_mm, mm
from qiusuo.runtime import cpu_flags

CASES = [("bf16", 32), ("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128), ("mxfp4", 32), ("fp8", 32)]
IDS = [f"{f}-g{g}" if f == "int4" else f for f, g in CASES]
MS = [1, 3, 8, 16, 17]
BLOCK = 128
E4M3_VALID = [b for b in range(256) if b & 0x7F != 0x7F]  # every byte but the two NaNs

needs_c = pytest.mark.skipif(not kernels.available(), reason=f"C kernels not built: {kernels.build_error()}")


def shape(fmt: str) -> tuple[int, int]:
    """(N, K): N a multiple of nothing the kernels block by; fp8 with partial 128-blocks in both directions."""
    return (200, 160) if fmt == "fp8" else (203, 384)


def weights(fmt: str, lead: tuple, N: int, K: int, group: int, g: torch.Generator):
    """Random (q, scale) in `fmt`, the first bytes every code there is, scales 2^-40..2^40 (mxfp4: exponents)."""
    full = (*lead, N, K)

    def exps(*s):
        """2^-40..2^40 across rows, within 2^+-2 along a row: a row's error bound is set by its largest scale, so
        a row mixing 2^40 and 2^-40 would hide a wrong small-scale group under the bound."""
        return torch.randint(-38, 39, (*s[:-1], 1), generator=g) + torch.randint(-2, 3, s, generator=g)

    def pow2(*s):
        return 2.0 ** exps(*s).float() * (0.5 + torch.rand(s, generator=g))

    def cover(q, codes):
        q.view(-1)[:len(codes)] = torch.tensor(codes, dtype=q.dtype)
        return q

    if fmt == "bf16":
        w = torch.randn(full, generator=g) * 2.0 ** torch.randint(-20, 21, (*lead, N, 1), generator=g).float()
        return w.bfloat16(), None
    if fmt == "int8":
        q = cover(torch.randint(-128, 128, full, generator=g, dtype=torch.int8), list(range(-128, 128)))
        return q, pow2(*lead, N, 1)[..., 0]
    if fmt in ("int4", "mxfp4"):
        q = cover(torch.randint(0, 256, (*lead, N, K // 2), generator=g, dtype=torch.uint8), list(range(256)))
        if fmt == "int4":
            sign = torch.where(torch.rand((*lead, N, K // group), generator=g) < 0.2, -1.0, 1.0)
            return q, (pow2(*lead, N, K // group) * sign).bfloat16()
        return q, (127 + exps(*lead, N, K // 32)).to(torch.uint8)
    valid = torch.tensor(E4M3_VALID, dtype=torch.uint8)
    q = cover(valid[torch.randint(0, len(valid), full, generator=g)], E4M3_VALID)
    return q, pow2(*lead, math.ceil(N / BLOCK), math.ceil(K / BLOCK))


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """y against x @ w.T in float64, within the float32 summation bound of the module docstring."""
    K = x.shape[1]
    ref = x.double() @ w.double().T
    gamma = (K + 1) * 2.0**-24 / (1 - (K + 1) * 2.0**-24)
    bound = gamma * (x.double().abs() @ w.double().abs().T) + K * 2.0**-149
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert torch.isfinite(ref).all()
    err = (y.double() - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1, f"error {worst:.3g}x the bound (max abs error {err.max().item():.3g})"


def use_path(path: str, monkeypatch) -> None:
    if path == "c" and not kernels.available():
        pytest.skip(f"C kernels not built: {kernels.build_error()}")
    if path == "torch":
        monkeypatch.setenv("QIUSUO_KERNELS", "0")


# ---- the slow twin against the definitions ----

def bf16_value(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits << 16))[0]


def e2m1_value(code: int) -> float:
    e, m = (code >> 1) & 3, code & 1
    mag = m * 0.5 if e == 0 else 2.0 ** (e - 1) * (1 + m / 2)
    return -mag if code & 8 else mag


def e4m3_value(b: int) -> float:
    e, m = (b >> 3) & 15, b & 7
    mag = m / 8 * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
    return -mag if b & 0x80 else mag


def f32(v: float) -> float:
    """v rounded to float32: a float32 product is the exact (double) product of its factors, rounded once."""
    return struct.unpack("<f", struct.pack("<f", v))[0]


def element(fmt, q, scale, group, n, k) -> float:
    """w[n, k] from the layout's definition, one element at a time."""
    if fmt == "bf16":
        return bf16_value(int(q.view(torch.int16)[n, k]) & 0xFFFF)
    if fmt == "int8":
        return f32(int(q[n, k]) * float(scale[n]))
    if fmt == "fp8":
        return f32(e4m3_value(int(q[n, k])) * float(scale[n // BLOCK, k // BLOCK]))
    byte = int(q[n, k // 2])
    code = byte >> 4 if k % 2 else byte & 15
    if fmt == "int4":
        return (code - 8) * bf16_value(int(scale.view(torch.int16)[n, k // group]) & 0xFFFF)
    return e2m1_value(code) * 2.0 ** (int(scale[n, k // 32]) - 127)


@pytest.mark.parametrize("fmt,group", CASES, ids=IDS)
def test_dequantize_is_the_layout(fmt, group):
    g = torch.Generator().manual_seed(1)
    N, K = (130, 160) if fmt == "fp8" else (5, 256)
    q, s = weights(fmt, (), N, K, group, g)
    w = dequantize(fmt, q, s, group, BLOCK)
    assert w.dtype == torch.float32 and w.shape == (N, K)
    if N * K <= 1280:
        picks = [(n, k) for n in range(N) for k in range(K)]
    else:
        rows, cols = torch.randint(0, N, (1500,), generator=g), torch.randint(0, K, (1500,), generator=g)
        picks = zip(rows.tolist(), cols.tolist())
    for n, k in picks:
        assert w[n, k].item() == element(fmt, q, s, group, n, k), (n, k)
    rows = slice(N // 3, N - 1)
    assert torch.equal(dequantize(fmt, q, s, group, BLOCK, rows), w[rows])
    if fmt == "mxfp4":
        assert torch.equal(w, dequantize_fp4(q.view(torch.int8), s))
    if fmt == "fp8":
        assert torch.equal(w, dequantize_blocks(q.view(torch.float8_e4m3fn), s))


def test_dequantize_leading_expert_dims():
    g = torch.Generator().manual_seed(2)
    for fmt, group in CASES:
        N, K = shape(fmt)
        q, s = weights(fmt, (3,), N, K, group, g)
        w = dequantize(fmt, q, s, group, BLOCK)
        for e in range(3):
            assert torch.equal(w[e], dequantize(fmt, q[e], None if s is None else s[e], group, BLOCK)), fmt


# ---- mm: C and fallback against the twin ----

@pytest.mark.parametrize("path", ["c", "torch"])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("fmt,group", CASES, ids=IDS)
def test_mm(fmt, group, M, path, monkeypatch):
    use_path(path, monkeypatch)
    g = torch.Generator().manual_seed(M)
    N, K = shape(fmt)
    q, s = weights(fmt, (), N, K, group, g)
    x = torch.randn(M, K, generator=g) * 2.0 ** torch.randint(-8, 9, (M, 1), generator=g).float()
    check(mm(x, fmt, q, s, group, BLOCK), x, dequantize(fmt, q, s, group, BLOCK))


@needs_c
def test_vector_path_is_what_runs_here():
    """The default build takes the AVX2 path on CPUs that have it (else the tests above checked the scalar one)."""
    want = {"avx2", "fma", "f16c"} <= cpu_flags()
    assert kernels._load()[0].qs_simd() == int(want)


def test_scalar_build():
    """The portable path (any CPU without AVX2 + FMA + F16C), built on purpose here."""
    lib, err = kernels._load(("-DQS_SCALAR",))
    if lib is None:
        pytest.skip(f"no C build: {err}")
    assert lib.qs_simd() == 0
    g = torch.Generator().manual_seed(3)
    for fmt, group in CASES:
        N, K = shape(fmt)
        q, s = weights(fmt, (), N, K, group, g)
        for M in (1, 17):
            x = torch.randn(M, K, generator=g)
            rows = ctypes.c_int64(M)
            y = kernels._run_c(lib, x, ctypes.addressof(rows), 1, fmt, q, s, group, BLOCK)
            check(y, x, dequantize(fmt, q, s, group, BLOCK))


@needs_c
def test_two_threads_and_one_openmp_runtime():
    """kernels.c shares torch's libgomp (one runtime mapped), and splits work over torch.get_num_threads()."""
    g = torch.Generator().manual_seed(4)
    q, s = weights("int4", (), 203, 384, 32, g)
    x = torch.randn(5, 384, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y = mm(x, "int4", q, s)
    finally:
        torch.set_num_threads(before)
    check(y, x, dequantize("int4", q, s))
    if sys.platform.startswith("linux"):
        with open("/proc/self/maps") as f:
            gomp = {line.split()[-1] for line in f if "libgomp" in line}
        assert len(gomp) <= 1, f"two OpenMP runtimes in one process: {gomp}"


# ---- grouped_mm ----

@pytest.mark.parametrize("path", ["c", "torch"])
@pytest.mark.parametrize("counts", [[0, 5, 0, 12, 3], [0, 0, 17, 0, 0]], ids=["some-empty", "one-has-all"])
@pytest.mark.parametrize("fmt,group", CASES, ids=IDS)
def test_grouped_mm(fmt, group, counts, path, monkeypatch):
    use_path(path, monkeypatch)
    g = torch.Generator().manual_seed(5)
    N, K = shape(fmt)
    E = len(counts)
    q, s = weights(fmt, (E,), N, K, group, g)
    for e, c in enumerate(counts):  # poison every expert without rows: touching one would give NaN
        if c == 0:
            if fmt == "bf16":
                q[e] = float("nan")
            else:
                s[e] = 255 if fmt == "mxfp4" else float("nan")
    xs = torch.randn(sum(counts), K, generator=g)
    counts_t = torch.tensor(counts)
    y = grouped_mm(xs, counts_t, fmt, q, s, group, BLOCK)
    assert torch.isfinite(y).all()
    r0 = 0
    for e, c in enumerate(counts):
        if c:
            se, rows = None if s is None else s[e], slice(r0, r0 + c)
            w = dequantize(fmt, q[e], se, group, BLOCK)
            check(y[rows], xs[rows], w)
            check(mm(xs[rows], fmt, q[e], se, group, BLOCK), xs[rows], w)
        r0 += c


def test_grouped_mm_no_rows_or_no_experts():
    q, s = weights("int4", (3,), 40, 64, 32, torch.Generator().manual_seed(6))
    assert grouped_mm(torch.empty(0, 64), torch.zeros(3, dtype=torch.int64), "int4", q, s).shape == (0, 40)
    assert grouped_mm(torch.empty(0, 64), torch.zeros(0, dtype=torch.int64), "int4", q[:0], s[:0]).shape == (0, 40)


# ---- the ops a compiled model calls ----

def test_opcheck():
    g = torch.Generator().manual_seed(7)
    q, s = weights("int4", (), 48, 64, 32, g)
    qe, se = weights("fp8", (2,), 40, 64, 32, g)
    torch.library.opcheck(torch.ops.qiusuo.quant_mm.default, (torch.randn(3, 64, generator=g), "int4", q, s, 32, 128),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.qiusuo.quant_grouped_mm.default,
                          (torch.randn(4, 64, generator=g), torch.tensor([1, 3]), "fp8", qe, se, 32, 128),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_compiled_model_calls_the_ops_without_graph_break():
    """One inductor compile (~10-30 s on a small CPU): fullgraph=True fails on any graph break."""
    g = torch.Generator().manual_seed(8)
    q, s = weights("int4", (), 64, 128, 32, g)
    qe, se = weights("mxfp4", (3,), 48, 128, 32, g)

    def f(x, xs, counts):
        return mm(x, "int4", q, s) * 2, grouped_mm(xs, counts, "mxfp4", qe, se) + 1

    x, xs, counts = torch.randn(2, 128, generator=g), torch.randn(5, 128, generator=g), torch.tensor([2, 0, 3])
    got = torch.compile(f, fullgraph=True, dynamic=False)(x, xs, counts)
    want = f(x, xs, counts)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


# ---- failures ----

def test_without_a_compiler_everything_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("QIUSUO_CACHE", str(tmp_path))
    lib, err = kernels._load(("-DQS_TEST_NO_COMPILER",))  # its own cache entry: the default load stays as it is
    assert lib is None and "no-such-cc" in err
    monkeypatch.setattr(kernels, "_load", lambda extra=(): (None, err))
    assert not kernels.available() and kernels.build_error() == err
    g = torch.Generator().manual_seed(9)
    q, s = weights("mxfp4", (), 203, 384, 32, g)
    x = torch.randn(3, 384, generator=g)
    check(mm(x, "mxfp4", q, s), x, dequantize("mxfp4", q, s))


@pytest.mark.parametrize("call,match", [
    (lambda q, s, x: mm(x, "int3", q, s), "unknown weight format"),
    (lambda q, s, x: mm(x, "int4", q, s[:, :-1]), "scale has shape"),
    (lambda q, s, x: mm(x, "int4", q, s.float()), "needs a scale of dtype"),
    (lambda q, s, x: mm(x, "int4", q, s, group=48), "does not divide"),
    (lambda q, s, x: mm(x.double(), "int4", q, s), "x must be float32"),
    (lambda q, s, x: mm(x, "int4", q[:, :-8], s[:, :-1]), "not a multiple of 32"),
    (lambda q, s, x: grouped_mm(x, torch.tensor([2]), "int4", q[None], s[None]), "sum to"),
])
def test_bad_input(call, match):
    q, s = weights("int4", (), 8, 64, 32, torch.Generator().manual_seed(10))
    with pytest.raises(ValueError, match=match):
        call(q, s, torch.randn(3, 64))
