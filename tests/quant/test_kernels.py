"""Quantised matmul kernels (qiusuo/quant/kernels.c) against their slow twins, in float64.

- `dequantize` itself against the layouts' definitions, element by element (codes decoded from their bits here, not
  from the module's tables), and against qiusuo.hf's FP4 / FP8 readers.
- `mm` and `grouped_mm`, C path and pure-torch fallback, every format, act "fp32" and (int8, int4, mxfp4) "q8",
  M in {1, 3, 8, 16, 17} (every register block of rows and a remainder), N not a multiple of any block (fp8: partial
  edge blocks both ways; q8: K ending in a partial superblock of 256 inputs, odd and even numbers of blocks in it).
- the portable scalar build (-DQS_SCALAR), the VNNI variant with vpdpbusd emulated (-DQS_EMULATE_VNNI: its q8 weight
  offsets differ from AVX2's) and the build this machine compiles by default.
- experts: some with no rows, one with all; inactive experts' weights poisoned with NaN, so reading them would show.
- one OpenMP runtime (torch's libgomp) in the process, and 2 threads giving the same answers as 1.
- the custom ops under torch.compile (fullgraph) and torch.library.opcheck.

Codes cover every nibble value and every e4m3 byte but NaN; scales span 2^-40..2^40 across rows (`weights`).

The fp32 bound. W is taken exactly: codes times scales in float64 (`exact`; every product of a code and a scale is
exact there). Every path computes y = sum_g s_g sum_{k in g} q_k x_k as a tree of float32 operations, each rounding
once: a product q_k x_k (fused into the FMA that adds it), additions of disjoint partial sums, and one multiplication
by the group's scale per group sum (fused into the FMA that adds it to the row's sum; int8: one per chunk of a row;
the torch fallback instead rounds the dequantised weight fl(s q), once per term). A term s_g q_k x_k meets at most 1
product, 1 scale and K - 1 additions (a binary tree of K leaves is at most K - 1 deep): K + 1 roundings, so
(Higham, Accuracy and Stability of Numerical Algorithms, lemma 3.1) |y - x @ W.T| <= gamma_{K+1} (|x| @ |W|.T),
gamma_n = n u / (1 - n u), u = 2^-24. Against the weight-at-a-time order (dequantised weight times x) it is one
rounding more per term, the scale's. Added to it: the float64 reference's own error and that of computing the bound
(2 gamma64_{K+1} of the same sum, u = 2^-53), and for results below float32's normal range 2^-150 per rounding,
scaled by the largest scale (times 2^8: fp8 codes are value / 2^8 in the kernel): 3 K 2^-150 max(1, 2^8 max|s|).

The q8 bound. The reference quantises x in plain torch (Q8_0: d = max|x| / 127 per 32 inputs, codes round(x / d)
half to even), forms each block's dot product of x codes and weight codes P_b exactly in int64, and S = sum_b
d_b s_b P_b in float64 (s_b: int8 the row's scale, int4 its group's, mxfp4 half its e8m0 scale, with codes 2 e2m1).
The kernel's P_b are exact too (integers below 2^21 in int32, converted to float exactly: |P_b| < 2^24), so its
only roundings are D_b = fl(d_b s_b) (1), the product D_b P_b (fused into the FMA that adds it: 1) and at most
nb - 1 additions of block terms, nb = K / 32 (lanes holding no block add exact zeros): |y - S| <= gamma_{nb+1}
sum_b |d_b s_b P_b|, 32 times fewer roundings than the fp32 bound's K + 1. Added: 2 gamma64_{nb+1} of the same sum
for the float64 reference, and nb 2^-130 for subnormal D_b (2^-150 times |P_b| < 2^20) and results. A code of x
rounded the other way moves y by about d s |q_k|, some hundred times this bound (x includes exact ties, x / d = k +
1/2, and all-zero blocks).

Each bound is the worst case, not a guess: the observed errors are far smaller, and a wrong weight, scale, code,
nibble order or lane exceeds it (checked by planting such bugs in kernels.c one at a time).
"""

import ctypes
import math
import struct
import sys

import pytest
import torch

