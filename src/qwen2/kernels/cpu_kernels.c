/* The CPU side of a bf16 / int8 / int4 decode step on x86 CPUs with AVX-512 BF16 + VNNI: y = x W^T + bias
 * for a few bf16 activation rows x, then (further down) RMSNorm, RoPE, attention over the cache, and the
 * MLP's gate and up products with their silu and product in one call.
 *
 * Decode reads every weight once per token, so its speed is the rate at which weights stream from
 * memory. torch's bf16 GEMV reaches ~15 GB/s on this project's 2-core machine (fp32 reaches ~25);
 * these loops reach ~20-23 GB/s by keeping few instructions per cache line (vdpbf16ps: 32 bf16
 * products per instruction), four weight rows in flight, and a software prefetch far ahead of each row.
 * Built by cpu_kernels.py with the machine's own compiler (-march=native); if the CPU lacks the
 * instructions this file does not compile and qwen2 falls back to torch's kernels.
 *
 * Every product: w [n, k] (row-major), x [m, k] bf16, bias [n] bf16 or NULL, y [m, n] bf16 (rounded
 * to nearest even from an fp32 accumulator), rows split over `threads` OpenMP threads. The OpenMP
 * runtime is torch's (same soname, loaded first), so both share one thread pool.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512BF16__) || !defined(__AVX512VNNI__)
#error "cpu_kernels.c needs AVX-512 F, BW, BF16 and VNNI"
#endif

#ifndef R
#define R 4              /* weight rows per block: independent accumulators and streams */
#endif
#ifndef PREFETCH_HINT
#define PREFETCH_HINT _MM_HINT_T1
#endif
#ifndef PREFETCH
#define PREFETCH 8192    /* bytes ahead on each row, into L2 (best of 1-16 KB, L1 or L2, on the 2-core machine;
                            non-temporal prefetches run at half the speed) */
#endif

static inline float bf16_f32(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t f32_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline void store(uint16_t *y, int64_t i, float v, const uint16_t *bias, int64_t r) {
    y[i] = f32_bf16(v + (bias ? bf16_f32(bias[r]) : 0.f));
}

static inline __attribute__((always_inline)) void prefetch_rows(const uint8_t *p, int64_t row_bytes, int rows) {
    for (int q = 0; q < rows; q++) _mm_prefetch((const char *)p + q * row_bytes + PREFETCH, PREFETCH_HINT);
}

/* ---- bf16 weights: 32 products per vdpbf16ps --------------------------------------------------- */
static inline __attribute__((always_inline)) void dot_bf16(const uint16_t *w, int64_t k, const uint16_t *x,
                                                           int rows, float *out) {
    __m512 acc[R];
    for (int q = 0; q < rows; q++) acc[q] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= k; j += 32) {
        prefetch_rows((const uint8_t *)(w + j), 2 * k, rows);
        __m512bh xv = (__m512bh)_mm512_loadu_si512(x + j);
        for (int q = 0; q < rows; q++)
            acc[q] = _mm512_dpbf16_ps(acc[q], (__m512bh)_mm512_loadu_si512(w + q * k + j), xv);
    }
    if (j < k) {  /* the tail: masked loads read zeros past the row */
        __mmask32 mask = (__mmask32)((1ull << (k - j)) - 1);
        __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + j);
        for (int q = 0; q < rows; q++)
            acc[q] = _mm512_dpbf16_ps(acc[q], (__m512bh)_mm512_maskz_loadu_epi16(mask, w + q * k + j), xv);
    }
    for (int q = 0; q < rows; q++) out[q] = _mm512_reduce_add_ps(acc[q]);
}

/* The same for xr <= X activation rows at once (x rows xs apart): each weight vector loaded once feeds xr
 * products, so a few to tens of rows stay at the weights' streaming speed instead of re-reading the block
 * from L1 for every row. out[p * R + q]: activation row p, weight row q. Each sum is the one dot_bf16
 * computes (same order), so a row's result does not depend on the batch around it. */
