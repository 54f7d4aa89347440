/* Weight-only quantised matmuls for CPU decoding: y (M, N) = x (M, K) @ dequantised(W (N, K))^T, float32.

Built and loaded by kernels.py, which holds the layouts, the API and the measurements; this file is the arithmetic.
Each weight is dequantised to its exact float32 value (the one kernels.py's `dequantize` gives) and multiplied into
float32 accumulators: results differ from x @ dequantize(W)^T only by summation order.

Structure. The work is a list of items (expert, block of output rows) shared out by OpenMP, only experts with rows
taking part. Within an item, rows of x are taken MR at a time (8, 4, 2, 1), columns in chunks whose x fits half of
L1 (KC), and the item's rows NR at a time: a register-blocked kernel dequantises 16 weights of each of NR rows into
two vectors and multiplies each into MR x NR accumulators, so a dequantised weight serves MR rows of x and a loaded
x vector NR rows of W. Quantiser state that changes along a row (int4's group scale, mxfp4's scaled table, fp8's
block scale) is read once per segment, and rows and scales are walked by pointer (no division in the loops: 64-bit
divisions per int4 group had held M = 1, G = 32 to half its speed).

x is repacked once per call, per block of MR rows, as [k / 8][MR][8]: its loads form one stream (MR rows K * 4 bytes
apart alias in L1 when K is a multiple of 1024; at K = 7168 the M = 8 kernel ran at 15 against 24 G weight-rows/s
before repacking). Within 16 columns bf16, int4 and mxfp4 put the 8 even columns first, the order in which unpacking
two values per 32-bit lane (bf16) or a low and a high nibble per byte (int4, mxfp4) yields them.

Vector ops per 16 weights of a row (AVX2), before the two FMAs per row of x:
  bf16  load, shift, and                     3      int8  2 widening loads, 2 cvt, 2 mul        6
  int4  widening load, and, shift, 2 cvt, 2 fma   7 mxfp4 widening load, 3 shifts, 2 vpermd, 2 xor   8
  fp8   widening load, shift, and, extract, 2 vcvtph2ps, 2 mul   8
So at M = 1 int4 is 9 ops per 16 weights, 4 of them on Zen 3's two FMA pipes and 4 on its two shuffle/convert
ones: 3.25 cycles per 16 weights measured (in L1), compute-bound below the memory's rate on one core. At M = 8 the
dequantisation is shared by 8 rows and the FMAs dominate.

The AVX2 + FMA + F16C path is used when the compiler targets them (-march=native on such a CPU); anything else,
or -DQS_SCALAR, builds the portable scalar path, correct but slow (the tests build and check both). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(QS_SCALAR)
#define QS_SIMD 1
#include <immintrin.h>
#else
#define QS_SIMD 0
#endif

enum { F_BF16 = 0, F_INT8 = 1, F_INT4 = 2, F_MXFP4 = 3, F_FP8 = 4 };

typedef struct {  /* one expert's weight */
    int fmt;
    int64_t N, K, group, block;
    const uint8_t *q;
    const void *scale;
} wts;

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

static inline float e8m0_to_f32(uint8_t e) {  /* 2^(e - 127); e = 0 is the float32 subnormal 2^-127 */
    union { uint32_t u; float f; } v = { e ? (uint32_t)e << 23 : 0x00400000u };
    return v.f;
}

#if !QS_SIMD
static inline float e4m3_to_f32(uint8_t b) {  /* exact for every byte but NaN (0x7F, 0xFF), which weights never hold */
    int e = (b >> 3) & 15, m = b & 7;
    float mag = e ? (float)(8 + m) * (1.0f / 8) : (float)m * (1.0f / 8);  /* 1.m * 2^(e - 7) or 0.m * 2^-6 */
    float p = 1.0f;
    for (int i = 7; i < (e ? e : 1); i++) p *= 2.0f;
    for (int i = (e ? e : 1); i < 7; i++) p *= 0.5f;
    return (b & 0x80) ? -mag * p : mag * p;
}

static const float E2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

