/* Weight-only quantised matmuls for CPU decoding: y (M, N) = x (M, K) @ W (N, K)^T, float32 out.

Built and loaded by kernels.py, which holds the layouts, the API, the error bounds and the measurements; this file is
the arithmetic. Two kinds of it, chosen per call by `act`:

fp32 (A_FP32): x stays float32. Each weight's code (int8 q, int4 nibble - 8, fp8's e4m3 value) is converted exactly
to float32 and multiplied into float32 accumulators; the scale is applied once per group, to the group's sum (int4:
G inputs, fp8: the row's part of a B x B block, int8: the whole row, after the horizontal sum): sum_g s_g (sum_{k in
g} q_k x_k), one multiply-add per group and row of x instead of one per weight. mxfp4 applies its power-of-two scale
once per group to the 8-entry table it decodes through (exact; see mx_table), bf16 has none.

q8 (A_Q8; int8, int4, mxfp4): each row of x is quantised to int8 per block of 32 inputs like llama.cpp's Q8_0
(d = max|x| / 127, codes round(x / d) half to even), and a block's dot product of x codes with weight codes is an
exact integer (|.| < 2^20): AVX2 _mm256_maddubs_epi16 (unsigned x signed bytes into int16 pairs) then
_mm256_madd_epi16 into int32, or vpdpbusd where the compiler targets AVX-VNNI / AVX512-VNNI. maddubs wants one
operand unsigned, so the weight codes are made so (int4: the nibble itself, 0..15; mxfp4: 2 e2m1 + 12 through a
16-byte pshufb table, 0..24; int8 under VNNI: q + 128) and the block's offset times its x code sum, precomputed with
x, is subtracted; int8 under AVX2 (q + 128 would saturate maddubs' int16 pairs) multiplies |q| by x's codes with q's
sign instead. The integer block sum is converted to float (exact) and multiplied into float32 accumulators by
D = d_x * s_w (mxfp4: s_w = 2^(e - 128), since its codes are 2 e2m1).

Structure. The work is a list of items (expert, block of output rows) shared out by OpenMP, only experts with rows
taking part. Within an item, rows of x are taken MR at a time (8, 4, 2, 1), columns in chunks whose x fits half of
L1, and the item's rows NR at a time: a register-blocked kernel decodes 16 weights (fp32) or 256 (q8: a
"superblock" of 8 blocks) of each of NR rows and multiplies them into MR x NR accumulators, so a decoded weight
serves MR rows of x and a loaded x vector NR rows of W. Rows and scales are walked by pointer (no division in the
loops: 64-bit divisions per int4 group had held M = 1, G = 32 to half its speed).

fp32: x is repacked once per call, per block of MR rows, as [k / 8][MR][8]: its loads form one stream (MR rows
K * 4 bytes apart alias in L1 when K is a multiple of 1024; at K = 7168 the M = 8 kernel ran at 15 against 24 G
weight-rows/s before repacking). Within 16 columns bf16, int4 and mxfp4 put the 8 even columns first, the order in
which unpacking two values per 32-bit lane (bf16) or a low and a high nibble per byte (int4, mxfp4) yields them.
Vector ops per 16 weights of a row (AVX2), before the two FMAs per row of x:
  bf16  load, shift, and                          3     int8  2 widening loads, 2 cvt             4
  int4  widening load, and, shift, 2 cvt, 2 sub   7     mxfp4 widening load, 3 shifts, 2 vpermd, 2 xor   8
  fp8   widening load, shift, and, extract, 2 vcvtph2ps   6
plus, per group and row of x, one FMA (int4, fp8; int4's subtractions run on the FP adders, leaving the two FMA
pipes to the products), or two ops per group and row of W (mxfp4's table).

q8: x is repacked per block of MR rows as [superblock][MR] records of 320 bytes: 256 codes, the 8 blocks' d_x and
their code-sum corrections. int4 and mxfp4 load 32 bytes (2 blocks) of a row at a time: their low nibbles are the
even columns and the high ones the odd, so a record's codes hold, per 64 columns, the 32 even ones first. Per 2
blocks the two maddubs (low, high nibbles) add in int16 (|.| <= 2 * 2 * 24 * 127, no overflow) before one madd;
three hadds reduce 4 such vectors to the 8 block sums, in lane order 0 2 4 6 1 3 5 7 (the records store d_x and the
corrections in that order; the weight scales are permuted to it). int8 reduces 8 one-block vectors with 6 hadds, 2
lane permutes and an add. Per superblock and row of x that is one int add, one cvt, one mul (D) and one FMA.

The AVX2 + FMA + F16C path is used when the compiler targets them (-march=native on such a CPU); anything else,
or -DQS_SCALAR, builds the portable scalar path, correct but slow. -DQS_EMULATE_VNNI builds the VNNI variant of the
q8 path with vpdpbusd emulated exactly by AVX2, so a machine without VNNI tests its offsets (the tests build and check
all three). */

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(QS_SCALAR)
#define QS_SIMD 1
#include <immintrin.h>
#else
#define QS_SIMD 0
#endif
#if QS_SIMD && (defined(QS_EMULATE_VNNI) || defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__)))
#define QS_VNNI 1
#else
#define QS_VNNI 0
#endif

enum { F_BF16 = 0, F_INT8 = 1, F_INT4 = 2, F_MXFP4 = 3, F_FP8 = 4 };
enum { A_FP32 = 0, A_Q8 = 1 };
#define QB 32  /* inputs per block of quantised x */

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

static inline float e4m3_to_f32(uint8_t b) {  /* exact for every byte but NaN (0x7F, 0xFF), which weights never hold */
    int e = (b >> 3) & 15, m = b & 7;
    float mag = e ? (float)(8 + m) * (1.0f / 8) : (float)m * (1.0f / 8);  /* 1.m * 2^(e - 7) or 0.m * 2^-6 */
    float p = 1.0f;
    for (int i = 7; i < (e ? e : 1); i++) p *= 2.0f;
    for (int i = (e ? e : 1); i < 7; i++) p *= 0.5f;
    return (b & 0x80) ? -mag * p : mag * p;
}

#if !QS_SIMD
/* x[0:32] -> its Q8_0 codes c; returns d = max|x| / 127. The codes are round(x / d) by a division, not a
   multiplication by 1 / d, so that they are the ones torch's round(x / d) gives: adding and subtracting 1.5 * 2^23
   rounds |v| <= 127.5 to an integer, to nearest even in the default rounding mode (no libm, no -ffast-math here to
   fold it away); 0 when d = 0. */
static float q8_block(const float *x, int8_t *c) {
    float amax = 0.0f;
    for (int i = 0; i < QB; i++) {
        const float a = x[i] < 0.0f ? -x[i] : x[i];
        amax = a > amax ? a : amax;
    }
    const float d = amax / 127.0f;
    for (int i = 0; i < QB; i++) c[i] = d > 0.0f ? (int8_t)(int)((x[i] / d + 0x1.8p23f) - 0x1.8p23f) : 0;
    return d;
}