#ifndef X
#define X 4
#endif
static inline __attribute__((always_inline)) void dot_bf16_x(const uint16_t *w, int64_t k, const uint16_t *x,
                                                             int64_t xs, int rows, int xr, float *out) {
    __m512 acc[X][R];
    for (int p = 0; p < xr; p++)
        for (int q = 0; q < rows; q++) acc[p][q] = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= k; j += 32) {
        prefetch_rows((const uint8_t *)(w + j), 2 * k, rows);
        __m512bh xv[X];
        for (int p = 0; p < xr; p++) xv[p] = (__m512bh)_mm512_loadu_si512(x + p * xs + j);
        for (int q = 0; q < rows; q++) {
            __m512bh wv = (__m512bh)_mm512_loadu_si512(w + q * k + j);
            for (int p = 0; p < xr; p++) acc[p][q] = _mm512_dpbf16_ps(acc[p][q], wv, xv[p]);
        }
    }
    if (j < k) {
        __mmask32 mask = (__mmask32)((1ull << (k - j)) - 1);
        for (int q = 0; q < rows; q++) {
            __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + q * k + j);
            for (int p = 0; p < xr; p++)
                acc[p][q] = _mm512_dpbf16_ps(acc[p][q], wv, (__m512bh)_mm512_maskz_loadu_epi16(mask, x + p * xs + j));
        }
    }
    for (int p = 0; p < xr; p++)
        for (int q = 0; q < rows; q++) out[p * R + q] = _mm512_reduce_add_ps(acc[p][q]);
}

/* ---- integer weights: integer dot products ----------------------------------------------------
 * vpdpbusd (64 u8 x s8 products into 16 int32 lanes) runs ~3x as many products per cycle as
 * vdpbf16ps here, which the int4 unpacking needs. So a row of x is written in fixed point with a
 * power-of-two step, xi = x / 2^(e - bits) rounded, |xi| < 2^bits, where max|x| < 2^e: exact for every
 * element within 2^(bits - 7) of the largest (bf16 holds 8 significant bits), within half a step
 * (max|x| / 2^(bits + 1)) for the rest. Each kernel splits xi into bytes; every integer sum is exact. */
static inline __m512 bf16x16(__mmask16 mask, const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, p)), 16));
}

static inline __mmask16 first16(int64_t left) { return left >= 16 ? 0xFFFF : (__mmask16)((1u << left) - 1); }

/* Row x's step 2^(e - bits) (returned) and its inverse (*inv); NaN and 0 when x holds inf / NaN, which
 * makes the row's output NaN. A bf16's magnitude orders as its bits without the sign (NaN above inf), so
 * the largest is an integer max. e stays >= bits - 126 so that the inverse is a finite float. */
static float fixed_step(const uint16_t *x, int64_t k, int bits, float *inv) {
    __m512i big = _mm512_setzero_si512();
    for (int64_t j = 0; j < k; j += 32) {
        __mmask32 mask = k - j >= 32 ? ~0u : (__mmask32)((1ull << (k - j)) - 1);
        big = _mm512_max_epu16(big, _mm512_and_si512(_mm512_maskz_loadu_epi16(mask, x + j), _mm512_set1_epi16(0x7fff)));
    }
    uint16_t lanes[32], amax = 0;
    _mm512_storeu_si512(lanes, big);
    for (int q = 0; q < 32; q++) amax = lanes[q] > amax ? lanes[q] : amax;
    if (amax >= 0x7f80) {
        *inv = 0.f;
        return NAN;
    }
    int e = 0;
    frexpf(bf16_f32(amax), &e);
    e = e < bits - 126 ? bits - 126 : e;
    *inv = ldexpf(1.f, bits - e);
    return ldexpf(1.f, e - bits);
}

/* xi = x * inv rounded to nearest even, for x[j .. j+16) (masked), as int32 lanes */
static inline __m512i fixed16(const uint16_t *x, __mmask16 mask, float inv) {
    return _mm512_cvtps_epi32(_mm512_mul_ps(bf16x16(mask, x), _mm512_set1_ps(inv)));
}

/* int8, one scale per row. 15-bit xi; u = xi + 32768 = 256 hi + lo in unsigned bytes, q signed:
 *   sum_k xi_k q_k = 256 sum hi_k q_k + sum lo_k q_k - 32768 sum q_k   (3 vpdpbusd per 64 weights) */