/* Dequantise w[n, k0:k1] into out, exactly; the scalar path's kernel and nothing else. */
static void dequant_row(const wts *w, int64_t n, int64_t k0, int64_t k1, float *out) {
    const int64_t K = w->K;
    for (int64_t k = k0; k < k1; k++) {
        float v;
        switch (w->fmt) {
        case F_BF16: v = bf16_to_f32(((const uint16_t *)w->q)[n * K + k]); break;
        case F_INT8: v = (float)((const int8_t *)w->q)[n * K + k] * ((const float *)w->scale)[n]; break;
        case F_INT4: {
            uint8_t b = w->q[n * (K / 2) + k / 2];
            int c = (k & 1) ? b >> 4 : b & 15;
            v = (float)(c - 8) * bf16_to_f32(((const uint16_t *)w->scale)[n * (K / w->group) + k / w->group]);
            break;
        }
        case F_MXFP4: {
            uint8_t b = w->q[n * (K / 2) + k / 2];
            v = E2M1[(k & 1) ? b >> 4 : b & 15] * e8m0_to_f32(((const uint8_t *)w->scale)[n * (K / 32) + k / 32]);
            break;
        }
        default: {  /* F_FP8 */
            int64_t kb = (K + w->block - 1) / w->block;
            v = e4m3_to_f32(w->q[n * K + k]) * ((const float *)w->scale)[(n / w->block) * kb + k / w->block];
        }
        }
        out[k - k0] = v;
    }
}
#endif

#if QS_SIMD

/* ---- per-format dequantisation of 16 weights of one row ----
   prep() reads the quantiser state that holds for a segment of a row (seg_len columns: int4's group, mxfp4's 32,
   fp8's block; a whole row for int8); deq() turns the next 16 weights (BPS bytes) into w0, w1, matched with the
   permuted x's two vectors for those 16 columns. */

static const int64_t BPS[5] = {32, 16, 8, 8, 16};  /* bytes per 16 weights */

static inline int64_t seg_len(const int fmt, const wts *w) {
    return fmt == F_INT4 ? w->group : fmt == F_MXFP4 ? 32 : fmt == F_FP8 ? w->block : INT64_MAX / 2;
}

/* the scale of row n at column k, and how far it moves per segment (in bytes) */
static inline const uint8_t *scale_at(const int fmt, const wts *w, int64_t n, int64_t k) {
    const uint8_t *s = (const uint8_t *)w->scale;
    switch (fmt) {
    case F_INT8: return s + 4 * n;
    case F_INT4: return s + 2 * (n * (w->K / w->group) + k / w->group);
    case F_MXFP4: return s + n * (w->K / 32) + k / 32;
    case F_FP8: return s + 4 * ((n / w->block) * ((w->K + w->block - 1) / w->block) + k / w->block);
    default: return s;
    }
}
static const int64_t SSTEP[5] = {0, 0, 2, 1, 4};

typedef struct { __m256 a, b; } state;

/* mxfp4's table: lane i holds bits(e2m1(i) * s) ^ (i << 28), so that table[c & 7] ^ (c << 28) (the code shifted to
   the top bits, its sign bit landing on bit 31) cancels the low code bits and leaves the signed value: one
   permute, one shift and one xor per 8 weights, the scale already applied (exactly: a power of two). */
static inline state prep(const int fmt, const uint8_t *sp) {
    state s;
    switch (fmt) {
    case F_INT8: s.a = s.b = _mm256_broadcast_ss((const float *)sp); break;
    case F_INT4:  /* the bf16 scale in the high half of each lane, and -8 times it (exact) */
        s.a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_set1_epi16(*(const int16_t *)sp), 16));
        s.b = _mm256_mul_ps(s.a, _mm256_set1_ps(-8.0f));
        break;
    case F_MXFP4: {
        const __m256 mag = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
        const __m256i idx = _mm256_setr_epi32(0, 1 << 28, 2 << 28, 3 << 28, 4 << 28, 5 << 28, 6 << 28, 7 << 28);
        __m256 sc = _mm256_set1_ps(e8m0_to_f32(*sp));
        s.a = s.b = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(_mm256_mul_ps(mag, sc)), idx));
        break;
    }
    case F_FP8:  /* the fp16 built from an e4m3 byte is its value / 2^8: the 2^8 goes into the scale (exact) */
        s.a = s.b = _mm256_set1_ps(*(const float *)sp * 256.0f);
        break;
    default: s.a = s.b = _mm256_setzero_ps();
    }
    return s;
}