static const float E2M1[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                               -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

static inline int nibble(const wts *w, int64_t n, int64_t k) {
    uint8_t b = w->q[n * (w->K / 2) + k / 2];
    return (k & 1) ? b >> 4 : b & 15;
}

/* w[n, k]'s code: the value its scale multiplies */
static inline float code_at(const wts *w, int64_t n, int64_t k) {
    switch (w->fmt) {
    case F_BF16: return bf16_to_f32(((const uint16_t *)w->q)[n * w->K + k]);
    case F_INT8: return (float)((const int8_t *)w->q)[n * w->K + k];
    case F_INT4: return (float)(nibble(w, n, k) - 8);
    case F_MXFP4: return E2M1[nibble(w, n, k)];
    default: return e4m3_to_f32(w->q[n * w->K + k]);
    }
}

/* the scale of w[n, k] (bf16: 1) and the columns it spans from a multiple of them */
static inline float scale_of(const wts *w, int64_t n, int64_t k) {
    switch (w->fmt) {
    case F_INT8: return ((const float *)w->scale)[n];
    case F_INT4: return bf16_to_f32(((const uint16_t *)w->scale)[n * (w->K / w->group) + k / w->group]);
    case F_MXFP4: return e8m0_to_f32(((const uint8_t *)w->scale)[n * (w->K / 32) + k / 32]);
    case F_FP8: return ((const float *)w->scale)[(n / w->block) * ((w->K + w->block - 1) / w->block) + k / w->block];
    default: return 1.0f;
    }
}

static inline int64_t scale_span(const wts *w) {
    return w->fmt == F_INT4 ? w->group : w->fmt == F_MXFP4 ? 32 : w->fmt == F_FP8 ? w->block : w->K;
}

/* q8: w[n, k]'s integer code (int4 nibble - 8, mxfp4 2 e2m1) and its block's scale (mxfp4 halved to match) */
static inline int q8_code(const wts *w, int64_t n, int64_t k) {
    if (w->fmt == F_INT8) return ((const int8_t *)w->q)[n * w->K + k];
    if (w->fmt == F_INT4) return nibble(w, n, k) - 8;
    return (int)(2.0f * E2M1[nibble(w, n, k)]);
}

static inline float q8_scale(const wts *w, int64_t n, int64_t k) {
    return w->fmt == F_MXFP4 ? 0.5f * scale_of(w, n, k) : scale_of(w, n, k);
}
#endif

#if QS_SIMD

/* ==== fp32 activations ====
   deq() turns the next 16 weights (BPS bytes) of a row into their codes (mxfp4: its scaled values), w0, w1, matched
   with the permuted x's two vectors for those 16 columns. A row is walked in segments of seg_len columns, its groups,
   at whose start gscale() (int4, fp8) or mx_table() (mxfp4) reads the group's scale. */

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

/* int4 and fp8: the scale of the group that starts at sp, broadcast. fp8's codes come out of deq() as value / 2^8
   (see there): the 2^8 goes into the scale, exactly */
static inline __m256 gscale(const int fmt, const uint8_t *sp) {
    return fmt == F_INT4 ? _mm256_set1_ps(bf16_to_f32(*(const uint16_t *)sp))
                         : _mm256_set1_ps(*(const float *)sp * 256.0f);
}

/* mxfp4's table for a group: lane i holds bits(e2m1(i) * s) ^ (i << 28), so that table[c & 7] ^ (c << 28) (the code
   shifted to the top bits, its sign bit landing on bit 31) cancels the low code bits and leaves the signed value:
   one permute, one shift and one xor per 8 weights, the scale already applied, once per group and exactly (a power
   of two). Applying it to the group's sum instead, as int4 and fp8 do, measured slower at M = 8 (one FMA per group
   and row of x against two ops per group) and no faster at M = 1. */
static inline __m256i mx_table(const uint8_t *sp) {
    const __m256 mag = _mm256_setr_ps(0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f);
    const __m256i idx = _mm256_setr_epi32(0, 1 << 28, 2 << 28, 3 << 28, 4 << 28, 5 << 28, 6 << 28, 7 << 28);
    return _mm256_xor_si256(_mm256_castps_si256(_mm256_mul_ps(mag, _mm256_set1_ps(e8m0_to_f32(*sp)))), idx);
}

static inline void deq(const int fmt, const uint8_t *p, __m256i t, __m256 *w0, __m256 *w1) {
    switch (fmt) {
    case F_BF16: {  /* 16 bf16: the even ones are the low halves of 32-bit lanes, the odd ones the high halves */
        __m256i v = _mm256_loadu_si256((const __m256i *)p);
        *w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
        *w1 = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
        break;
    }
    case F_INT8:
        *w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
        *w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
        break;
    case F_INT4: {  /* nibble - 8 on the FP adders (exact), leaving the FMA pipes to the products */
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
        *w0 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15))), _mm256_set1_ps(8.0f));
        *w1 = _mm256_sub_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4)), _mm256_set1_ps(8.0f));
        break;
    }
    case F_MXFP4: {
        __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
        __m256i h = _mm256_srli_epi32(b, 4);
        *w0 = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_permutevar8x32_epi32(t, b), _mm256_slli_epi32(b, 28)));
        *w1 = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_permutevar8x32_epi32(t, h), _mm256_slli_epi32(h, 28)));
        break;
    }
    default: {  /* F_FP8: the byte sign-extended to 16 bits, << 7, bit 14 cleared: the fp16 of value / 2^8 */
        __m256i v = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
        v = _mm256_and_si256(_mm256_slli_epi16(v, 7), _mm256_set1_epi16((short)0xBFFF));
        *w0 = _mm256_cvtph_ps(_mm256_castsi256_si128(v));
        *w1 = _mm256_cvtph_ps(_mm256_extracti128_si256(v, 1));
    }
    }
}

/* the horizontal sums of a, b, c, d */
static inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

#define MRMAX 8
#define NRMAX 4

/* y[m, n + r] (+)= the MR x NR accumulators' horizontal sums (int8 fp32: times the row's scale) */
static inline __attribute__((always_inline)) void store_sums(const int fmt, const int act, const int MR,
                                                             const int NR, const wts *w, __m256 acc[MRMAX][NRMAX],
                                                             int64_t n, float *y, int64_t ldy, int store) {
    float sums[MRMAX * NRMAX + 3];
    __m256 a[MRMAX * NRMAX + 3];
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < NR; r++) a[m * NR + r] = acc[m][r];
    for (int i = MR * NR; i % 4; i++) a[i] = _mm256_setzero_ps();
    for (int i = 0; i < MR * NR; i += 4) _mm_storeu_ps(sums + i, hsum4(a[i], a[i + 1], a[i + 2], a[i + 3]));
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < NR; r++) {
            float v = sums[m * NR + r], *o = y + m * ldy + n + r;
            if (fmt == F_INT8 && act == A_FP32) v *= ((const float *)w->scale)[n + r];
            *o = store ? v : *o + v;
        }
}