static inline __attribute__((always_inline)) void dot_int8(const int8_t *w, int64_t k, const uint8_t *hi,
                                                           const uint8_t *lo, int rows, float *out) {
    __m512i ah[R], al[R], aq[R];
    const __m512i ones = _mm512_set1_epi8(1);
    for (int q = 0; q < rows; q++) ah[q] = al[q] = aq[q] = _mm512_setzero_si512();
    for (int64_t j = 0; j < k; j += 64) {
        __mmask64 mask = k - j >= 64 ? ~0ull : (1ull << (k - j)) - 1;  /* the tail reads zeros */
        prefetch_rows((const uint8_t *)(w + j), k, rows);
        __m512i h = _mm512_maskz_loadu_epi8(mask, hi + j), l = _mm512_maskz_loadu_epi8(mask, lo + j);
        for (int q = 0; q < rows; q++) {
            __m512i wv = _mm512_maskz_loadu_epi8(mask, w + q * k + j);
            ah[q] = _mm512_dpbusd_epi32(ah[q], h, wv);
            al[q] = _mm512_dpbusd_epi32(al[q], l, wv);
            aq[q] = _mm512_dpbusd_epi32(aq[q], ones, wv);
        }
    }
    for (int q = 0; q < rows; q++)
        out[q] = (float)(256 * (int64_t)_mm512_reduce_add_epi32(ah[q]) + _mm512_reduce_add_epi32(al[q])
                         - 32768 * (int64_t)_mm512_reduce_add_epi32(aq[q]));
}

/* x [m, k] -> the bytes hi, lo [m, k] of u = xi + 32768 and each row's step */
static void int8_activations(const uint16_t *x, int64_t m, int64_t k, uint8_t *hi, uint8_t *lo, float *step) {
    float inv;
    for (int64_t i = 0; i < m; i++) {
        step[i] = fixed_step(x + i * k, k, 15, &inv);
        for (int64_t j = 0; j < k; j += 16) {
            __mmask16 mask = first16(k - j);
            __m512i u = _mm512_add_epi32(fixed16(x + i * k + j, mask, inv), _mm512_set1_epi32(32768));
            _mm_mask_storeu_epi8(hi + i * k + j, mask, _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 8)));
            _mm_mask_storeu_epi8(lo + i * k + j, mask, _mm512_cvtepi32_epi8(u));  /* the low byte */
        }
    }
}

/* int4, group-wise (scale, zero): byte j of a row holds column 2j in its low nibble and 2j+1 in its
 * high nibble; w = (q - 8) s + z. 64 bytes give the low nibbles (even columns) and the high ones (odd
 * columns) as unsigned bytes q, so x is split once per call into even and odd columns, each as
 * signed bytes of a 14-bit xi = 256 hi + lo, hi = (xi + 128) >> 8 in [-64, 64], lo in [-128, 127]:
 *   P_g = sum_k q_k xi_k = 256 sum q hi + sum q lo                  (4 vpdpbusd per 128 weights)
 *   sum_k w_k x_k = step * sum_g s_g P_g + sum_g (z_g - 8 s_g) X_g,   X_g = sum_k x_k over g.
 * Requires group % 128 == 0 (cpu_kernels.py checks): a group is whole 64-byte steps. */
static inline __attribute__((always_inline)) void dot_int4(const uint8_t *w, int64_t k, const int8_t *xb,
                                                           const uint16_t *scales, int64_t group, int rows,
                                                           float *out) {
    int64_t groups = k / group, half = k / 2;
    const int8_t *eh = xb, *el = xb + half, *oh = xb + 2 * half, *ol = xb + 3 * half;
    const __m512i nib = _mm512_set1_epi8(0x0F);
    __m512 acc[R];
    for (int q = 0; q < rows; q++) acc[q] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i ph[R], pl[R];
        for (int q = 0; q < rows; q++) ph[q] = pl[q] = _mm512_setzero_si512();
        for (int64_t j = g * group / 2; j < (g + 1) * group / 2; j += 64) {
            prefetch_rows(w + j, half, rows);
            __m512i veh = _mm512_loadu_si512(eh + j), vel = _mm512_loadu_si512(el + j);
            __m512i voh = _mm512_loadu_si512(oh + j), vol = _mm512_loadu_si512(ol + j);
            for (int q = 0; q < rows; q++) {
                __m512i b = _mm512_loadu_si512(w + q * half + j);
                __m512i even = _mm512_and_si512(b, nib), odd = _mm512_and_si512(_mm512_srli_epi16(b, 4), nib);
                ph[q] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ph[q], even, veh), odd, voh);
                pl[q] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(pl[q], even, vel), odd, vol);
            }
        }
        for (int q = 0; q < rows; q++) {
            __m512 p = _mm512_cvtepi32_ps(_mm512_add_epi32(_mm512_slli_epi32(ph[q], 8), pl[q]));
            acc[q] = _mm512_fmadd_ps(p, _mm512_set1_ps(bf16_f32(scales[q * groups + g])), acc[q]);
        }
    }
    for (int q = 0; q < rows; q++) out[q] = _mm512_reduce_add_ps(acc[q]);
}

