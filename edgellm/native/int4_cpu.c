/* INT4 matrix multiply for CPU decode: y = x @ W.T with W in 4-bit codes and 8-bit group
 * parameters, 4.5 bits a weight at group 32 (torch's int4 kernel needs bf16 parameters: 5).
 * An AVX-512 path (intrinsics, below; with AVX512_BF16, bf16 activations take the bf16
 * dot-product instruction) and a plain-C path for everything else, written for the compiler's
 * auto-vectoriser (-O3 -march=native): AVX2 machines and NEON (the Jetsons).
 *
 * Threads: the caller passes its torch thread count; tiles are split between threads
 * (pool.h).
 *
 * Layout (made at load time by edgellm/quant/linear.py from the portable checkpoint):
 *   codes   uint8 [N/32, K, 16]  byte (t, k, j) = q(32t + j, k) | q(32t + 16 + j, k) << 4
 *   scodes  uint8 [N/32, G, 32]  scale code of group g for row 32t + l
 *   zcodes  int8  [N/32, G, 32]  zero code, likewise
 *   sexp, zexp  int8 [N]         row r's scale = scode * 2^sexp[r], zero = zcode * 2^zexp[r]
 * W[n, k] = (q - 8) * scale + zero for k in group g = k / group. So for one group,
 *   sum_k W[n,k] x[k] = scale * sum_k q x[k] + (zero - 8 scale) * sum_k x[k].
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"
#include "pool.h"

#define TILE 32
#define HALF 16
#define MCHUNK 8
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 8192 /* ahead of the codes being read: measured best of 512..16384 */
#endif

static inline float pow2f(int e) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)(e + 127) << 23; /* exponents stay in the normal range (quant/int4.py) */
    return v.f;
}

/* Scales and (zero - 8 scale) of one tile's group g. */
static inline void group_params(const uint8_t *scodes, const int8_t *zcodes, const float *su, const float *zu,
                                float *s, float *zp) {
    for (int l = 0; l < TILE; l++) {
        s[l] = (float)scodes[l] * su[l];
        zp[l] = (float)zcodes[l] * zu[l] - 8.0f * s[l];
    }
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* End of group g of a tile for MC rows of x: acc += scale * dot + (zero - 8 scale) * sum(x), with
 * the group's scales and zeros from their 8-bit codes (scodes, zcodes: its 32 rows) and the rows'
 * units su, zu. xsum points at row 0's sum for this group (rows G apart). */
static inline __attribute__((always_inline)) void finish_group(
    const int MC, const uint8_t *scodes, const int8_t *zcodes, const float *su, const float *zu, const __m512 *dot_lo,
    const __m512 *dot_hi, const float *xsum, int64_t G, __m512 *acc_lo, __m512 *acc_hi) {
    const __m512 eight = _mm512_set1_ps(8.0f);
    const __m512 s_lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)scodes))), _mm512_loadu_ps(su));
    const __m512 s_hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(scodes + HALF)))), _mm512_loadu_ps(su + HALF));
    const __m512 zp_lo = _mm512_fnmadd_ps(eight, s_lo, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)zcodes))), _mm512_loadu_ps(zu)));
    const __m512 zp_hi = _mm512_fnmadd_ps(eight, s_hi, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(zcodes + HALF)))), _mm512_loadu_ps(zu + HALF)));
    for (int m = 0; m < MC; m++) {
        const __m512 xs = _mm512_set1_ps(xsum[m * G]);
        acc_lo[m] = _mm512_fmadd_ps(s_lo, dot_lo[m], _mm512_fmadd_ps(zp_lo, xs, acc_lo[m]));
        acc_hi[m] = _mm512_fmadd_ps(s_hi, dot_hi[m], _mm512_fmadd_ps(zp_hi, xs, acc_hi[m]));
    }
}

/* Rows m0..m0+MC-1 of x against tile t (32 output rows): each step over k unpacks 32 codes
 * into two vectors once and feeds MC rows of x, so the unpacking is shared and the 2*MC
 * running dot products stay in registers. MC is a literal at every call site. */