from qiusuo.quant.fp4 import dequantize_fp4
from qiusuo.quant.fp8 import dequantize_blocks
from qiusuo.quant import kernels
from qiusuo.quant.formats import parse
from qiusuo.quant.kernels import dequantize, grouped_mm, mm
from qiusuo.runtime import cpu_flags

CASES = [("bf16", 32), ("int8", 32), ("int4", 32), ("int4", 64), ("int4", 128), ("mxfp4", 32), ("fp8", 32)]
IDS = [f"{f}-g{g}" if f == "int4" else f for f, g in CASES]
# q8: int4 groups of 1, 2, 3, 4 and 8 blocks of x (the kernel has a path for each but 3, which takes its general one)
CASES8 = [("int8", 32), ("int4", 32), ("int4", 64), ("int4", 96), ("int4", 128), ("int4", 256), ("mxfp4", 32)]
IDS8 = [f"{f}-g{g}" if f == "int4" else f for f, g in CASES8]
MS = [1, 3, 8, 16, 17]
BLOCK = 128
E4M3_VALID = [b for b in range(256) if b & 0x7F != 0x7F]  # every byte but the two NaNs
U32, U64 = 2.0**-24, 2.0**-53

needs_c = pytest.mark.skipif(not kernels.available(), reason=f"C kernels not built: {kernels.build_error()}")


def shape(fmt: str) -> tuple[int, int]:
    """(N, K): N a multiple of nothing the kernels block by; fp8 with partial 128-blocks in both directions."""
    return (200, 160) if fmt == "fp8" else (203, 384)


def shape8(group: int) -> tuple[int, int]:
    """(N, K) for q8: K = one superblock of 256 inputs and a partial one of 3 (odd), 6, 7 or 4 blocks of 32; none for
    a group of 256, which must divide K."""
    return 203, {32: 352, 64: 448, 96: 480, 128: 384, 256: 768}[group]


def gamma(n: int, u: float = U32) -> float:
    return n * u / (1 - n * u)


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


def activations(M: int, K: int, g: torch.Generator) -> torch.Tensor:
    """randn rows at scales 2^-8..2^8, the first row's first blocks planted for q8: one with max 127 (so d = 1) and
    ties 2.5, -3.5, 0.5 (half to even gives 2, -4, 0; half away from zero 3, -4, 1), one all zeros (d = 0)."""
    x = torch.randn(M, K, generator=g) * 2.0 ** torch.randint(-8, 9, (M, 1), generator=g).float()
    x[0, :32] = x[0, :32].clamp(-100, 100)
    x[0, :4] = torch.tensor([127.0, 2.5, -3.5, 0.5])
    x[0, 32:64] = 0
    return x


def exact(fmt: str, q: torch.Tensor, s: torch.Tensor | None, group: int) -> tuple[torch.Tensor, float]:
    """(W in float64, codes times scales exactly; the largest scale the kernel multiplies by, at least 1).
    `dequantize` is exact already for bf16, int4 and mxfp4 (their products fit float32); int8 and fp8 are
    dequantised with unit scales (the codes' values, exact) and scaled here."""
    if fmt == "int8":
        return dequantize(fmt, q, torch.ones_like(s), group, BLOCK).double() * s.double()[..., None], s.abs().max().item()
    if fmt == "fp8":
        codes = dequantize(fmt, q, torch.ones_like(s), group, BLOCK).double()
        full = s.double().repeat_interleave(BLOCK, -2)[..., :q.shape[-2], :].repeat_interleave(BLOCK, -1)
        return codes * full[..., :q.shape[-1]], 256 * s.abs().max().item()
    w = dequantize(fmt, q, s, group, BLOCK).double()
    if fmt == "bf16":
        return w, 1.0
    return w, (s.view(torch.bfloat16).float().abs().max() if fmt == "int4" else 2.0 ** (s.int().max() - 127)).item()