/* y[m, n + r] (+)= sum over k0 <= k < k1 of x[m, k] w[n + r, k], m < MR, r < NR; xb is this block of MR rows of x,
   packed [k / 8][MR][8] (so its loads are one stream, whatever K is: rows of x K * 4 bytes apart alias in L1 when
   K is a multiple of 1024). int4 and fp8: codes times x go into accumulators g, one per (m, r) and group; at the
   group's end g times the group's scale is added to acc, and the next group's chains start from zero, independent
   of the last (a second accumulator per (m, r) to lengthen them measured no faster at M = 1). bf16, int8 and mxfp4
   accumulate the chunk in g (int8: its scale applied after the horizontal sum), two accumulators per (m, r) while
   there are fewer than 8 (m, r) pairs, so that 8 FMA chains hide the FMA latency. */
static inline __attribute__((always_inline)) void kern(const int fmt, const int MR, const int NR, const wts *w,
                                                       const float *xb, int64_t k0, int64_t k1, int64_t n, float *y,
                                                       int64_t ldy, int store) {
    const int scaled = fmt == F_INT4 || fmt == F_FP8, segs = scaled || fmt == F_MXFP4, two = MR * NR < 8 && !scaled;
    const int64_t bps = BPS[fmt], qrow = bps * (w->K / 16), seg = seg_len(fmt, w), sstep = SSTEP[fmt];
    const uint8_t *qp = w->q + n * qrow + (k0 / 16) * bps;
    const uint8_t *sp[NRMAX];
    for (int r = 0; r < NR; r++) sp[r] = scale_at(fmt, w, n + r, k0);
    const float *xv = xb + k0 * MR;
    __m256 acc[MRMAX][NRMAX], g[MRMAX][NRMAX][2];
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < NR; r++) acc[m][r] = g[m][r][0] = g[m][r][1] = _mm256_setzero_ps();
    int64_t k = k0, ke = segs ? k0 - k0 % seg + seg : k1;
    while (k < k1) {
        if (ke > k1) ke = k1;
        __m256i tab[NRMAX];
        for (int r = 0; r < NR; r++) tab[r] = fmt == F_MXFP4 ? mx_table(sp[r]) : _mm256_setzero_si256();
        for (; k < ke; k += 16, qp += bps, xv += 16 * MR) {
            for (int r = 0; r < NR; r++) {
                __m256 w0, w1;
                deq(fmt, qp + r * qrow, tab[r], &w0, &w1);
                for (int m = 0; m < MR; m++) {
                    __m256 x0 = _mm256_loadu_ps(xv + 8 * m), x1 = _mm256_loadu_ps(xv + 8 * (MR + m));
                    if (two) {
                        g[m][r][0] = _mm256_fmadd_ps(w0, x0, g[m][r][0]);
                        g[m][r][1] = _mm256_fmadd_ps(w1, x1, g[m][r][1]);
                    } else {
                        g[m][r][0] = _mm256_fmadd_ps(w1, x1, _mm256_fmadd_ps(w0, x0, g[m][r][0]));
                    }
                }
            }
        }
        for (int r = 0; r < NR; r++) {
            if (scaled) {
                const __m256 s = gscale(fmt, sp[r]);
                for (int m = 0; m < MR; m++) {
                    acc[m][r] = _mm256_fmadd_ps(g[m][r][0], s, acc[m][r]);
                    g[m][r][0] = _mm256_setzero_ps();
                }
            }
            sp[r] += sstep;
        }
        ke += seg;
    }
    if (!scaled)
        for (int m = 0; m < MR; m++)
            for (int r = 0; r < NR; r++) acc[m][r] = two ? _mm256_add_ps(g[m][r][0], g[m][r][1]) : g[m][r][0];
    store_sums(fmt, A_FP32, MR, NR, w, acc, n, y, ldy, store);
}

/* ==== q8 activations ==== */

#define QREC 320  /* bytes of one row's superblock in packed x: 256 codes, 8 float d_x, 8 int32 corrections */
static const int LANE4[8] = {0, 2, 4, 6, 1, 3, 5, 7};  /* int4 / mxfp4: lane i of a block-sum vector is block LANE4[i] */

#if QS_VNNI
/* acc + the sums of 4 adjacent products u (unsigned) * s (signed) per 32-bit lane */
static inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(QS_EMULATE_VNNI)  /* exact: 16-bit products of bytes, pairs summed into 32 bits by madd */
    const __m256i lo = _mm256_set1_epi16(0xFF);
    __m256i ue = _mm256_and_si256(u, lo), uo = _mm256_srli_epi16(u, 8);
    __m256i se = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8), so = _mm256_srai_epi16(s, 8);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(ue, se), _mm256_madd_epi16(uo, so)));
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#endif
}
#endif

/* the row's scales: int8 its one, int4 / mxfp4 its first */
static inline const uint8_t *row_scales(const int fmt, const wts *w, int64_t n) {
    const uint8_t *s = (const uint8_t *)w->scale;
    return fmt == F_INT8 ? s + 4 * n : fmt == F_INT4 ? s + 2 * n * (w->K / w->group) : s + n * (w->K / 32);
}

/* the 8 weight block scales of superblock sb of a row whose scales start at rs, in the lane order of that format's
   block sums; blocks past nblk are 0. int4: r = G / 32 blocks per scale. */
static inline __m256 wscale8(const int fmt, const uint8_t *rs, int64_t sb, int nblk, int64_t r) {
    if (fmt == F_INT8) return _mm256_set1_ps(*(const float *)rs);
    const __m256i lane = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    float t[8] = {0};
    if (fmt == F_MXFP4) {  /* 2^(e - 128): e << 23 is 2^(e - 127) for e > 0, halved exactly; e = 0 is 2^-128 */
        const uint8_t *s = rs + sb * 8;
        if (nblk == 8) {
            __m256i e = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)s));
            __m256 v = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(e, 23)), _mm256_set1_ps(0.5f));
            return _mm256_permutevar8x32_ps(_mm256_max_ps(v, _mm256_set1_ps(0x1p-128f)), lane);
        }
        for (int i = 0; i < 8; i++)
            if (LANE4[i] < nblk) t[i] = 0.5f * e8m0_to_f32(s[LANE4[i]]);
        return _mm256_loadu_ps(t);
    }
    /* int4: block b of the row has scale b / r */
    const uint16_t *s = (const uint16_t *)rs;
    const int64_t b0 = sb * 8;
    if (nblk == 8) {
        if (r == 1) {
            __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(s + b0)));
            return _mm256_permutevar8x32_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), lane);
        }
        if (r == 2) {
            __m128i v = _mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)(s + b0 / 2))), 16);
            return _mm256_castsi256_ps(_mm256_broadcastsi128_si256(v));
        }
        if (r == 4) {
            const float a = bf16_to_f32(s[b0 / 4]), c = bf16_to_f32(s[b0 / 4 + 1]);
            return _mm256_setr_ps(a, a, c, c, a, a, c, c);
        }
        if (r % 8 == 0) return _mm256_set1_ps(bf16_to_f32(s[b0 / r]));  /* all 8 blocks in one group */
    }
    for (int i = 0; i < 8; i++)
        if (LANE4[i] < nblk) t[i] = bf16_to_f32(s[(b0 + LANE4[i]) / r]);
    return _mm256_loadu_ps(t);
}