static inline __attribute__((always_inline)) void tile_avx512(
    const int MC, const float *x, const float *xsum, int64_t K, int64_t G, int64_t group, const uint8_t *tc,
    const uint8_t *tsc, const int8_t *tzc, const float *su, const float *zu, float *y, int64_t ldy) {
    /* code -> float by table lookup: vpermps reads only an index's low 4 bits, so the low
     * nibble needs no mask and neither needs an int -> float conversion */
    const __m512 nibble = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    __m512 acc_lo[8], acc_hi[8];
    for (int m = 0; m < MC; m++) acc_lo[m] = acc_hi[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 dot_lo[8], dot_hi[8];
        for (int m = 0; m < MC; m++) dot_lo[m] = dot_hi[m] = _mm512_setzero_ps();
        const uint8_t *gc = tc + g * group * HALF;
        const float *xg = x + g * group;
        if (MC == 1) { /* one row: a second set of sums (odd k) hides the FMA latency */
            __m512 odd_lo = _mm512_setzero_ps(), odd_hi = _mm512_setzero_ps();
            for (int64_t k = 0; k < group; k += 2) {
                _mm_prefetch((const char *)(gc + k * HALF + PREFETCH_BYTES), _MM_HINT_T0);
                const __m512i b0 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(gc + k * HALF)));
                const __m512i b1 = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(gc + (k + 1) * HALF)));
                const __m512 x0 = _mm512_set1_ps(xg[k]), x1 = _mm512_set1_ps(xg[k + 1]);
                dot_lo[0] = _mm512_fmadd_ps(_mm512_permutexvar_ps(b0, nibble), x0, dot_lo[0]);
                dot_hi[0] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b0, 4), nibble), x0, dot_hi[0]);
                odd_lo = _mm512_fmadd_ps(_mm512_permutexvar_ps(b1, nibble), x1, odd_lo);
                odd_hi = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b1, 4), nibble), x1, odd_hi);
            }
            dot_lo[0] = _mm512_add_ps(dot_lo[0], odd_lo);
            dot_hi[0] = _mm512_add_ps(dot_hi[0], odd_hi);
        } else {
            for (int64_t k = 0; k < group; k++) {
                if ((k & 3) == 0) _mm_prefetch((const char *)(gc + k * HALF + PREFETCH_BYTES), _MM_HINT_T0);
                const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(gc + k * HALF)));
                const __m512 lo = _mm512_permutexvar_ps(b, nibble);
                const __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), nibble);
                for (int m = 0; m < MC; m++) {
                    const __m512 xv = _mm512_set1_ps(xg[m * K + k]);
                    dot_lo[m] = _mm512_fmadd_ps(lo, xv, dot_lo[m]);
                    dot_hi[m] = _mm512_fmadd_ps(hi, xv, dot_hi[m]);
                }
            }
        }
        finish_group(MC, tsc + g * TILE, tzc + g * TILE, su, zu, dot_lo, dot_hi, xsum + g, G, acc_lo, acc_hi);
    }
    for (int m = 0; m < MC; m++) {
        _mm512_storeu_ps(y + m * ldy, acc_lo[m]);
        _mm512_storeu_ps(y + m * ldy + HALF, acc_hi[m]);
    }
}
#endif

#if defined(__AVX512BF16__)
/* tile_avx512 for bf16 x on CPUs with the bf16 dot-product instruction (vdpbf16ps: 32 products
 * a bf16 pair at a time into 16 fp32 sums, twice fp32 FMA's work per instruction). Codes 0..15
 * are exact in bf16 and so is a bf16 x, and each product is exact in fp32: only the order of
 * the fp32 sums differs from tile_avx512. Each step takes k and k + 1 together: their 32 code
 * bytes are interleaved into (row j: k, k + 1) pairs, then looked up as bf16. */