static inline void deq(const int fmt, const uint8_t *p, state s, __m256 *w0, __m256 *w1) {
    switch (fmt) {
    case F_BF16: {  /* 16 bf16: the even ones are the low halves of 32-bit lanes, the odd ones the high halves */
        __m256i v = _mm256_loadu_si256((const __m256i *)p);
        *w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        *w1 = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
        break;
    }
    case F_INT8:
        *w0 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p))), s.a);
        *w1 = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8)))), s.a);
        break;
    case F_INT4: {  /* (c - 8) * s = fma(c, s, -8 s), exact: c * s has at most 12 significant bits */
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
        *w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15))), s.a, s.b);
        *w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), s.a, s.b);
        break;
    }
    case F_MXFP4: {
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
        __m256i h = _mm256_srli_epi32(b, 4);
        __m256i t = _mm256_castps_si256(s.a);
        *w0 = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_permutevar8x32_epi32(t, b), _mm256_slli_epi32(b, 28)));
        *w1 = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_permutevar8x32_epi32(t, h), _mm256_slli_epi32(h, 28)));
        break;
    }
    default: {  /* F_FP8: the byte sign-extended to 16 bits, << 7, bit 14 cleared: the fp16 of value / 2^8 */
        __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
        v = _mm256_and_si256(_mm256_slli_epi16(v, 7), _mm256_set1_epi16((short)0xBFFF));
        *w0 = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_castsi256_si128(v)), s.a);
        *w1 = _mm256_mul_ps(_mm256_cvtph_ps(_mm256_extracti128_si256(v, 1)), s.a);
    }
    }
}

/* the horizontal sums of a, b, c, d */
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

/* y[m, n + r] (+)= sum over k0 <= k < k1 of x[m, k] w[n + r, k], m < MR, r < NR; xb is this block of MR rows of x,
   packed [k / 8][MR][8] (so its loads are one stream, whatever K is: rows of x K * 4 bytes apart alias in L1 when
   K is a multiple of 1024). Two accumulators per (m, r) while there are fewer than 8 (m, r) pairs, so that 8 FMA
   chains hide the FMA latency. */
#define MRMAX 8
#define NRMAX 4
static inline __attribute__((always_inline)) void kern(const int fmt, const int MR, const int NR, const wts *w,
                                                       const float *xb, int64_t k0, int64_t k1, int64_t n, float *y,
                                                       int64_t ldy, int store) {
    const int two = MR * NR < 8;
    const int64_t bps = BPS[fmt], qrow = bps * (w->K / 16), seg = seg_len(fmt, w), sstep = SSTEP[fmt];
    const uint8_t *qp = w->q + n * qrow + (k0 / 16) * bps;
    const uint8_t *sp[NRMAX];
    for (int r = 0; r < NR; r++) sp[r] = scale_at(fmt, w, n + r, k0);
    const float *xv = xb + k0 * MR;
    __m256 acc[MRMAX][NRMAX][2];
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < NR; r++) acc[m][r][0] = acc[m][r][1] = _mm256_setzero_ps();
    int64_t k = k0, ke = k0 - k0 % seg + seg;
    while (k < k1) {
        if (ke > k1) ke = k1;
        state st[NRMAX];
        for (int r = 0; r < NR; r++) {
            st[r] = prep(fmt, sp[r]);
            sp[r] += sstep;
        }
        for (; k < ke; k += 16, qp += bps, xv += 16 * MR) {
            for (int r = 0; r < NR; r++) {
                __m256 w0, w1;
                deq(fmt, qp + r * qrow, st[r], &w0, &w1);
                for (int m = 0; m < MR; m++) {
                    __m256 x0 = _mm256_loadu_ps(xv + 8 * m), x1 = _mm256_loadu_ps(xv + 8 * (MR + m));
                    if (two) {
                        acc[m][r][0] = _mm256_fmadd_ps(w0, x0, acc[m][r][0]);
                        acc[m][r][1] = _mm256_fmadd_ps(w1, x1, acc[m][r][1]);
                    } else {
                        acc[m][r][0] = _mm256_fmadd_ps(w1, x1, _mm256_fmadd_ps(w0, x0, acc[m][r][0]));
                    }
                }
            }
        }
        ke += seg;
    }
    float sums[MRMAX * NRMAX + 3];
    __m256 a[MRMAX * NRMAX + 3];
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < NR; r++) a[m * NR + r] = two ? _mm256_add_ps(acc[m][r][0], acc[m][r][1]) : acc[m][r][0];
    for (int i = MR * NR; i % 4; i++) a[i] = _mm256_setzero_ps();
    for (int i = 0; i < MR * NR; i += 4) _mm_storeu_ps(sums + i, hsum4(a[i], a[i + 1], a[i + 2], a[i + 3]));
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < NR; r++) {
            float *o = y + m * ldy + n + r;
            *o = store ? sums[m * NR + r] : *o + sums[m * NR + r];
        }
}

typedef void (*kern_fn)(const wts *, const float *, int64_t, int64_t, int64_t, float *, int64_t, int);

#define KERN(NAME, FMT, MR, NR)                                                                                    \
    static void NAME(const wts *w, const float *xb, int64_t k0, int64_t k1, int64_t n, float *y, int64_t ldy,     \
                     int store) {                                                                                   \
        kern(FMT, MR, NR, w, xb, k0, k1, n, y, ldy, store);                                                         \
    }