def check(y: torch.Tensor, x: torch.Tensor, fmt: str, q, s, group: int) -> None:
    """y against x @ W.T in float64 with W exact, within the fp32 bound of the module docstring."""
    K = x.shape[1]
    w, smax = exact(fmt, q, s, group)
    ref = x.double() @ w.T
    bound = (gamma(K + 1) + 2 * gamma(K + 1, U64)) * (x.double().abs() @ w.abs().T) + 3 * K * 2.0**-150 * max(1, smax)
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert torch.isfinite(ref).all()
    err = (y.double() - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1, f"error {worst:.3g}x the bound (max abs error {err.max().item():.3g})"


def q8_reference(x: torch.Tensor, fmt: str, q, s, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, sum_b |d_b s_b P_b|), both (M, N) float64, from x's Q8_0 codes and the weight's integer codes, written
    out here from the definitions (not with kernels.quantize_q8 / q8_codes)."""
    M, K = x.shape
    nb = K // 32
    xb = x.reshape(M, nb, 32)
    d = xb.abs().amax(-1) / 127  # float32, as the kernel divides
    cx = torch.where(d[..., None] > 0, torch.round(xb / d[..., None]), torch.zeros(())).long()  # (M, nb, 32)
    if fmt == "int8":
        cw, sw = q.long(), s.double()[:, None].expand(-1, nb)
    else:
        u = q.view(torch.uint8).long()
        nib = torch.stack((u & 15, u >> 4), -1).flatten(-2)  # column 2j from the low nibble of byte j
        if fmt == "int4":
            cw = nib - 8
            sw = s.view(torch.bfloat16).double().repeat_interleave(group // 32, -1)
        else:
            two_e2m1 = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12])
            cw, sw = two_e2m1[nib], 2.0 ** (s.double() - 128)
    P = torch.einsum("mbk,nbk->mnb", cx, cw.reshape(-1, nb, 32))  # int64, exact
    terms = d.double()[:, None, :] * sw[None] * P.double()  # (M, N, nb)
    return terms.sum(-1), terms.abs().sum(-1)


def check_q8(y: torch.Tensor, x: torch.Tensor, fmt: str, q, s, group: int) -> None:
    """y against the q8 reference within the q8 bound of the module docstring."""
    nb = x.shape[1] // 32
    ref, size = q8_reference(x, fmt, q, s, group)
    bound = (gamma(nb + 1) + 2 * gamma(nb + 1, U64)) * size + nb * 2.0**-130
    assert y.dtype == torch.float32 and y.shape == ref.shape
    assert torch.isfinite(ref).all()
    err = (y.double() - ref).abs()
    worst = (err / bound).max().item()
    assert worst <= 1, f"q8 error {worst:.3g}x the bound (max abs error {err.max().item():.3g})"


def use_path(path: str, monkeypatch) -> None:
    if path == "c" and not kernels.available():
        pytest.skip(f"C kernels not built: {kernels.build_error()}")
    if path == "torch":
        monkeypatch.setenv("QIUSUO_KERNELS", "0")


def run(lib, x, fmt, q, s, group, act):
    rows = ctypes.c_int64(x.shape[0])
    return kernels._run_c(lib, x, ctypes.addressof(rows), 1, fmt, q, s, group, BLOCK, act)


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


@pytest.mark.parametrize("fmt,group", CASES8, ids=IDS8)
def test_q8_codes_and_quantize_q8_are_the_definitions(fmt, group):
    """The module's q8 helpers (its torch fallback's) against this file's reference."""
    g = torch.Generator().manual_seed(11)
    N, K = shape8(group)
    q, s = weights(fmt, (), N, K, group, g)
    x = activations(3, K, g)
    cw, sw = kernels.q8_codes(fmt, q, s, group)
    assert torch.equal(cw.double() * sw.double().repeat_interleave(32, -1), exact(fmt, q, s, group)[0])
    cx, dx = kernels.quantize_q8(x)
    assert cx[0, :4].tolist() == [127, 2, -4, 0] and dx[0, 1] == 0 and (cx[0, 32:64] == 0).all()
    assert (cx.float() * dx.repeat_interleave(32, -1) - x).abs().le(dx.repeat_interleave(32, -1) / 2).all()


# ---- mm: C and fallback against the twins ----

@pytest.mark.parametrize("path", ["c", "torch"])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("fmt,group", CASES, ids=IDS)
def test_mm(fmt, group, M, path, monkeypatch):
    use_path(path, monkeypatch)
    g = torch.Generator().manual_seed(M)
    N, K = shape(fmt)
    q, s = weights(fmt, (), N, K, group, g)
    x = activations(M, K, g)
    check(mm(x, fmt, q, s, group, BLOCK), x, fmt, q, s, group)