static inline __attribute__((always_inline)) void tile_bf16dot(
    const int MC, const uint16_t *x, const float *xsum, int64_t K, int64_t G, int64_t group, const uint8_t *tc,
    const uint8_t *tsc, const int8_t *tzc, const float *su, const float *zu, float *y, int64_t ldy) {
    /* vpermw reads an index's low 5 bits: entries 16..31 repeat 0..15, so a byte's low nibble
     * needs no mask */
    const __m512i nibble = _mm512_set_epi16(
        0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40e0, 0x40c0, 0x40a0, 0x4080, 0x4040, 0x4000,
        0x3f80, 0x0000, 0x4170, 0x4160, 0x4150, 0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40e0, 0x40c0, 0x40a0, 0x4080,
        0x4040, 0x4000, 0x3f80, 0x0000);
    /* element 2j <- byte j (row j at k), element 2j + 1 <- byte 16 + j (row j at k + 1) */
    const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                           21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    __m512 acc_lo[8], acc_hi[8];
    for (int m = 0; m < MC; m++) acc_lo[m] = acc_hi[m] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m512 dot_lo[8], dot_hi[8];
        for (int m = 0; m < MC; m++) dot_lo[m] = dot_hi[m] = _mm512_setzero_ps();
        const uint8_t *gc = tc + g * group * HALF;
        const uint16_t *xg = x + g * group;
        for (int64_t k = 0; k < group; k += 2) {
            _mm_prefetch((const char *)(gc + k * HALF + PREFETCH_BYTES), _MM_HINT_T0);
            const __m512i b = _mm512_permutexvar_epi16(
                pairs, _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(gc + k * HALF))));
            const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(b, nibble);
            const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(b, 4), nibble);
            for (int m = 0; m < MC; m++) {
                int32_t pair;
                memcpy(&pair, xg + m * K + k, sizeof(pair));
                const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
                dot_lo[m] = _mm512_dpbf16_ps(dot_lo[m], lo, xv);
                dot_hi[m] = _mm512_dpbf16_ps(dot_hi[m], hi, xv);
            }
        }
        finish_group(MC, tsc + g * TILE, tzc + g * TILE, su, zu, dot_lo, dot_hi, xsum + g, G, acc_lo, acc_hi);
    }
    for (int m = 0; m < MC; m++) {
        _mm512_storeu_ps(y + m * ldy, acc_lo[m]);
        _mm512_storeu_ps(y + m * ldy + HALF, acc_hi[m]);
    }
}
#endif

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

/* y[m, :] += sum_j x[m, channels[j]] * residual[j, :]: the outlier channels' exact correction.
 * residual is bf16 [num_channels, N]. */
static void add_outliers(const float *x, const uint16_t *xb, int64_t M, int64_t K, int64_t N,
                         const int64_t *channels, int64_t num_channels, const uint16_t *residual, float *y,
                         int64_t ldy) {
    for (int64_t m = 0; m < M; m++) {
        float *ym = y + m * ldy;
        for (int64_t j = 0; j < num_channels; j++) {
            const int64_t i = m * K + channels[j];
            const float xv = xb ? bf16_to_f32(xb[i]) : x[i];
            const uint16_t *r = residual + j * N;
            for (int64_t n = 0; n < N; n++) ym[n] += xv * bf16_to_f32(r[n]);
        }
    }
}

typedef struct { /* one matmul's arguments, for its tiles' work items */
    const float *x, *xsum; /* x fp32 [M, K], or NULL when xb (bf16) is given */
    const uint16_t *xb;
    int64_t M, K, G, group;
    const uint8_t *codes, *scodes;
    const int8_t *zcodes, *sexp, *zexp;
    float *y;
    int64_t ldy;
} matmul_args;