/* sum_g (z_g - 8 s_g) X_g over one row's groups, 16 at a time */
static inline float zero_offset(const uint16_t *s, const uint16_t *z, const float *xsum, int64_t groups) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
        __mmask16 mask = groups - g >= 16 ? 0xFFFF : (__mmask16)((1u << (groups - g)) - 1);
        __m512 c = _mm512_fnmadd_ps(_mm512_set1_ps(8.f), bf16x16(mask, s + g), bf16x16(mask, z + g));
        acc = _mm512_fmadd_ps(c, _mm512_maskz_loadu_ps(mask, xsum + g), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* x [m, k] -> per row: the bytes even hi, even lo, odd hi, odd lo (k / 2 each) in xb, the step, and the
 * sums X_g of x over each group */
static void int4_activations(const uint16_t *x, int64_t m, int64_t k, int64_t group, int8_t *xb, float *step,
                             float *xsum) {
    int64_t groups = k / group, half = k / 2;
    const __m128i deal = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);  /* evens, odds */
    float inv;
    for (int64_t i = 0; i < m; i++) {
        const uint16_t *xr = x + i * k;
        int8_t *b = xb + i * 4 * half;
        step[i] = fixed_step(xr, k, 14, &inv);
        for (int64_t j = 0; j < k; j += 16) {  /* k % 128 == 0 */
            __m512i xi = fixed16(xr + j, 0xFFFF, inv);
            __m512i h = _mm512_srai_epi32(_mm512_add_epi32(xi, _mm512_set1_epi32(128)), 8);
            __m128i hb = _mm_shuffle_epi8(_mm512_cvtepi32_epi8(h), deal);
            __m128i lb = _mm_shuffle_epi8(_mm512_cvtepi32_epi8(_mm512_sub_epi32(xi, _mm512_slli_epi32(h, 8))), deal);
            _mm_storel_epi64((__m128i *)(b + j / 2), hb);
            _mm_storel_epi64((__m128i *)(b + half + j / 2), lb);
            _mm_storel_epi64((__m128i *)(b + 2 * half + j / 2), _mm_unpackhi_epi64(hb, hb));
            _mm_storel_epi64((__m128i *)(b + 3 * half + j / 2), _mm_unpackhi_epi64(lb, lb));
        }
        for (int64_t g = 0; g < groups; g++) {
            __m512 s = _mm512_setzero_ps();
            for (int64_t j = g * group; j < (g + 1) * group; j += 16) s = _mm512_add_ps(s, bf16x16(0xFFFF, xr + j));
            xsum[i * groups + g] = _mm512_reduce_add_ps(s);
        }
    }
}

/* ---- one driver for the three kinds ------------------------------------------------------------
 * A matrix (bf16, int8 or int4 with its scales / zeros), the activations prepared for it once per call,
 * and block(): the fp32 results of rows r0 .. r0 + rows - 1 (rows <= R) for activation row i. */
enum { BF16, INT8, INT4 };

typedef struct {
    int kind;
    const void *w;
    const uint16_t *scales, *zeros;  /* int8: scales [n]; int4: scales, zeros [n, k / group] */
    int64_t group, n, k;
} matrix;

typedef struct {
    const uint16_t *x;  /* bf16 */
    uint8_t *hi, *lo;   /* int8 */
    int8_t *xb;         /* int4 */
    float *step, *xsum; /* int8, int4 */
} activations;

static activations prepare(int kind, const uint16_t *x, int64_t m, int64_t k, int64_t group) {
    activations a = {x, NULL, NULL, NULL, NULL, NULL};
    if (kind == INT8) {
        a.hi = malloc(m * k), a.lo = malloc(m * k), a.step = malloc(m * sizeof(float));
        int8_activations(x, m, k, a.hi, a.lo, a.step);
    } else if (kind == INT4) {
        a.xb = malloc(m * 2 * k), a.step = malloc(m * sizeof(float)), a.xsum = malloc(m * (k / group) * sizeof(float));
        int4_activations(x, m, k, group, a.xb, a.step, a.xsum);
    }
    return a;
}

static void release(activations *a) { free(a->hi); free(a->lo); free(a->xb); free(a->step); free(a->xsum); }