@pytest.mark.parametrize("path", ["c", "torch"])
@pytest.mark.parametrize("M", MS)
@pytest.mark.parametrize("fmt,group", CASES8, ids=IDS8)
def test_mm_q8(fmt, group, M, path, monkeypatch):
    use_path(path, monkeypatch)
    g = torch.Generator().manual_seed(100 + M)
    N, K = shape8(group)
    q, s = weights(fmt, (), N, K, group, g)
    x = activations(M, K, g)
    check_q8(mm(x, fmt, q, s, group, BLOCK, act="q8"), x, fmt, q, s, group)


@pytest.mark.parametrize("fmt,group", [("int8", 32), ("int4", 32), ("int4", 128), ("mxfp4", 32)],
                         ids=["int8", "int4-g32", "int4-g128", "mxfp4"])
def test_q8_error_on_realistic_data(fmt, group):
    """What act="q8" costs in accuracy, against act="fp32" on the same quantised weight: randn x (its blocks' d ~
    max|x| / 127), randn W quantised as formats.py does. Measured ~0.5% relative (Frobenius) at every format; a
    lost scale or a misplaced block is O(1)."""
    g = torch.Generator().manual_seed(12)
    q, s = parse(f"int4:{group}" if fmt == "int4" else fmt).quantize(torch.randn(512, 1024, generator=g) * 0.02)
    x = torch.randn(4, 1024, generator=g)
    y32, y8 = mm(x, fmt, q, s, group), mm(x, fmt, q, s, group, act="q8")
    assert ((y8 - y32).norm() / y32.norm()).item() < 0.02


@needs_c
def test_vector_path_is_what_runs_here():
    """The default build takes the AVX2 path on CPUs that have it (else the tests above checked the scalar one), and
    vpdpbusd where the compiler targets AVX-VNNI or AVX512-VNNI (-march=native here)."""
    flags = cpu_flags()
    lib = kernels._load()[0]
    assert lib.qs_simd() == int({"avx2", "fma", "f16c"} <= flags)
    assert lib.qs_vnni() == int(lib.qs_simd() == 1 and ("avx_vnni" in flags or {"avx512_vnni", "avx512vl"} <= flags))


@pytest.mark.parametrize("build", ["scalar", "emulated-vnni"])
def test_other_builds(build):
    """The portable path (any CPU without AVX2 + FMA + F16C) and the VNNI variant of q8 (vpdpbusd emulated
    exactly by AVX2, where the CPU lacks it), built on purpose here."""
    if build == "emulated-vnni" and not {"avx2", "fma", "f16c"} <= cpu_flags():
        pytest.skip("the emulation is AVX2")
    lib, err = kernels._load(("-DQS_SCALAR",) if build == "scalar" else ("-DQS_EMULATE_VNNI",))
    if lib is None:
        pytest.skip(f"no C build: {err}")
    assert (lib.qs_simd(), lib.qs_vnni()) == ((0, 0) if build == "scalar" else (1, 1))
    g = torch.Generator().manual_seed(3)
    for fmt, group in CASES:
        N, K = shape(fmt)
        q, s = weights(fmt, (), N, K, group, g)
        for M in (1, 17):
            x = activations(M, K, g)
            check(run(lib, x, fmt, q, s, group, "fp32"), x, fmt, q, s, group)
    for fmt, group in CASES8:
        N, K = shape8(group)
        q, s = weights(fmt, (), N, K, group, g)
        for M in (1, 17):
            x = activations(M, K, g)
            check_q8(run(lib, x, fmt, q, s, group, "q8"), x, fmt, q, s, group)


@needs_c
def test_two_threads_and_one_openmp_runtime():
    """kernels.c shares torch's libgomp (one runtime mapped), and splits work over torch.get_num_threads()."""
    g = torch.Generator().manual_seed(4)
    q, s = weights("int4", (), 203, 384, 32, g)
    x = torch.randn(5, 384, generator=g)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        y, y8 = mm(x, "int4", q, s), mm(x, "int4", q, s, act="q8")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y, mm(x, "int4", q, s)) and torch.equal(y8, mm(x, "int4", q, s, act="q8"))
    check(y, x, "int4", q, s, 32)
    if sys.platform.startswith("linux"):
        with open("/proc/self/maps") as f:
            gomp = {line.split()[-1] for line in f if "libgomp" in line}
        assert len(gomp) <= 1, f"two OpenMP runtimes in one process: {gomp}"