/* 32 bytes at p of which `have` (a multiple of 16) are the row's: those past it read as 0 codes (their x codes are 0)
   and are not read. Why not a zero-padded copy: rows of one superblock or less (MLA's per-head kv_b_proj, K = 128)
   spent more time copying than multiplying. */
static inline __m256i load_part(const uint8_t *p, int64_t have) {
    if (have >= 32) return _mm256_loadu_si256((const __m256i *)p);
    if (have >= 16) return _mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)p));
    return _mm256_setzero_si256();
}

/* acc += (block sums + corrections) * (d_x * s_w): the only float arithmetic of the q8 path */
static inline __m256 q8_finish(__m256 acc, __m256i p, const uint8_t *rec, __m256 sw) {
    p = _mm256_add_epi32(p, _mm256_loadu_si256((const __m256i *)(rec + 288)));
    __m256 d = _mm256_mul_ps(_mm256_loadu_ps((const float *)(rec + 256)), sw);
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), d, acc);
}

/* y[m, n + r] (+)= sum over superblocks s0 <= sb < s1 (256 columns each, the last one maybe partial) of x[m] w[n + r];
   xb is this block of MR rows of x, packed as QREC-byte records [sb][MR]. */
static inline __attribute__((always_inline)) void kern8(const int fmt, const int MR, const int NR, const wts *w,
                                                        const uint8_t *xb, int64_t s0, int64_t s1, int64_t n,
                                                        float *y, int64_t ldy, int store) {
    const int64_t K = w->K, qrow = fmt == F_INT8 ? K : K / 2, bsb = fmt == F_INT8 ? 256 : 128;
    const __m256i nib = _mm256_set1_epi8(15);
    /* mxfp4: 2 e2m1(c) + 12 for c = 0..15, in both 128-bit lanes for pshufb */
    const __m256i t8 = _mm256_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0,
                                        12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0);
#if !QS_VNNI
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    __m256 acc[MRMAX][NRMAX];
    const uint8_t *rs[NRMAX];
    const int64_t bpg = fmt == F_INT4 ? w->group / 32 : 1;  /* blocks per int4 group */
    for (int r = 0; r < NR; r++) rs[r] = row_scales(fmt, w, n + r);
    for (int m = 0; m < MR; m++)
        for (int r = 0; r < NR; r++) acc[m][r] = _mm256_setzero_ps();
    /* one row after another, each read front to back. Stepping the NR rows' superblocks in turn (NR streams a row
       apart, each advancing 128-256 bytes) is a pattern the hardware prefetchers follow badly: it decoded short
       rows (K of 1-2k) at a fraction of the memory's rate (docs/quant.md). x is reloaded per row either way. */
    for (int r = 0; r < NR; r++) {
      for (int64_t sb = s0; sb < s1; sb++) {
            const int nblk = K - sb * 256 >= 256 ? 8 : (int)((K - sb * 256) / 32);
            const uint8_t *qp = w->q + (n + r) * qrow + sb * bsb;
            const int64_t have = nblk * bsb / 8;  /* bytes of this superblock in the row (a last one may be partial) */
            const __m256 sw = wscale8(fmt, rs[r], sb, nblk, bpg);
            /* the superblock 16 ahead (this row's, then the next one's: rows are adjacent), every line of it: with
               one stream per thread the hardware prefetchers alone left the memory's rate a quarter short
               (docs/quant.md) */
            for (int64_t l = 0; l < bsb; l += 64) _mm_prefetch((const char *)(qp + 16 * bsb + l), _MM_HINT_T0);
            if (fmt == F_INT8) {
                __m256i v[8], u[8];
                for (int j = 0; j < 8; j++) {
                    v[j] = load_part(qp + 32 * j, have - 32 * j);
#if QS_VNNI
                    u[j] = _mm256_xor_si256(v[j], _mm256_set1_epi8((char)0x80));  /* q + 128 */
#else
                    u[j] = _mm256_abs_epi8(v[j]);
#endif
                }
                for (int m = 0; m < MR; m++) {
                    const uint8_t *rec = xb + (sb * MR + m) * QREC;
                    __m256i p[8];
                    for (int j = 0; j < 8; j++) {
                        __m256i xv = _mm256_loadu_si256((const __m256i *)(rec + 32 * j));
#if QS_VNNI
                        p[j] = dpbusd(_mm256_setzero_si256(), u[j], xv);
#else
                        p[j] = _mm256_madd_epi16(_mm256_maddubs_epi16(u[j], _mm256_sign_epi8(xv, v[j])), ones);
#endif
                    }
                    __m256i q0 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
                    __m256i q1 = _mm256_hadd_epi32(_mm256_hadd_epi32(p[4], p[5]), _mm256_hadd_epi32(p[6], p[7]));
                    __m256i s = _mm256_add_epi32(_mm256_permute2x128_si256(q0, q1, 0x20),
                                                 _mm256_permute2x128_si256(q0, q1, 0x31));
                    acc[m][r] = q8_finish(acc[m][r], s, rec, sw);
                }
            } else {
                __m256i lo[4], hi[4];
                for (int j = 0; j < 4; j++) {
                    __m256i v = load_part(qp + 32 * j, have - 32 * j);
                    lo[j] = _mm256_and_si256(v, nib);
                    hi[j] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nib);
                    if (fmt == F_MXFP4) {
                        lo[j] = _mm256_shuffle_epi8(t8, lo[j]);
                        hi[j] = _mm256_shuffle_epi8(t8, hi[j]);
                    }
                }
                for (int m = 0; m < MR; m++) {
                    const uint8_t *rec = xb + (sb * MR + m) * QREC;
                    __m256i p[4];
                    for (int j = 0; j < 4; j++) {
                        __m256i xl = _mm256_loadu_si256((const __m256i *)(rec + 64 * j));
                        __m256i xh = _mm256_loadu_si256((const __m256i *)(rec + 64 * j + 32));
#if QS_VNNI
                        p[j] = dpbusd(dpbusd(_mm256_setzero_si256(), lo[j], xl), hi[j], xh);
#else
                        p[j] = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(lo[j], xl),
                                                                  _mm256_maddubs_epi16(hi[j], xh)), ones);
#endif
                    }
                    __m256i s = _mm256_hadd_epi32(_mm256_hadd_epi32(p[0], p[1]), _mm256_hadd_epi32(p[2], p[3]));
                    acc[m][r] = q8_finish(acc[m][r], s, rec, sw);
                }
            }
        }
    }
    store_sums(fmt, A_Q8, MR, NR, w, acc, n, y, ldy, store);
}