/* rows of weight per kernel call for MR = 1, 2, 4, 8 rows of x: 4 to 8 (m, r) pairs. NR = 2 against 4 at MR = 1,
   1 against 2 at MR = 8, and M = 8 as two MR = 4 blocks were all within this machine's noise of these. */
#define NR1 4
#define NR2 4
#define NR4 2
#define NR8 1
#define KERNS(F)                                                                                                   \
    KERN(kern_##F##_1, F, 1, NR1) KERN(kern_##F##_2, F, 2, NR2) KERN(kern_##F##_4, F, 4, NR4)                      \
    KERN(kern_##F##_8, F, 8, NR8) KERN(kern_##F##_1r, F, 1, 1) KERN(kern_##F##_2r, F, 2, 1)                        \
    KERN(kern_##F##_4r, F, 4, 1) KERN(kern_##F##_8r, F, 8, 1)
KERNS(0) KERNS(1) KERNS(2) KERNS(3) KERNS(4)
#define ROW(F) {{kern_##F##_1, kern_##F##_1r}, {kern_##F##_2, kern_##F##_2r}, {kern_##F##_4, kern_##F##_4r},           \
                {kern_##F##_8, kern_##F##_8r}}
static const kern_fn KERNELS[5][4][2] = {ROW(0), ROW(1), ROW(2), ROW(3), ROW(4)};
static const int NR_OF[4] = {NR1, NR2, NR4, NR8};

/* rows of x are taken 8, 4, 2, 1 at a time: log2 of the block that starts with `left` rows to go */
static inline int mblock(int64_t left) { return left >= 8 ? 3 : left >= 4 ? 2 : left >= 2 ? 1 : 0; }

/* x rows -> xp, block by block, [k / 8][mr][8]; within 16 columns the 8 even ones first for D16 formats */
static void pack_x(int fmt, const float *x, int64_t M, int64_t K, float *xp) {
    const int d16 = fmt == F_BF16 || fmt == F_INT4 || fmt == F_MXFP4;
    for (int64_t m0 = 0; m0 < M;) {
        const int64_t mr = 1 << mblock(M - m0);
        float *o = xp + m0 * K;
        for (int64_t k = 0; k < K; k += 16)
            for (int64_t m = 0; m < mr; m++)
                for (int j = 0; j < 16; j++) {
                    int64_t src = d16 ? k + (j < 8 ? 2 * j : 2 * (j - 8) + 1) : k + j;
                    o[(k / 8 + j / 8) * 8 * mr + m * 8 + j % 8] = x[(m0 + m) * K + src];
                }
        m0 += mr;
    }
}

#endif /* QS_SIMD */

/* ---- the driver: items (expert, rows n0..n1) over OpenMP threads ---- */

typedef struct { int64_t e, n0, n1; } item;

#if QS_SIMD
/* Ask for rows n0..n1's weights in columns k0..k1 one kernel call ahead of reading them. With several rows of x the
   chunks are short (kc = 512 columns at mr = 8: 4 cache lines of an int4 row, then the next row 3.5 KiB on), a
   pattern the hardware prefetchers miss: at M = 8 this took int4 from 22.8 to 26.0 and int8 from 19.9 to 24.0 G
   weight-rows/s (4096 x 7168, one thread). At mr = 1 rows are read in runs of 4096 columns and it made no
   difference. */
static inline void prefetch_rows(const wts *w, int64_t n0, int64_t n1, int64_t k0, int64_t k1) {
    const int64_t bps = BPS[w->fmt], qrow = bps * (w->K / 16), b0 = k0 / 16 * bps, b1 = k1 / 16 * bps;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t b = b0; b < b1; b += 64) _mm_prefetch((const char *)(w->q + n * qrow + b), _MM_HINT_T0);
}
#endif

static void run_item(const wts *w, const float *x, int64_t M, float *y, int64_t ldy, int64_t n0, int64_t n1) {
    const int64_t K = w->K;
#if QS_SIMD
    for (int64_t m0 = 0; m0 < M;) {
        const int mi = mblock(M - m0), mr = 1 << mi, nr = NR_OF[mi];
        const int64_t kc = 4096 / mr;  /* this block's x chunk, mr * kc * 4 bytes = 16 KiB: half of L1 */
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
            int64_t k1 = k0 + kc < K ? k0 + kc : K, n = n0;
            for (; n + nr <= n1; n += nr) {
                if (mr > 1) prefetch_rows(w, n + nr, n + 2 * nr < n1 ? n + 2 * nr : n1, k0, k1);
                KERNELS[w->fmt][mi][0](w, x + m0 * K, k0, k1, n, y + m0 * ldy, ldy, k0 == 0);
            }
            for (; n < n1; n++) KERNELS[w->fmt][mi][1](w, x + m0 * K, k0, k1, n, y + m0 * ldy, ldy, k0 == 0);
        }
        m0 += mr;
    }
#else
    float *row = (float *)malloc(sizeof(float) * (size_t)K);
    if (!row) abort();
    for (int64_t n = n0; n < n1; n++) {
        dequant_row(w, n, 0, K, row);
        for (int64_t m = 0; m < M; m++) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++) s += x[m * K + k] * row[k];
            y[m * ldy + n] = s;
        }
    }
    free(row);
#endif
}