# ---- grouped_mm ----

GROUPED = [(f, g, "fp32") for f, g in CASES] + [(f, g, "q8") for f, g in CASES if f in kernels.Q8_FORMATS]


@pytest.mark.parametrize("path", ["c", "torch"])
@pytest.mark.parametrize("counts", [[0, 5, 0, 12, 3], [0, 0, 17, 0, 0]], ids=["some-empty", "one-has-all"])
@pytest.mark.parametrize("fmt,group,act", GROUPED, ids=[f"{f}-g{g}-{a}" if f == "int4" else f"{f}-{a}" for f, g, a in GROUPED])
def test_grouped_mm(fmt, group, act, counts, path, monkeypatch):
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
    y = grouped_mm(xs, counts_t, fmt, q, s, group, BLOCK, act)
    assert torch.isfinite(y).all()
    test = check if act == "fp32" else check_q8
    r0 = 0
    for e, c in enumerate(counts):
        if c:
            se, rows = None if s is None else s[e], slice(r0, r0 + c)
            test(y[rows], xs[rows], fmt, q[e], se, group)
            test(mm(xs[rows], fmt, q[e], se, group, BLOCK, act), xs[rows], fmt, q[e], se, group)
        r0 += c


def test_grouped_mm_no_rows_or_no_experts():
    q, s = weights("int4", (3,), 40, 64, 32, torch.Generator().manual_seed(6))
    for act in ("fp32", "q8"):
        assert grouped_mm(torch.empty(0, 64), torch.zeros(3, dtype=torch.int64), "int4", q, s, act=act).shape == (0, 40)
        assert grouped_mm(torch.empty(0, 64), torch.zeros(0, dtype=torch.int64), "int4", q[:0], s[:0],
                          act=act).shape == (0, 40)


@pytest.mark.parametrize("fmt,group,act", GROUPED, ids=[f"{f}-g{g}-{a}" if f == "int4" else f"{f}-{a}" for f, g, a in GROUPED])
def test_bound_calls_give_the_checked_calls_bytes(fmt, group, act):
    """`Bound` skips the per-call checks, not the arithmetic: bit for bit what mm / grouped_mm give, a matrix and a
    bank; a bad x or counts still gets an error, not a wrong answer."""
    g = torch.Generator().manual_seed(11)
    N, K = shape(fmt)
    q, s = weights(fmt, (), N, K, group, g)
    qe, se = weights(fmt, (3,), N, K, group, g)
    x, xs, counts = torch.randn(3, K, generator=g), torch.randn(7, K, generator=g), torch.tensor([4, 0, 3])
    one, bank = kernels.Bound(fmt, q, s, group, BLOCK, act), kernels.Bound(fmt, qe, se, group, BLOCK, act)
    assert torch.equal(one(x), mm(x, fmt, q, s, group, BLOCK, act))
    assert torch.equal(bank(xs, counts), grouped_mm(xs, counts, fmt, qe, se, group, BLOCK, act))
    assert one.is_for(q, s, act) and not one.is_for(q.clone(), s, act) and not one.is_for(q, s, "other")
    with pytest.raises(ValueError, match="x must be contiguous float32"):
        one(x.double())
    if kernels.available():
        with pytest.raises(RuntimeError, match="must sum to the rows"):
            bank(xs, torch.tensor([4, 0, 2]))


# ---- the ops a compiled model calls ----