typedef void (*kern_fn)(const wts *, const void *, int64_t, int64_t, int64_t, float *, int64_t, int);

#define KERN(NAME, BODY, FMT, MR, NR, XT)                                                                          \
    static void NAME(const wts *w, const void *xb, int64_t k0, int64_t k1, int64_t n, float *y, int64_t ldy,     \
                     int store) {                                                                                   \
        BODY(FMT, MR, NR, w, (const XT *)xb, k0, k1, n, y, ldy, store);                                             \
    }
/* rows of weight per kernel call for MR = 1, 2, 4, 8 rows of x: 4 to 8 (m, r) pairs. NR = 2 against 4 at MR = 1,
   1 against 2 at MR = 8, and M = 8 as two MR = 4 blocks were all within this machine's noise of these. */
#define NR1 4
#define NR2 4
#define NR4 2
#define NR8 1
#define KERNS(P, BODY, XT, F)                                                                                      \
    KERN(P##F##_1, BODY, F, 1, NR1, XT) KERN(P##F##_2, BODY, F, 2, NR2, XT) KERN(P##F##_4, BODY, F, 4, NR4, XT)    \
    KERN(P##F##_8, BODY, F, 8, NR8, XT) KERN(P##F##_1r, BODY, F, 1, 1, XT) KERN(P##F##_2r, BODY, F, 2, 1, XT)      \
    KERN(P##F##_4r, BODY, F, 4, 1, XT) KERN(P##F##_8r, BODY, F, 8, 1, XT)
KERNS(kf_, kern, float, 0) KERNS(kf_, kern, float, 1) KERNS(kf_, kern, float, 2) KERNS(kf_, kern, float, 3)
KERNS(kf_, kern, float, 4)
KERNS(kq_, kern8, uint8_t, 1) KERNS(kq_, kern8, uint8_t, 2) KERNS(kq_, kern8, uint8_t, 3)
#define ROW(P, F) {{P##F##_1, P##F##_1r}, {P##F##_2, P##F##_2r}, {P##F##_4, P##F##_4r}, {P##F##_8, P##F##_8r}}
static const kern_fn KERNELS[2][5][4][2] = {
    {ROW(kf_, 0), ROW(kf_, 1), ROW(kf_, 2), ROW(kf_, 3), ROW(kf_, 4)},
    {{{0}}, ROW(kq_, 1), ROW(kq_, 2), ROW(kq_, 3), {{0}}}};
static const int NR_OF[4] = {NR1, NR2, NR4, NR8};

/* rows of x are taken 8, 4, 2, 1 at a time: log2 of the block that starts with `left` rows to go */
static inline int mblock(int64_t left) { return left >= 8 ? 3 : left >= 4 ? 2 : left >= 2 ? 1 : 0; }

/* fp32: x rows -> xp, block by block, [k / 8][mr][8]; within 16 columns the 8 even ones first for D16 formats */
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

/* 32 inputs -> their Q8_0 codes (natural order) and d, as q8_block does: the same division (vdivps), rounded by
   vcvtps2dq in the default rounding mode (to nearest even); *sum gets the codes' sum */
static inline __m256i q8_block_simd(const float *x, float *d, int32_t *sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 v[4], a = _mm256_setzero_ps();
    for (int i = 0; i < 4; i++) {
        v[i] = _mm256_loadu_ps(x + 8 * i);
        a = _mm256_max_ps(a, _mm256_andnot_ps(sign, v[i]));
    }
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
    *d = _mm_cvtss_f32(h) / 127.0f;
    if (!(*d > 0.0f)) {
        *sum = 0;
        return _mm256_setzero_si256();
    }
    const __m256 dv = _mm256_set1_ps(*d);
    __m256i c[4];
    for (int i = 0; i < 4; i++) c[i] = _mm256_cvtps_epi32(_mm256_div_ps(v[i], dv));
    __m256i t = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
    __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    u = _mm_hadd_epi32(u, u);
    *sum = _mm_cvtsi128_si32(_mm_hadd_epi32(u, u));
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    return _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* q8: x rows -> QREC-byte records [sb][mr] per block of mr rows: the superblock's codes (int4 / mxfp4: per 64
   columns the 32 even ones first), then d_x and -offset * (code sum) of its 8 blocks in the block sums' lane order
   (0 past the row's end). offset: the constant the weight codes were raised by to make them unsigned. */
static void pack_x8(int fmt, const float *x, int64_t M, int64_t K, uint8_t *xp) {
    const int64_t nsb = (K + 255) / 256;
    const int nibbles = fmt != F_INT8, off = fmt == F_INT4 ? 8 : fmt == F_MXFP4 ? 12 : QS_VNNI ? 128 : 0;
    /* within each 128-bit lane: the 8 even bytes, then the 8 odd ones */
    const __m256i eo = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                        0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int64_t m0 = 0; m0 < M;) {
        const int64_t mr = 1 << mblock(M - m0);
        for (int64_t sb = 0; sb < nsb; sb++)
            for (int64_t m = 0; m < mr; m++) {
                uint8_t *rec = xp + ((m0 * nsb) + sb * mr + m) * QREC;
                const float *xr = x + (m0 + m) * K + sb * 256;
                const int nblk = K - sb * 256 >= 256 ? 8 : (int)((K - sb * 256) / 32);
                float d[8] = {0};
                int32_t sum[8] = {0};
                __m256i c[8];
                for (int b = 0; b < 8; b++) c[b] = b < nblk ? q8_block_simd(xr + 32 * b, d + b, sum + b)
                                                            : _mm256_setzero_si256();
                for (int b = 0; b < 8; b += 2) {
                    if (nibbles) {  /* [A evens | B evens], [A odds | B odds] for the blocks A, B of 64 columns */
                        __m256i a = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(c[b], eo), 0xD8);
                        __m256i e = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(c[b + 1], eo), 0xD8);
                        _mm256_storeu_si256((__m256i *)(rec + 32 * b), _mm256_permute2x128_si256(a, e, 0x20));
                        _mm256_storeu_si256((__m256i *)(rec + 32 * b + 32), _mm256_permute2x128_si256(a, e, 0x31));
                    } else {
                        _mm256_storeu_si256((__m256i *)(rec + 32 * b), c[b]);
                        _mm256_storeu_si256((__m256i *)(rec + 32 * b + 32), c[b + 1]);
                    }
                }
                float *rd = (float *)(rec + 256);
                int32_t *rc = (int32_t *)(rec + 288);
                for (int i = 0; i < 8; i++) {
                    const int b = nibbles ? LANE4[i] : i;
                    rd[i] = d[b];
                    rc[i] = -off * sum[b];
                }
            }
        m0 += mr;
    }
}

#endif /* QS_SIMD */

/* ---- the driver: items (expert, rows n0..n1) over OpenMP threads ---- */

typedef struct { int64_t e, n0, n1; } item;

/* bytes of one row of packed x */
static int64_t xrow_bytes(int act, int64_t K) {
#if QS_SIMD
    return act == A_Q8 ? (K + 255) / 256 * QREC : 4 * K;
#else
    return act == A_Q8 ? K + K / 8 : 4 * K;  /* q8: K codes, then K / 32 float d_x */
#endif
}

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

static void run_item(const wts *w, int act, const uint8_t *x, int64_t M, float *y, int64_t ldy, int64_t n0,
                     int64_t n1) {
    const int64_t K = w->K, xrow = xrow_bytes(act, K);
#if QS_SIMD
    /* chunks of columns whose packed x (mr rows) fits in half of L1: fp32 4096 / mr columns (16 KiB); q8 48 / mr
       superblocks (15 KiB), but at mr = 1 up to 128 (40 KiB, from L2): one row of x then covers K <= 32768 and each
       weight row is read in one run (at K = 16384 two chunks per row, two passes over the item's rows, read V3's
       o_proj at two thirds of the rate of one) */
    const int64_t span = act == A_Q8 ? 256 : 1, cols = act == A_Q8 ? (K + 255) / 256 : K;
    for (int64_t m0 = 0; m0 < M;) {
        const int mi = mblock(M - m0), mr = 1 << mi, nr = NR_OF[mi];
        const int64_t kc = act == A_Q8 ? (mr == 1 ? 128 : 48 / mr) : 4096 / mr;
        const kern_fn full = KERNELS[act][w->fmt][mi][0], one = KERNELS[act][w->fmt][mi][1];
        for (int64_t k0 = 0; k0 < cols; k0 += kc) {
            int64_t k1 = k0 + kc < cols ? k0 + kc : cols, n = n0;
            int64_t c0 = k0 * span, c1 = k1 * span < K ? k1 * span : K;
            for (; n + nr <= n1; n += nr) {
                if (mr > 1) prefetch_rows(w, n + nr, n + 2 * nr < n1 ? n + 2 * nr : n1, c0, c1);
                full(w, x + m0 * xrow, k0, k1, n, y + m0 * ldy, ldy, k0 == 0);
            }
            for (; n < n1; n++) one(w, x + m0 * xrow, k0, k1, n, y + m0 * ldy, ldy, k0 == 0);
        }
        m0 += mr;
    }
#else
    if (act == A_Q8) {
        int8_t *row = (int8_t *)malloc((size_t)K);
        if (!row) abort();
        for (int64_t n = n0; n < n1; n++) {
            for (int64_t k = 0; k < K; k++) row[k] = (int8_t)q8_code(w, n, k);
            for (int64_t m = 0; m < M; m++) {
                const int8_t *xq = (const int8_t *)(x + m * xrow);
                const float *xd = (const float *)(x + m * xrow + K);
                float acc = 0.0f;
                for (int64_t b = 0; b < K / QB; b++) {
                    int32_t p = 0;
                    for (int64_t k = b * QB; k < (b + 1) * QB; k++) p += row[k] * xq[k];
                    acc += (float)p * (xd[b] * q8_scale(w, n, b * QB));
                }
                y[m * ldy + n] = acc;
            }
        }
        free(row);
        return;
    }
    float *row = (float *)malloc(sizeof(float) * (size_t)K);
    if (!row) abort();
    const int64_t seg = scale_span(w);
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t k = 0; k < K; k++) row[k] = code_at(w, n, k);
        for (int64_t m = 0; m < M; m++) {
            const float *xm = (const float *)(x + m * xrow);
            float acc = 0.0f;
            for (int64_t k0 = 0; k0 < K; k0 += seg) {
                const int64_t k1 = k0 + seg < K ? k0 + seg : K;
                float g = 0.0f;
                for (int64_t k = k0; k < k1; k++) g += xm[k] * row[k];
                acc += g * scale_of(w, n, k0);
            }
            y[m * ldy + n] = acc;
        }
    }
    free(row);