static inline __attribute__((always_inline)) void block_rows(const matrix *w, const activations *a, int64_t i,
                                                             int64_t r0, int rows, float *out) {
    int64_t k = w->k;
    if (w->kind == BF16) {
        const uint16_t *wb = (const uint16_t *)w->w + r0 * k;
        if (rows == R) dot_bf16(wb, k, a->x + i * k, R, out);
        else dot_bf16(wb, k, a->x + i * k, rows, out);
    } else if (w->kind == INT8) {
        const int8_t *wb = (const int8_t *)w->w + r0 * k;
        if (rows == R) dot_int8(wb, k, a->hi + i * k, a->lo + i * k, R, out);
        else dot_int8(wb, k, a->hi + i * k, a->lo + i * k, rows, out);
        for (int q = 0; q < rows; q++) out[q] *= a->step[i] * bf16_f32(w->scales[r0 + q]);
    } else {
        int64_t groups = k / w->group;
        const uint8_t *wb = (const uint8_t *)w->w + r0 * (k / 2);
        const int8_t *xb = a->xb + i * 2 * k;
        if (rows == R) dot_int4(wb, k, xb, w->scales + r0 * groups, w->group, R, out);
        else dot_int4(wb, k, xb, w->scales + r0 * groups, w->group, rows, out);
        for (int q = 0; q < rows; q++)
            out[q] = out[q] * a->step[i] + zero_offset(w->scales + (r0 + q) * groups, w->zeros + (r0 + q) * groups,
                                                       a->xsum + i * groups, groups);
    }
}

/* activation rows i .. i + xr - 1 (xr <= X) against weight rows r0 .. r0 + rows - 1: out[p * R + q] */
static inline __attribute__((always_inline)) void block_rows_x(const matrix *w, const activations *a, int64_t i,
                                                               int xr, int64_t r0, int rows, float *out) {
    if (w->kind == BF16 && xr > 1) {
        const uint16_t *wb = (const uint16_t *)w->w + r0 * w->k;
        if (rows == R && xr == X) dot_bf16_x(wb, w->k, a->x + i * w->k, w->k, R, X, out);
        else dot_bf16_x(wb, w->k, a->x + i * w->k, w->k, rows, xr, out);
        return;
    }
    for (int p = 0; p < xr; p++) block_rows(w, a, i + p, r0, rows, out + p * R);
}

static void gemv(const matrix *w, const uint16_t *x, int64_t m, const uint16_t *bias, uint16_t *y, int threads) {
    activations a = prepare(w->kind, x, m, w->k, w->group);
    int64_t n = w->n;
    #pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t b = 0; b < (n + R - 1) / R; b++) {
        int64_t r0 = b * R;
        int rows = n - r0 < R ? (int)(n - r0) : R;
        for (int64_t i = 0; i < m; i += X) {
            int xr = m - i < X ? (int)(m - i) : X;
            float out[X * R];
            block_rows_x(w, &a, i, xr, r0, rows, out);
            for (int p = 0; p < xr; p++)
                for (int q = 0; q < rows; q++) store(y, (i + p) * n + r0 + q, out[p * R + q], bias, r0 + q);
        }
    }
    release(&a);
}

void q2_gemv_bf16(const uint16_t *w, int64_t n, int64_t k, const uint16_t *x, int64_t m,
                  const uint16_t *bias, uint16_t *y, int threads) {
    matrix mw = {BF16, w, NULL, NULL, 0, n, k};
    gemv(&mw, x, m, bias, y, threads);
}

void q2_gemv_int8(const int8_t *w, const uint16_t *scales, int64_t n, int64_t k, const uint16_t *x, int64_t m,
                  const uint16_t *bias, uint16_t *y, int threads) {
    matrix mw = {INT8, w, scales, NULL, 0, n, k};
    gemv(&mw, x, m, bias, y, threads);
}

void q2_gemv_int4(const uint8_t *w, const uint16_t *scales, const uint16_t *zeros, int64_t group, int64_t n,
                  int64_t k, const uint16_t *x, int64_t m, const uint16_t *bias, uint16_t *y, int threads) {
    matrix mw = {INT4, w, scales, zeros, group, n, k};
    gemv(&mw, x, m, bias, y, threads);
}

/* ---- the rest of a bf16 decode step: RMSNorm, RoPE, attention over the cache ----------------------
 * Each replaces 5-12 small torch ops (a few us each; SDPA's setup ~100 us) by one call. Values are
 * rounded to bf16 where torch's bf16 ops round them. */

static inline __m512 round_bf16(__m512 v) {  /* to the nearest even bf16, kept as fp32; NaN stays NaN */
    __m512i u = _mm512_castps_si512(v);
    __m512i up = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
    __m512i r = _mm512_and_si512(_mm512_add_epi32(u, up), _mm512_set1_epi32((int)0xffff0000u));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_castsi512_ps(_mm512_mask_mov_epi32(r, nan, _mm512_or_si512(u, _mm512_set1_epi32(0x400000))));
}