def test_the_ops_bind_each_weight_once_and_give_the_checked_bytes():
    """What a compiled graph calls binds its weight on the first call and keeps the binding on the weight tensor
    (`kernels.bound`): later calls reuse it, a replaced weight or scale rebinds, a copied or pickled weight
    carries none, and the bytes are the checked calls' (a non-contiguous x included)."""
    import copy
    import pickle

    g = torch.Generator().manual_seed(12)
    q, s = weights("int4", (), 48, 64, 32, g)
    qe, se = weights("mxfp4", (3,), 40, 64, 32, g)
    x, xs, counts = torch.randn(64, 3, generator=g).t(), torch.randn(7, 64, generator=g), torch.tensor([4, 0, 3])
    y = torch.ops.qiusuo.quant_mm(x, "int4", q, s, 32, BLOCK, "q8")
    b = q._qiusuo_bound
    assert torch.equal(y, mm(x.contiguous(), "int4", q, s, 32, BLOCK, "q8"))
    assert torch.equal(torch.ops.qiusuo.quant_mm(x, "int4", q, s, 32, BLOCK, "q8"), y) and q._qiusuo_bound is b
    torch.ops.qiusuo.quant_mm(x, "int4", q, s.clone(), 32, BLOCK, "q8")
    assert q._qiusuo_bound is not b  # another scale tensor: bound again
    ye = torch.ops.qiusuo.quant_grouped_mm(xs, counts, "mxfp4", qe, se, 32, BLOCK, "q8")
    assert torch.equal(ye, grouped_mm(xs, counts, "mxfp4", qe, se, 32, BLOCK, "q8"))
    assert getattr(copy.deepcopy(qe), "_qiusuo_bound", None) is None
    assert getattr(pickle.loads(pickle.dumps(qe)), "_qiusuo_bound", None) is None


def test_opcheck():
    g = torch.Generator().manual_seed(7)
    q, s = weights("int4", (), 48, 64, 32, g)
    qe, se = weights("fp8", (2,), 40, 64, 32, g)
    torch.library.opcheck(torch.ops.qiusuo.quant_mm.default,
                          (torch.randn(3, 64, generator=g), "int4", q, s, 32, 128, "q8"),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.qiusuo.quant_grouped_mm.default,
                          (torch.randn(4, 64, generator=g), torch.tensor([1, 3]), "fp8", qe, se, 32, 128, "fp32"),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.slow
def test_compiled_model_calls_the_ops_without_graph_break():
    """One inductor compile (~10-30 s on a small CPU): fullgraph=True fails on any graph break."""
    g = torch.Generator().manual_seed(8)
    q, s = weights("int4", (), 64, 128, 32, g)
    qe, se = weights("mxfp4", (3,), 48, 128, 32, g)

    def f(x, xs, counts):
        return mm(x, "int4", q, s, act="q8") * 2, grouped_mm(xs, counts, "mxfp4", qe, se) + 1

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
    x = activations(3, 384, g)
    check(mm(x, "mxfp4", q, s), x, "mxfp4", q, s, 32)
    check_q8(mm(x, "mxfp4", q, s, act="q8"), x, "mxfp4", q, s, 32)


@pytest.mark.parametrize("call,match", [
    (lambda q, s, x: mm(x, "int3", q, s), "unknown weight format"),
    (lambda q, s, x: mm(x, "int4", q, s[:, :-1]), "scale has shape"),
    (lambda q, s, x: mm(x, "int4", q, s.float()), "needs a scale of dtype"),
    (lambda q, s, x: mm(x, "int4", q, s, group=48), "does not divide"),
    (lambda q, s, x: mm(x.double(), "int4", q, s), "x must be float32"),
    (lambda q, s, x: mm(x, "int4", q[:, :-8], s[:, :-1]), "not a multiple of 32"),
    (lambda q, s, x: grouped_mm(x, torch.tensor([2]), "int4", q[None], s[None]), "sum to"),
    (lambda q, s, x: mm(x, "int4", q, s, act="q4"), "unknown activation"),
    (lambda q, s, x: mm(x, "bf16", torch.zeros(8, 64, dtype=torch.bfloat16), None, act="q8"), "not bf16"),
    (lambda q, s, x: mm(x, "int4", q, s.repeat_interleave(2, -1), group=16, act="q8"), "multiple of 32"),
    (lambda q, s, x: grouped_mm(x, torch.tensor([3]), "int4", q[None], s[None], act="q4"), "unknown activation"),
])
def test_bad_input(call, match):
    q, s = weights("int4", (), 8, 64, 32, torch.Generator().manual_seed(10))
    with pytest.raises(ValueError, match=match):
        call(q, s, torch.randn(3, 64))