#endif
}

/* x rows (one expert's, M of them) -> their packed form for `act` */
static void pack(int fmt, int act, const float *x, int64_t M, int64_t K, uint8_t *xp) {
#if QS_SIMD
    if (act == A_Q8) pack_x8(fmt, x, M, K, xp);
    else pack_x(fmt, x, M, K, (float *)xp);
#else
    const int64_t xrow = xrow_bytes(act, K);
    (void)fmt;
    for (int64_t m = 0; m < M; m++) {
        if (act == A_FP32) {
            memcpy(xp + m * xrow, x + m * K, sizeof(float) * (size_t)K);
            continue;
        }
        float *d = (float *)(xp + m * xrow + K);
        for (int64_t b = 0; b < K / QB; b++) d[b] = q8_block(x + m * K + b * QB, (int8_t *)(xp + m * xrow + b * QB));
    }
#endif
}

/* 1 when the vector path is compiled in, 0 for the scalar one. */
int qs_simd(void) { return QS_SIMD; }

/* 1 when the q8 path uses vpdpbusd (or its exact emulation, -DQS_EMULATE_VNNI). */
int qs_vnni(void) { return QS_VNNI; }

/* Experts e = 0..E-1, rows of x sorted by expert (counts[e] each); q and scale hold E stacked weights. x (R, K),
   y (R, N); act: A_FP32 or A_Q8 (int8, int4 with a group that is a multiple of 32, mxfp4). Returns 0, or -1 for
   arguments it does not take (kernels.py checks them first) or no memory. */