static inline void store_bf16(uint16_t *p, __mmask16 mask, __m512 rounded) {  /* rounded: from round_bf16 */
    _mm256_mask_storeu_epi16(p, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded), 16)));
}

/* x [m, k] -> y = bf16(w * bf16(x / sqrt(mean(x^2) + eps))): transformers' Qwen2RMSNorm in bf16 (the
 * squares rounded to fp32 before the sum, as x.pow(2) does) */
void q2_rms_norm(const uint16_t *x, const uint16_t *w, int64_t m, int64_t k, float eps, uint16_t *y) {
    for (int64_t i = 0; i < m; i++) {
        const uint16_t *xr = x + i * k;
        __m512 s = _mm512_setzero_ps();
        for (int64_t j = 0; j < k; j += 16) {
            __m512 v = bf16x16(first16(k - j), xr + j);
            s = _mm512_add_ps(s, _mm512_mul_ps(v, v));
        }
        __m512 r = _mm512_set1_ps(1.f / sqrtf(_mm512_reduce_add_ps(s) / (float)k + eps));
        for (int64_t j = 0; j < k; j += 16) {
            __mmask16 mask = first16(k - j);
            __m512 n = round_bf16(_mm512_mul_ps(bf16x16(mask, xr + j), r));
            store_bf16(y + i * k + j, mask, round_bf16(_mm512_mul_ps(bf16x16(mask, w + j), n)));
        }
    }
}

/* Half-split RoPE, x [m, heads, d] with cos / sin [m, d]: y = bf16(bf16(x cos) + bf16(rotate_half(x) sin)),
 * rotate_half(x) = (-x2, x1) */
void q2_rotary(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t m, int64_t heads, int64_t d,
               uint16_t *y) {
    int64_t h = d / 2;
    for (int64_t i = 0; i < m; i++)
        for (int64_t a = 0; a < heads; a++) {
            const uint16_t *xr = x + (i * heads + a) * d, *c = cos + i * d, *s = sin + i * d;
            uint16_t *yr = y + (i * heads + a) * d;
            for (int64_t j = 0; j < h; j += 16) {
                __mmask16 mask = first16(h - j);
                __m512 x1 = bf16x16(mask, xr + j), x2 = bf16x16(mask, xr + h + j);
                __m512 lo = _mm512_add_ps(round_bf16(_mm512_mul_ps(x1, bf16x16(mask, c + j))),
                                          round_bf16(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), x2), bf16x16(mask, s + j))));
                __m512 hi = _mm512_add_ps(round_bf16(_mm512_mul_ps(x2, bf16x16(mask, c + h + j))),
                                          round_bf16(_mm512_mul_ps(x1, bf16x16(mask, s + h + j))));
                store_bf16(yr + j, mask, round_bf16(lo));
                store_bf16(yr + h + j, mask, round_bf16(hi));
            }
        }
}

/* e^x for 16 lanes, 0 below -87 (masked-out slots hold -inf): n = round(x / ln 2), r = x - n ln 2 in two
 * parts, e^r by its Taylor series to r^7 (|r| <= ln 2 / 2: relative error < 1e-8), times 2^n */
static inline __m512 exp16(__m512 x) {
    __mmask16 live = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GT_OQ);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040);
    static const float c[] = {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f};
    for (int i = 0; i < 7; i++) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c[i]));
    return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}

/* lane u of the result = the sum of v[u]'s 16 lanes (a transpose by halves: ~3 instructions per sum
 * instead of ~8 for a reduction each) */