/* 1 when the vector path is compiled in, 0 for the scalar one. */
int qs_simd(void) { return QS_SIMD; }

/* Experts e = 0..E-1, rows of x sorted by expert (counts[e] each); q and scale hold E stacked weights. x (R, K),
   y (R, N). Returns 0, or -1 for arguments it does not take (kernels.py checks them first) or no memory. */
int qs_grouped_mm(int fmt, const float *x, int64_t R, int64_t K, int64_t N, int64_t E, const int64_t *counts,
                  const void *q, const void *scale, int64_t group, int64_t block, float *y, int nthreads) {
    if (fmt < 0 || fmt > 4 || K % 32 || N < 0 || E < 0 || nthreads < 1) return -1;
    if (fmt == F_INT4 && (group % 16 || group <= 0 || K % group)) return -1;
    if (fmt == F_FP8 && (block % 16 || block <= 0)) return -1;
    int64_t qbytes = fmt == F_BF16 ? 2 * N * K : fmt == F_INT4 || fmt == F_MXFP4 ? N * K / 2 : N * K;
    int64_t sbytes = fmt == F_INT8 ? 4 * N : fmt == F_INT4 ? 2 * N * (K / (group > 0 ? group : 1))
                   : fmt == F_MXFP4 ? N * (K / 32)
                   : fmt == F_FP8 ? 4 * ((N + block - 1) / block) * ((K + block - 1) / block) : 0;
    int64_t *off = (int64_t *)malloc(sizeof(int64_t) * (size_t)(E + 1));
    if (!off) return -1;
    off[0] = 0;
    int64_t active = 0;
    for (int64_t e = 0; e < E; e++) {
        off[e + 1] = off[e] + counts[e];
        active += counts[e] > 0;
    }
    if (off[E] != R) { free(off); return -1; }
    /* Row blocks: an item's weights (<= 128 KiB) stay in L2 while it runs its blocks of rows of x; at least 8
       items per thread when there are rows enough, so that dynamic scheduling evens out experts of unequal rows. */
    int64_t row_bytes = qbytes / (N > 0 ? N : 1);
    int64_t rb = (128 * 1024) / (row_bytes > 0 ? row_bytes : 1);
    int64_t fair = active * N / (8 * (int64_t)nthreads);
    if (rb > fair) rb = fair;
    if (rb > 64) rb = 64;
    rb &= ~(int64_t)3;
    if (rb < 4) rb = 4;
    int64_t nb = (N + rb - 1) / rb, nitems = active * nb, i = 0;
    item *items = (item *)malloc(sizeof(item) * (size_t)(nitems > 0 ? nitems : 1));
    float *xp = NULL;
#if QS_SIMD
    xp = (float *)malloc(sizeof(float) * (size_t)(R * K > 0 ? R * K : 1));
#endif
    if (!items || (QS_SIMD && !xp)) { free(off); free(items); free(xp); return -1; }
    for (int64_t e = 0; e < E; e++)
        if (counts[e] > 0)
            for (int64_t b = 0; b < nb; b++) {
                items[i].e = e; items[i].n0 = b * rb; items[i].n1 = (b + 1) * rb < N ? (b + 1) * rb : N; i++;
            }
#if QS_SIMD
    for (int64_t e = 0; e < E; e++) pack_x(fmt, x + off[e] * K, counts[e], K, xp + off[e] * K);
    const float *xs = xp;
#else
    const float *xs = x;
#endif
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t it = 0; it < nitems; it++) {
        int64_t e = items[it].e;
        wts w = {fmt, N, K, group, block, (const uint8_t *)q + e * qbytes,
                 scale ? (const uint8_t *)scale + e * sbytes : NULL};
        run_item(&w, xs + off[e] * K, counts[e], y + off[e] * N, N, items[it].n0, items[it].n1);
    }
    free(off); free(items); free(xp);
    return 0;
}