int qs_grouped_mm(int fmt, int act, const float *x, int64_t R, int64_t K, int64_t N, int64_t E, const int64_t *counts,
                  const void *q, const void *scale, int64_t group, int64_t block, float *y, int nthreads) {
    if (fmt < 0 || fmt > 4 || K % 32 || N < 0 || E < 0 || nthreads < 1 || act < 0 || act > 1) return -1;
    if (fmt == F_INT4 && (group % 16 || group <= 0 || K % group)) return -1;
    if (fmt == F_FP8 && (block % 16 || block <= 0)) return -1;
    if (act == A_Q8 && !(fmt == F_INT8 || fmt == F_MXFP4 || (fmt == F_INT4 && group % 32 == 0))) return -1;
    int64_t qbytes = fmt == F_BF16 ? 2 * N * K : fmt == F_INT4 || fmt == F_MXFP4 ? N * K / 2 : N * K;
    int64_t sbytes = fmt == F_INT8 ? 4 * N : fmt == F_INT4 ? 2 * N * (K / (group > 0 ? group : 1))
                   : fmt == F_MXFP4 ? N * (K / 32)
                   : fmt == F_FP8 ? 4 * ((N + block - 1) / block) * ((K + block - 1) / block) : 0;
    const int64_t xrow = xrow_bytes(act, K);
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
    uint8_t *xp = (uint8_t *)malloc((size_t)(R * xrow > 0 ? R * xrow : 1));
    if (!items || !xp) { free(off); free(items); free(xp); return -1; }
    for (int64_t e = 0; e < E; e++)
        if (counts[e] > 0)
            for (int64_t b = 0; b < nb; b++) {
                items[i].e = e; items[i].n0 = b * rb; items[i].n1 = (b + 1) * rb < N ? (b + 1) * rb : N; i++;
            }
    for (int64_t e = 0; e < E; e++) pack(fmt, act, x + off[e] * K, counts[e], K, xp + off[e] * xrow);
    #pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int64_t it = 0; it < nitems; it++) {
        int64_t e = items[it].e;
        wts w = {fmt, N, K, group, block, (const uint8_t *)q + e * qbytes,
                 scale ? (const uint8_t *)scale + e * sbytes : NULL};
        run_item(&w, act, xp + off[e] * xrow, counts[e], y + off[e] * N, N, items[it].n0, items[it].n1);
    }
    free(off); free(items); free(xp);
    return 0;
}

/* ---- FP8 cache components (qiusuo/cache/precision.py, Fp8Tiles) ----
   A row: q e4m3 codes with one ue8m0 scale (a biased exponent) per tile of `tile` values, then r bf16 rotary values.
   One pass over a row's bytes each way: torch's per-element e4m3 conversion and the ops around it took ~40x longer
   than a bf16 cache's read at 8k context. */

static float E4M3_LUT[256];  /* every byte's value, filled once when the library loads */

__attribute__((constructor)) static void fp8_lut_init(void) {
    for (int b = 0; b < 256; b++) E4M3_LUT[b] = e4m3_to_f32((uint8_t)b);
}

/* Rows of fewer values than this run on one thread: the fork and join of a parallel region cost more than a few
   thousand values' arithmetic (a decoding step's write, a short context's read). */
#define FP8_PARALLEL_VALUES 16384

/* One row's stored parts -> its values, float32 (out_bf16 = 0) or bf16 bits (exact either way: an e4m3 value
   times a power of two within the scales quantisation makes). */
static void fp8_dequant_row(const uint8_t *c, const uint8_t *e, const uint16_t *rp, int64_t q, int64_t tile,
                            int64_t r, int out_bf16, void *out) {
    float *o = (float *)out;
    uint16_t *ob = (uint16_t *)out;
    for (int64_t t = 0; t < q / tile; t++) {
        const float sc = e8m0_to_f32(e[t]);
        const uint8_t *ct = c + t * tile;
        if (out_bf16) {
            for (int64_t k = 0; k < tile; k++) {
                float v = E4M3_LUT[ct[k]] * sc;
                uint32_t u;
                memcpy(&u, &v, 4);
                ob[t * tile + k] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);  /* nearest even: only
                    values below bf16's normal range, which no scale quantise makes, round at all */
            }
        } else {
            int64_t k = 0;
#if QS_SIMD
            /* e4m3 bits s eeee mmm shifted into fp16's (s eeeee mmmmmmmmmm) are the value times 2^-8 (biases 7 and
               15), subnormals included; vcvtph2ps widens exactly, and * 256 puts the 2^8 back */
            /* one multiply by 2^8 * scale where that is a float (the same real product, rounded once either way) */
            const int one = e[t] <= 246;
            const __m256 s256 = _mm256_set1_ps(one ? 256.0f * sc : 256.0f), scv = _mm256_set1_ps(sc);
            const __m128i sign = _mm_set1_epi16((short)0x80), mag = _mm_set1_epi16(0x7F);
            for (; k + 8 <= tile; k += 8) {
                __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(ct + k)));
                __m128i h = _mm_or_si128(_mm_slli_epi16(_mm_and_si128(b, sign), 8),
                                         _mm_slli_epi16(_mm_and_si128(b, mag), 7));
                __m256 v = _mm256_mul_ps(_mm256_cvtph_ps(h), s256);
                _mm256_storeu_ps(o + t * tile + k, one ? v : _mm256_mul_ps(v, scv));
            }
#endif
            for (; k < tile; k++) o[t * tile + k] = E4M3_LUT[ct[k]] * sc;
        }
    }
    if (out_bf16) {
        memcpy(ob + q, rp, (size_t)r * 2);
        return;
    }
    int64_t k = 0;
#if QS_SIMD
    for (; k + 8 <= r; k += 8)  /* bf16 bits in the top half of a float's */
        _mm256_storeu_si256((__m256i *)(o + q + k),
                            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(rp + k))), 16));
#endif
    for (; k < r; k++) {
        uint32_t u = (uint32_t)rp[k] << 16;
        memcpy(o + q + k, &u, 4);
    }
}

/* float32 -> e4m3 (finite, |x| <= 448), rounded to nearest even as torch's conversion does: normals keep 3 mantissa
   bits (the rounding may carry into the exponent), values below 2^-6 are multiples of 2^-9 (subnormals; 8 of them
   is 2^-6, whose code 0x08 is the same bits). NaN stays NaN (0x7F with its sign). */
static inline uint8_t f32_to_e4m3(float x) {
    uint32_t u;
    memcpy(&u, &x, 4);
    const uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    u &= 0x7FFFFFFFu;
    if (u > 0x7F800000u) return sign | 0x7F;
    float a;
    memcpy(&a, &u, 4);
    if (a < 0x1p-6f) return sign | (uint8_t)(int)((a * 512.0f + 0x1.8p23f) - 0x1.8p23f);
    u += 0x7FFFFu + ((u >> 20) & 1u);
    return sign | (uint8_t)(((((u >> 23) & 0xFF) - 120) << 3) | ((u >> 20) & 7));
}

/* One float32 row (q + r values) -> its stored parts, as Fp8Tiles.quantise does: per tile amax (at least 2^-100),
   e = ceil(log2(amax / 448)) exactly (from the float's bits: the smallest power-of-two scale bringing amax within
   448), clamped to [-127, 127], codes e4m3(x * 2^-e) clamped to +-448, stored exponent e + 127; the rotary part
   rounded to bf16. */