static inline __m512 sum16(const __m512 *v) {
    __m512 x[8], y[4], z[2];
    for (int i = 0; i < 8; i++)  /* 128-bit lane L of x[i]: pairs of v[2i] and v[2i+1]'s lane-L elements summed */
        x[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {  /* lane L of y[i]: the lane-L sums of v[4i .. 4i+3] */
        __m512d a = _mm512_castps_pd(x[2 * i]), b = _mm512_castps_pd(x[2 * i + 1]);
        y[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)  /* lanes of z[i]: y[2i]'s lanes 0+1, 2+3, then y[2i+1]'s */
        z[i] = _mm512_add_ps(_mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(y[2 * i], y[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* q_a . k_u for the slots u < n whose rows (d contiguous) start at kr[u], as 16 lanes (0 past n) */
static inline __attribute__((always_inline)) __m512 dots16(const uint16_t *const *kr, int64_t d, const uint16_t *qa,
                                                           int n) {
    __m512 acc[16];
    for (int u = 0; u < 16; u++) acc[u] = _mm512_setzero_ps();
    for (int64_t t = 0; t < d; t += 32) {
        __mmask32 mk = d - t >= 32 ? ~0u : (__mmask32)((1ull << (d - t)) - 1);
        __m512bh qv = (__m512bh)_mm512_maskz_loadu_epi16(mk, qa + t);
        for (int u = 0; u < n; u++)
            acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)_mm512_maskz_loadu_epi16(mk, kr[u] + t), qv);
    }
    return sum16(acc);
}

#define GROUP 8  /* query heads whose sums are kept in registers at once (Qwen2: 6-8 per KV head) */

/* One KV head's g query heads q [g, d] (contiguous) over w slots whose key / value rows start at kr[j] /
 * vr[j]; mr [w] (nonzero: the slot may be attended) or NULL (all may). out [g, d] = bf16(sum_j bf16(e_j) v_j /
 * sum_j e_j), e_j = exp(s_j - max s), s_j = scale q.k_j in fp32: torch's CPU SDPA kernel rounds e_j to bf16
 * before its product with v the same way. */
static void attend_head(const uint16_t *q, int64_t g, int64_t d, int64_t w, const uint16_t *const *kr,
                        const uint16_t *const *vr, const uint8_t *mr, float scale, uint16_t *out) {
    float *s = malloc(g * w * sizeof(float)), *total = malloc(g * sizeof(float));
    for (int64_t j = 0; j < w; j += 16) {  /* s[a, j] = scale q_a . k_j, -inf where masked */
        int live = w - j < 16 ? (int)(w - j) : 16;
        __mmask16 allowed = 0;
        for (int u = 0; u < live; u++) allowed |= (__mmask16)((mr == NULL || mr[j + u] != 0) << u);
        for (int64_t a = 0; a < g; a++) {
            const uint16_t *qa = q + a * d;
            __m512 dots = live == 16 ? dots16(kr + j, d, qa, 16) : dots16(kr + j, d, qa, live);
            __m512 sc = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), allowed, _mm512_mul_ps(dots, _mm512_set1_ps(scale)));
            _mm512_mask_storeu_ps(s + a * w + j, first16(w - j), sc);
        }
    }
    for (int64_t a = 0; a < g; a++) {  /* s[a, j] becomes bf16(e_j) */
        float *sa = s + a * w;
        __m512 mx = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
        for (int64_t j = 0; j < w; j += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, first16(w - j), sa + j));
        __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        for (int64_t j = 0; j < w; j += 16) {
            __mmask16 mj = first16(w - j);
            __m512 e = _mm512_maskz_mov_ps(mj, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mj, sa + j), top)));
            sum = _mm512_add_ps(sum, e);
            _mm512_mask_storeu_ps(sa + j, mj, round_bf16(e));
        }
        total[a] = _mm512_reduce_add_ps(sum);
    }
    for (int64_t a0 = 0; a0 < g; a0 += GROUP) {  /* out_a = sum_j s[a, j] v_j / total_a, 16 of d at a time */
        int heads = g - a0 < GROUP ? (int)(g - a0) : GROUP;
        for (int64_t t = 0; t < d; t += 16) {
            __mmask16 mt = first16(d - t);
            __m512 acc[GROUP];
            for (int a = 0; a < GROUP; a++) acc[a] = _mm512_setzero_ps();
            for (int64_t j = 0; j < w; j++) {
                __m512 vj = bf16x16(mt, vr[j] + t);  /* converted once for all the heads */
                for (int a = 0; a < heads; a++)
                    acc[a] = _mm512_fmadd_ps(_mm512_set1_ps(s[(a0 + a) * w + j]), vj, acc[a]);
            }
            for (int a = 0; a < heads; a++)
                store_bf16(out + (a0 + a) * d + t, mt, round_bf16(_mm512_div_ps(acc[a], _mm512_set1_ps(total[a0 + a]))));
        }
    }
    free(s);
    free(total);
}

/* One query per row: q [b, hq, d]; k, v [b, hkv, w, d] at strides (batch, head, slot) elements with rows of
 * d contiguous; mask [b, w] (nonzero: the slot may be attended). Query head a reads KV head a / (hq / hkv).
 * out [b, hq, d]: attend_head for each (row, KV head). */