/* Output tile t (rows 32t..32t+31 of W) for every row of x. */
static void matmul_tile(void *arg, int64_t t) {
    const matmul_args *a = arg;
    const float *x = a->x, *xsum = a->xsum;
    const int64_t M = a->M, K = a->K, G = a->G, group = a->group, ldy = a->ldy;
    const uint8_t *codes = a->codes, *scodes = a->scodes;
    const int8_t *zcodes = a->zcodes, *sexp = a->sexp, *zexp = a->zexp;
    float *y = a->y;
    const uint8_t *tc = codes + t * K * HALF;
    float su[TILE], zu[TILE];
    for (int l = 0; l < TILE; l++) {
        su[l] = pow2f(sexp[t * TILE + l]);
        zu[l] = pow2f(zexp[t * TILE + l]);
    }
#if defined(__AVX512BF16__)
    if (a->xb) {
        const uint16_t *xb = a->xb;
        const uint8_t *tsc = scodes + t * G * TILE;
        const int8_t *tzc = zcodes + t * G * TILE;
        int64_t m0 = 0;
        for (; m0 + 8 <= M; m0 += 8)
            tile_bf16dot(8, xb + m0 * K, xsum + m0 * G, K, G, group, tc, tsc, tzc, su, zu, y + m0 * ldy + t * TILE, ldy);
        for (; m0 + 4 <= M; m0 += 4)
            tile_bf16dot(4, xb + m0 * K, xsum + m0 * G, K, G, group, tc, tsc, tzc, su, zu, y + m0 * ldy + t * TILE, ldy);
        for (; m0 < M; m0++)
            tile_bf16dot(1, xb + m0 * K, xsum + m0 * G, K, G, group, tc, tsc, tzc, su, zu, y + m0 * ldy + t * TILE, ldy);
        return;
    }
#endif
#if defined(__AVX512F__)
    const uint8_t *tsc = scodes + t * G * TILE;
    const int8_t *tzc = zcodes + t * G * TILE;
    int64_t m0 = 0;
    for (; m0 + 8 <= M; m0 += 8)
        tile_avx512(8, x + m0 * K, xsum + m0 * G, K, G, group, tc, tsc, tzc, su, zu, y + m0 * ldy + t * TILE, ldy);
    if (M - m0 >= 4) {
        tile_avx512(4, x + m0 * K, xsum + m0 * G, K, G, group, tc, tsc, tzc, su, zu, y + m0 * ldy + t * TILE, ldy);
        m0 += 4;
    }
    if (M - m0 >= 2) {
        tile_avx512(2, x + m0 * K, xsum + m0 * G, K, G, group, tc, tsc, tzc, su, zu, y + m0 * ldy + t * TILE, ldy);
        m0 += 2;
    }
    if (M - m0 >= 1)
        tile_avx512(1, x + m0 * K, xsum + m0 * G, K, G, group, tc, tsc, tzc, su, zu, y + m0 * ldy + t * TILE, ldy);
#else
    float w[128 * TILE]; /* one group's weights as floats, group <= 128 */
    for (int64_t m0 = 0; m0 < M; m0 += MCHUNK) {
        const int64_t mc = M - m0 < MCHUNK ? M - m0 : MCHUNK;
        float acc[MCHUNK][TILE];
        memset(acc, 0, sizeof(acc));
        for (int64_t g = 0; g < G; g++) {
            float s[TILE], zp[TILE];
            group_params(scodes + (t * G + g) * TILE, zcodes + (t * G + g) * TILE, su, zu, s, zp);
            const uint8_t *gc = tc + g * group * HALF;
            for (int64_t k = 0; k < group; k++) {
                const uint8_t *b = gc + k * HALF;
                for (int j = 0; j < HALF; j++) {
                    w[k * TILE + j] = (float)(b[j] & 15);
                    w[k * TILE + j + HALF] = (float)(b[j] >> 4);
                }
            }
            for (int64_t m = 0; m < mc; m++) {
                const float *xg = x + (m0 + m) * K + g * group;
                float dot[TILE];
                memset(dot, 0, sizeof(dot));
                for (int64_t k = 0; k < group; k++) {
                    const float xv = xg[k];
                    for (int l = 0; l < TILE; l++) dot[l] += w[k * TILE + l] * xv;
                }
                const float xs = xsum[(m0 + m) * G + g];
                for (int l = 0; l < TILE; l++) acc[m][l] += s[l] * dot[l] + zp[l] * xs;
            }
        }
        for (int64_t m = 0; m < mc; m++) memcpy(y + (m0 + m) * ldy + t * TILE, acc[m], sizeof(acc[m]));
    }
#endif
}

/* x [M, K] fp32, or xb [M, K] bf16 (then x is NULL; only CPUs with the bf16 dot product take
 * it), y [M, N] fp32 (row stride ldy); num_channels outlier channels (0: none). Returns 0, or -1
 * when out of memory (y untouched). */
static int matmul(const float *x, const uint16_t *xb, int64_t M, int64_t K, int64_t N, int64_t group,
                  const uint8_t *codes, const uint8_t *scodes, const int8_t *zcodes, const int8_t *sexp,
                  const int8_t *zexp, const int64_t *channels, int64_t num_channels, const uint16_t *residual,
                  float *y, int64_t ldy, int64_t num_threads) {
    const int64_t G = K / group;
    float xsum_small[8 * 64];
    float *xsum = M * G <= 8 * 64 ? xsum_small : malloc((size_t)(M * G) * sizeof(float)); /* [M, G]: each group's sum of x */
    if (!xsum) return -1;
    for (int64_t i = 0; i < M * G; i++) { /* in 16 lanes (vectorised), then the tail */
        float lanes[16] = {0}, s = 0.0f;
        int64_t k = 0;
        if (xb)
            for (; k + 16 <= group; k += 16)
                for (int l = 0; l < 16; l++) lanes[l] += bf16_to_f32(xb[i * group + k + l]);
        else
            for (; k + 16 <= group; k += 16)
                for (int l = 0; l < 16; l++) lanes[l] += x[i * group + k + l];
        for (; k < group; k++) s += xb ? bf16_to_f32(xb[i * group + k]) : x[i * group + k];
        for (int l = 0; l < 16; l++) s += lanes[l];
        xsum[i] = s;
    }
    matmul_args args = {x, xsum, xb, M, K, G, group, codes, scodes, zcodes, sexp, zexp, y, ldy};
    pool_run(matmul_tile, &args, N / TILE, num_threads); /* tiles are independent */
    if (xsum != xsum_small) free(xsum);
    if (num_channels > 0) add_outliers(x, xb, M, K, N, channels, num_channels, residual, y, ldy);
    return 0;
}