static void fp8_quant_row(const float *x, int64_t q, int64_t tile, int64_t r, uint8_t *c, uint8_t *ep,
                          uint16_t *rp) {
    for (int64_t t = 0; t < q / tile; t++) {
        const float *xt = x + t * tile;
        float amax = 0x1p-100f;
        for (int64_t k = 0; k < tile; k++) {
            const float v = xt[k] < 0 ? -xt[k] : xt[k];
            amax = v > amax ? v : amax;  /* (a NaN row writes garbage either way) */
        }
        /* amax / 448 >= 2^-109 is a normal float 1.M * 2^(E - 127): ceil(log2) is E - 127, plus 1 if M != 0 */
        const float v = amax / 448.0f;
        uint32_t b;
        memcpy(&b, &v, 4);
        int e = (int)((b >> 23) & 0xFF) - 127 + ((b & 0x7FFFFFu) != 0);
        e = e < -127 ? -127 : e > 127 ? 127 : e;
        ep[t] = (uint8_t)(e + 127);
        const float s = e8m0_to_f32((uint8_t)(127 - e));  /* 2^-e */
        for (int64_t k = 0; k < tile; k++) {
            float y = xt[k] * s;
            y = y > 448.0f ? 448.0f : y < -448.0f ? -448.0f : y;
            c[t * tile + k] = f32_to_e4m3(y);
        }
    }
    for (int64_t k = 0; k < r; k++) {
        uint32_t u;
        memcpy(&u, x + q + k, 4);
        rp[k] = (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    }
}

static int fp8_bad_shape(int64_t n, int64_t q, int64_t tile, int64_t r) {
    return n < 0 || q <= 0 || r < 0 || tile <= 0 || q % tile;
}

/* Rows idx[i] (i < n) of codes (S, q), exps (S, q / tile), rot (S, r) dequantised into out, row i at output row
   (i / per) * stride + i % per (groups of `per` rows, `stride` rows apart). */
static void fp8_gather(const uint8_t *codes, const uint8_t *exps, const uint16_t *rot, int64_t q, int64_t tile,
                       int64_t r, int out_bf16, const int64_t *idx, int64_t n, int64_t per, int64_t stride,
                       void *out, int nthreads) {
    const int64_t width = q + r, nt = q / tile, esize = out_bf16 ? 2 : 4;
    if (n * width < FP8_PARALLEL_VALUES) nthreads = 1;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t i = 0; i < n; i++)
        fp8_dequant_row(codes + idx[i] * q, exps + idx[i] * nt, rot + idx[i] * r, q, tile, r, out_bf16,
                        (uint8_t *)out + ((i / per) * stride + i % per) * width * esize);
}

/* ---- argument blocks ----
   The calls above with their arguments in one int64 array (pointers as integers), for callers that bind most of
   them once (kernels.py: `_block`, used by `Bound` and `Fp8Rows`) and set the few that change per call: ctypes
   converted a dozen arguments one by one on every call, which cost more than a short call's work once a decoding
   step's large matmuls had flushed the caches. */

#define QS_PTR(v) ((void *)(intptr_t)(v))

int qs_grouped_mm_a(const int64_t *a) {
    return qs_grouped_mm((int)a[0], (int)a[1], (const float *)QS_PTR(a[2]), a[3], a[4], a[5], a[6],
                         (const int64_t *)QS_PTR(a[7]), QS_PTR(a[8]), QS_PTR(a[9]), a[10], a[11],
                         (float *)QS_PTR(a[12]), (int)a[13]);
}

/* One update of an FP8 cache component (qiusuo/cache/precision.py, Fp8Tiles; kernels.py, Fp8Rows): n_new float32
   rows (q + r values) quantised into slots widx, n_read slots ridx read back dequantised (float32, or bf16 bits),
   the reads before the writes (read_first: a ring whose new rows may take the slots of the oldest it reads) or
   after. The output, in G groups: each group's n_read / G rows read then, with `stored`, its n_new / G new rows as
   now stored (an attention that reads its new keys from its inputs, V4's window, sees what later steps will
   read). A read alone, a write alone and a write with its rows back are the same call with n_new or n_read 0.
   Block: codes, exps, rot, S, q, tile, r, out_bf16, rows, n_new, widx, ridx, n_read, G, read_first, stored, out,
   threads. -2 when a slot is outside [0, S), -1 for arguments it does not take. */
int qs_fp8_update_a(const int64_t *a) {
    uint8_t *codes = (uint8_t *)QS_PTR(a[0]), *exps = (uint8_t *)QS_PTR(a[1]);
    uint16_t *rot = (uint16_t *)QS_PTR(a[2]);
    const int64_t S = a[3], q = a[4], tile = a[5], r = a[6], n_new = a[9], n_read = a[12], G = a[13];
    const int out_bf16 = (int)a[7], read_first = (int)a[14], stored = (int)a[15], nthreads = (int)a[17];
    const float *rows = (const float *)QS_PTR(a[8]);
    const int64_t *widx = (const int64_t *)QS_PTR(a[10]), *ridx = (const int64_t *)QS_PTR(a[11]);
    uint8_t *out = (uint8_t *)QS_PTR(a[16]);
    if (fp8_bad_shape(n_new, q, tile, r) || n_read < 0 || G < 1 || nthreads < 1 || n_read % G ||
        (stored && n_new % G) || ((n_read || (stored && n_new)) && !out))
        return -1;
    for (int64_t i = 0; i < n_new; i++)
        if (widx[i] < 0 || widx[i] >= S) return -2;
    for (int64_t i = 0; i < n_read; i++)
        if (ridx[i] < 0 || ridx[i] >= S) return -2;
    const int64_t width = q + r, nt = q / tile, esize = out_bf16 ? 2 : 4;
    const int64_t per = n_read / G, tper = stored ? n_new / G : 0, stride = per + tper;
    if (read_first && n_read)
        fp8_gather(codes, exps, rot, q, tile, r, out_bf16, ridx, n_read, per, stride, out, nthreads);
    for (int64_t i = 0; i < n_new; i++) {
        uint8_t *c = codes + widx[i] * q, *ep = exps + widx[i] * nt;
        uint16_t *rp = rot + widx[i] * r;
        fp8_quant_row(rows + i * width, q, tile, r, c, ep, rp);
        if (stored)
            fp8_dequant_row(c, ep, rp, q, tile, r, out_bf16, out + ((i / tper) * stride + per + i % tper) * width * esize);
    }
    if (!read_first && n_read)
        fp8_gather(codes, exps, rot, q, tile, r, out_bf16, ridx, n_read, per, stride, out, nthreads);
    return 0;
}