void q2_decode_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, int64_t batch_stride,
                         int64_t head_stride, int64_t slot_stride, const uint8_t *mask, int64_t b, int64_t hq,
                         int64_t hkv, int64_t w, int64_t d, float scale, uint16_t *out, int threads) {
    int64_t g = hq / hkv;
    #pragma omp parallel for collapse(2) schedule(static) num_threads(threads)
    for (int64_t i = 0; i < b; i++)
        for (int64_t h = 0; h < hkv; h++) {
            const uint16_t **kr = malloc(2 * (w > 0 ? w : 1) * sizeof(uint16_t *)), **vr = kr + w;
            for (int64_t j = 0; j < w; j++) {
                kr[j] = k + i * batch_stride + h * head_stride + j * slot_stride;
                vr[j] = v + i * batch_stride + h * head_stride + j * slot_stride;
            }
            attend_head(q + (i * hq + h * g) * d, g, d, w, kr, vr, mask + i * w, scale, out + (i * hq + h * g) * d);
            free(kr);
        }
}

/* The same straight from the paged KV pool, with no gather: kp, vp one layer's blocks [blocks, bs, hkv, d];
 * tables [b, nb] block ids; row i attends to its slots 0 .. lengths[i] - 1, slot j at offset j % bs of block
 * tables[i, j / bs] (nothing past lengths[i] is read, so a stale or NaN slot cannot reach the row). */
void q2_paged_decode_attention(const uint16_t *q, const uint16_t *kp, const uint16_t *vp, const int64_t *tables,
                               int64_t nb, const int64_t *lengths, int64_t b, int64_t hq, int64_t hkv, int64_t bs,
                               int64_t d, float scale, uint16_t *out, int threads) {
    int64_t g = hq / hkv;
    #pragma omp parallel for collapse(2) schedule(dynamic, 1) num_threads(threads)
    for (int64_t i = 0; i < b; i++)
        for (int64_t h = 0; h < hkv; h++) {
            int64_t w = lengths[i];
            const uint16_t **kr = malloc(2 * (w > 0 ? w : 1) * sizeof(uint16_t *)), **vr = kr + w;
            for (int64_t j = 0; j < w; j++) {
                int64_t off = ((tables[i * nb + j / bs] * bs + j % bs) * hkv + h) * d;
                kr[j] = kp + off;
                vr[j] = vp + off;
            }
            attend_head(q + (i * hq + h * g) * d, g, d, w, kr, vr, NULL, scale, out + (i * hq + h * g) * d);
            free(kr);
        }
}

/* SwiGLU's first half in one call: y = bf16(bf16(silu(g)) * u), g = bf16(x Wg^T), u = bf16(x Wu^T) (where
 * torch's bf16 ops round); Wg and Wu [n, k] of one kind (`kind`: 0 bf16, 1 int8, 2 int4, as for the
 * q2_gemv_* above; unused pointers NULL). One call instead of two products, a silu and a product: each
 * thread combines the rows it computed, so no output crosses between cores first. */
void q2_glu(int kind, const void *wg, const uint16_t *sg, const uint16_t *zg, const void *wu, const uint16_t *su,
            const uint16_t *zu, int64_t group, int64_t n, int64_t k, const uint16_t *x, int64_t m, uint16_t *y,
            int threads) {
    matrix gate = {kind, wg, sg, zg, group, n, k}, up = {kind, wu, su, zu, group, n, k};
    activations a = prepare(kind, x, m, k, group);
    float *g = malloc(m * n * sizeof(float)), *u = malloc(m * n * sizeof(float));
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t b = 0; b < (n + R - 1) / R; b++) {
            int64_t r0 = b * R;
            int rows = n - r0 < R ? (int)(n - r0) : R;
            for (int64_t i = 0; i < m; i += X) {
                int xr = m - i < X ? (int)(m - i) : X;
                float og[X * R], ou[X * R];
                block_rows_x(&gate, &a, i, xr, r0, rows, og);
                block_rows_x(&up, &a, i, xr, r0, rows, ou);
                for (int p = 0; p < xr; p++)
                    for (int q = 0; q < rows; q++) {
                        g[(i + p) * n + r0 + q] = bf16_f32(f32_bf16(og[p * R + q]));
                        u[(i + p) * n + r0 + q] = bf16_f32(f32_bf16(ou[p * R + q]));
                    }
            }
        }
        #pragma omp for schedule(static)
        for (int64_t c = 0; c < m * n; c += 16) {
            __mmask16 mask = first16(m * n - c);
            __m512 gv = _mm512_maskz_loadu_ps(mask, g + c);
            __m512 silu = _mm512_div_ps(gv, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
            store_bf16(y + c, mask, round_bf16(_mm512_mul_ps(round_bf16(silu), _mm512_maskz_loadu_ps(mask, u + c))));
        }
    }
    free(g);
    free(u);
    release(&a);
}