/* dst[i] = src[i] rounded to the nearest bf16, ties to even, as torch's .to(bfloat16) (a NaN stays
 * a NaN); without branches, so that it vectorises */
static void to_bf16(const float *src, int64_t n, uint16_t *dst) {
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, src + i, sizeof(u));
        const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, nan = (u >> 16) | 0x40u;
        dst[i] = (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
    }
}

/* y = x @ W.T (+ outlier channels). x [M, K] and y [M, ldy] are fp32 or bf16 (is_bf16): a bf16
 * decode model's activations go in and out without a separate conversion on the torch side;
 * inside, sums are fp32 (a bf16 x is read as is where the CPU has the bf16 dot product, else
 * converted to fp32 first). Returns 0, or -1 when out of memory (y untouched). */
int edgellm_int4_matmul(const void *x, int64_t M, int64_t K, int64_t N, int64_t group, const uint8_t *codes,
                        const uint8_t *scodes, const int8_t *zcodes, const int8_t *sexp, const int8_t *zexp,
                        const int64_t *channels, int64_t num_channels, const uint16_t *residual, void *y,
                        int64_t ldy, int64_t is_bf16, int64_t num_threads) {
    if (!is_bf16)
        return matmul((const float *)x, NULL, M, K, N, group, codes, scodes, zcodes, sexp, zexp, channels,
                      num_channels, residual, (float *)y, ldy, num_threads);
#if defined(__AVX512BF16__)
    float *yf = malloc((size_t)(M * N) * sizeof(float));
    if (!yf) return -1;
    const int status = matmul(NULL, (const uint16_t *)x, M, K, N, group, codes, scodes, zcodes, sexp, zexp,
                              channels, num_channels, residual, yf, N, num_threads);
    float *xf = NULL;
#else
    float *xf = malloc((size_t)(M * K + M * N) * sizeof(float));
    if (!xf) return -1;
    float *yf = xf + M * K;
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf16_to_f32(((const uint16_t *)x)[i]);
    const int status = matmul(xf, NULL, M, K, N, group, codes, scodes, zcodes, sexp, zexp, channels, num_channels,
                              residual, yf, N, num_threads);
#endif
    if (status == 0)
        for (int64_t m = 0; m < M; m++) to_bf16(yf + m * N, N, (uint16_t *)y + m * ldy);
    free(xf ? (void *)xf : (void *)yf);
    return status;
}

typedef struct { /* one dequantization's arguments, for its tiles' work items */
    int64_t K, G, group;
    const uint8_t *codes, *scodes;
    const int8_t *zcodes, *sexp, *zexp;
    float *out;
} dequantize_args;

static void dequantize_tile(void *arg, int64_t t) {
    const dequantize_args *a = arg;
    const int64_t K = a->K, G = a->G, group = a->group;
    float su[TILE], zu[TILE];
    for (int l = 0; l < TILE; l++) {
        su[l] = pow2f(a->sexp[t * TILE + l]);
        zu[l] = pow2f(a->zexp[t * TILE + l]);
    }
    for (int64_t g = 0; g < G; g++) {
        float s[TILE], zp[TILE];
        group_params(a->scodes + (t * G + g) * TILE, a->zcodes + (t * G + g) * TILE, su, zu, s, zp);
        for (int64_t k = g * group; k < (g + 1) * group; k++) {
            const uint8_t *b = a->codes + (t * K + k) * HALF;
            for (int j = 0; j < HALF; j++) {
                a->out[(t * TILE + j) * K + k] = (float)(b[j] & 15) * s[j] + zp[j];
                a->out[(t * TILE + j + HALF) * K + k] = (float)(b[j] >> 4) * s[j + HALF] + zp[j + HALF];
            }
        }
    }
}

/* The whole weight as fp32 [N, K]: for long inputs (a prompt), where a dense matmul wins. */
void edgellm_int4_dequantize(int64_t K, int64_t N, int64_t group, const uint8_t *codes, const uint8_t *scodes,
                             const int8_t *zcodes, const int8_t *sexp, const int8_t *zexp, float *out,
                             int64_t num_threads) {
    dequantize_args args = {K, K / group, group, codes, scodes, zcodes, sexp, zexp, out};
    pool_run(dequantize_tile, &args, N / TILE, num_threads); /* tiles are independent */
}
