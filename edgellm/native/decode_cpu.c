/* The small per-layer work of a CPU decode step, fused: each function replaces several torch
 * ops (each of which costs a dispatch, an allocation and a pass over memory) by one call.
 * Called through edgellm/engine/cpu_ops.py, which holds the torch references they must match.
 *
 * Activations and the KV cache are fp32 or bf16 (is_bf16), the model's activation dtype;
 * everything inside is fp32, and a bf16 result is rounded to nearest even once, where torch
 * rounds it too. Plain C written for the auto-vectoriser (-O3 -march=native): sums run in
 * LANES independent lanes so that they vectorise without -ffast-math.
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"
#include "pool.h"

#define LANES 16

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch's .to(bfloat16) */
    union { uint32_t u; float f; } v;
    v.f = f;
    const uint32_t rounded = (v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16, nan = (v.u >> 16) | 0x40u;
    return (uint16_t)((v.u & 0x7fffffffu) > 0x7f800000u ? nan : rounded); /* NaN stays NaN; no branch: vectorises */
}

static inline float load(const void *p, int64_t i, int64_t is_bf16) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int64_t i, float f, int64_t is_bf16) {
    if (is_bf16) ((uint16_t *)p)[i] = f32_to_bf16(f);
    else ((float *)p)[i] = f;
}

/* n floats of row `row` of a [*, n] fp32 or bf16 array, as fp32 */
static inline void load_row(const void *base, int64_t row, int64_t n, int64_t is_bf16, float *dst) {
    if (is_bf16) {
        const uint16_t *src = (const uint16_t *)base + row * n;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    } else {
        const float *src = (const float *)base + row * n;
        for (int64_t i = 0; i < n; i++) dst[i] = src[i];
    }
}

static inline float dot(const float *a, const float *b, int64_t n) { /* n a multiple of LANES */
    float acc[LANES] = {0};
    for (int64_t i = 0; i < n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * b[i + l];
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

/* residual [M, N] += x (when x is given, rounded to the dtype like torch's add); then
 * out = weight * rms_norm(residual), the norm in fp32 and rounded to the dtype before the
 * product (as model.RMSNorm). N a multiple of LANES. */
void edgellm_add_rms_norm(const void *x, void *residual, const void *weight, void *out, int64_t M, int64_t N,
                          double eps, int64_t is_bf16) {
    for (int64_t m = 0; m < M; m++) {
        float acc[LANES] = {0};
        for (int64_t n = 0; n < N; n += LANES)
            for (int l = 0; l < LANES; l++) {
                const int64_t i = m * N + n + l;
                float h = load(residual, i, is_bf16);
                if (x) {
                    h += load(x, i, is_bf16);
                    store(residual, i, h, is_bf16);
                    h = load(residual, i, is_bf16);
                }
                acc[l] += h * h;
            }
        float sum = 0.0f;
        for (int l = 0; l < LANES; l++) sum += acc[l];
        const float inv = 1.0f / sqrtf(sum / (float)N + (float)eps);
        for (int64_t n = 0; n < N; n++) {
            const int64_t i = m * N + n;
            const float normed = load(residual, i, is_bf16) * inv;
            const float rounded = is_bf16 ? bf16_to_f32(f32_to_bf16(normed)) : normed;
            store(out, i, load(weight, n, is_bf16) * rounded, is_bf16);
        }
    }
}

/* RoPE (rotate-half, as HF Llama) in place on the first num_rotated heads of each token's row of
 * qkv [T, num_heads, D] (the q and k heads of a fused projection), then that row's K and V heads
 * (k_head and v_head on, num_kv_heads each) stored into the caches [slots, num_kv_heads, D] at
 * slots[t]. cos, sin [T, D] in the activation dtype; each product and the sum are rounded to
 * the dtype as torch's x * cos + rotated * sin rounds them. */
void edgellm_rope_store(void *qkv, int64_t T, int64_t num_heads, int64_t D, int64_t num_rotated, const void *cos,
                        const void *sin, int64_t k_head, int64_t v_head, int64_t num_kv_heads, const int64_t *slots,
                        void *k_cache, void *v_cache, int64_t is_bf16) {
    const int64_t half = D / 2, size = is_bf16 ? 2 : 4;
    float c[512], s[512], x[512]; /* D <= 512 (cpu_ops.py checks) */
    for (int64_t t = 0; t < T; t++) {
        load_row(cos, t, D, is_bf16, c);
        load_row(sin, t, D, is_bf16, s);
        for (int64_t h = 0; h < num_rotated; h++) {
            const int64_t row = t * num_heads + h;
            load_row(qkv, row, D, is_bf16, x);
            for (int64_t d = 0; d < D; d++) {
                const float rotated = d < half ? -x[d + half] : x[d - half];
                float a = x[d] * c[d], b = rotated * s[d];
                if (is_bf16) {
                    a = bf16_to_f32(f32_to_bf16(a));
                    b = bf16_to_f32(f32_to_bf16(b));
                }
                store(qkv, row * D + d, a + b, is_bf16);
            }
        }
        if (!slots) continue;
        const char *k = (const char *)qkv + (t * num_heads + k_head) * D * size;
        const char *v = (const char *)qkv + (t * num_heads + v_head) * D * size;
        char *kc = (char *)k_cache + slots[t] * num_kv_heads * D * size;
        char *vc = (char *)v_cache + slots[t] * num_kv_heads * D * size;
        for (int64_t i = 0; i < num_kv_heads * D * size; i++) {
            kc[i] = k[i];
            vc[i] = v[i];
        }
    }
}

/* Decode attention over the paged cache: for sequence b and query head h,
 *   out[b, h] = softmax(scale * q[b, h] . K[j]) @ V[j] over its context positions j < lens[b],
 * K[j] = k_cache[slot, h / (H / Hkv)] with slot = tables[b, j / block_size] * block_size + j % block_size.
 * q is row b of a [B, q_stride] array (its H heads first: a view into the fused q/k/v output);
 * caches [slots, Hkv, D]; out [B, H, D]. One work item is one sequence's KV head with the query
 * heads that share it, so each K and V row is read once for them all; items are split between
 * threads (pool.h). D a multiple of LANES, at most 512. Returns 0, or -1 when out of memory. */
typedef struct { /* one attention call's arguments, for its work items */
    const void *q, *k_cache, *v_cache;
    const int64_t *tables, *lens;
    int64_t q_stride, max_blocks, block_size, H, Hkv, D, is_bf16;
    float scale;
    void *out;
    _Atomic int failed;
} attention_args;

#define PREFETCH_ROWS 8 /* K rows fetched ahead in decode attention */
#define STACK_SCORES 4096 /* scores kept on the stack up to this many (group * context) */

#if defined(__AVX512F__)
#include <immintrin.h>

/* 16 values from element i of an fp32 or bf16 array, as fp32 */
static inline __m512 load16(const void *p, int64_t i, int64_t is_bf16) {
    if (!is_bf16) return _mm512_loadu_ps((const float *)p + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* e^x in 16 lanes (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, a degree-7 polynomial for e^r,
 * then the exponent n added by scalef; within 2 ulp of libm's expf). x is clamped below at
 * -87.3, where e^x leaves fp32's normal range (softmax's weights and SiLU's 1 + e^-g cannot tell
 * the difference); above 88.7 it is inf, as expf. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.33654f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 y = _mm512_set1_ps(1.9875691500e-4f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3981999507e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(8.3334519073e-3f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(4.1665795894e-2f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.6666665459e-1f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.0000001201e-1f));
    y = _mm512_fmadd_ps(y, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(y, n);
}

/* 16 floats rounded to the nearest bf16, ties to even (as torch; NaN stays NaN), as the bits of
 * floats whose low 16 bits are zero */
static inline __m512i round16_bf16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)));
    const __m512i r = _mm512_and_si512(_mm512_add_epi32(u, bias), _mm512_set1_epi32((int)0xffff0000u));
    return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
}

/* The work item with AVX-512: each K row is converted once for all the query heads of its
 * group, the group's 16-lane partial dot products are summed across lanes once per row, and
 * the softmax's exponentials run 16 at a time (libm's expf one at a time was a third of it). */
static void attention_item_avx512(const attention_args *a, int64_t b, int64_t kv, const int64_t *table, int64_t L,
                                  float *p, float *acc) {
    const int64_t Hkv = a->Hkv, D = a->D, is_bf16 = a->is_bf16, group = a->H / Hkv, nd = D / LANES;
    float qf[8 * 512]; /* group <= 8 and D <= 512 (cpu_ops.py checks) */
    for (int64_t g = 0; g < group; g++)
        for (int64_t d = 0; d < D; d++)
            qf[g * D + d] = load(a->q, b * a->q_stride + (kv * group + g) * D + d, is_bf16) * a->scale;
    const int64_t size = is_bf16 ? 2 : 4;
    for (int64_t j = 0; j < L; j++) {
        const int64_t slot = table[j / a->block_size] * a->block_size + j % a->block_size;
        const int64_t row = (slot * Hkv + kv) * D;
        if (j + PREFETCH_ROWS < L) { /* the rows scattered over the cache's blocks: fetch ahead what the
                                      * prefetcher cannot guess (and this row's V for the last pass) */
            const int64_t ahead = table[(j + PREFETCH_ROWS) / a->block_size] * a->block_size +
                                  (j + PREFETCH_ROWS) % a->block_size;
            const char *next = (const char *)a->k_cache + (ahead * Hkv + kv) * D * size;
            for (int64_t off = 0; off < D * size; off += 64) _mm_prefetch(next + off, _MM_HINT_T0);
        }
        for (int64_t off = 0; off < D * size; off += 64)
            _mm_prefetch((const char *)a->v_cache + row * size + off, _MM_HINT_T1);
        __m512 s[8];
        for (int64_t g = 0; g < group; g++) s[g] = _mm512_setzero_ps();
        for (int64_t c = 0; c < nd; c++) {
            const __m512 k = load16(a->k_cache, row + c * LANES, is_bf16);
            for (int64_t g = 0; g < group; g++) s[g] = _mm512_fmadd_ps(k, _mm512_loadu_ps(qf + g * D + c * LANES), s[g]);
        }
        for (int64_t g = 0; g < group; g++) p[g * L + j] = _mm512_reduce_add_ps(s[g]);
    }
    for (int64_t g = 0; g < group; g++) {
        float *pg = p + g * L;
        __m512 vmax = _mm512_set1_ps(-INFINITY);
        for (int64_t j = 0; j < L; j += LANES) {
            const __mmask16 m = L - j >= LANES ? 0xffff : (__mmask16)((1u << (L - j)) - 1);
            vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(vmax, m, pg + j));
        }
        const __m512 max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        __m512 vsum = _mm512_setzero_ps();
        for (int64_t j = 0; j < L; j += LANES) {
            const __mmask16 m = L - j >= LANES ? 0xffff : (__mmask16)((1u << (L - j)) - 1);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, pg + j), max));
            _mm512_mask_storeu_ps(pg + j, m, e);
            vsum = _mm512_add_ps(vsum, _mm512_maskz_mov_ps(m, e));
        }
        const float sum = _mm512_reduce_add_ps(vsum);
        for (int64_t j = 0; j < L; j++) pg[j] /= sum;
    }
    for (int64_t j = 0; j < L; j++) {
        const int64_t slot = table[j / a->block_size] * a->block_size + j % a->block_size;
        const int64_t row = (slot * Hkv + kv) * D;
        for (int64_t c = 0; c < nd; c++) {
            const __m512 v = load16(a->v_cache, row + c * LANES, is_bf16);
            for (int64_t g = 0; g < group; g++) {
                float *o = acc + g * D + c * LANES;
                _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_set1_ps(p[g * L + j]), v, _mm512_loadu_ps(o)));
            }
        }
    }
}
#else

/* The work item in plain C. */
static void attention_item_plain(const attention_args *a, int64_t b, int64_t kv, const int64_t *table, int64_t L,
                                 float *p, float *acc) {
    const int64_t Hkv = a->Hkv, D = a->D, is_bf16 = a->is_bf16, group = a->H / Hkv;
    float qf[8 * 512], row[512]; /* group <= 8 (cpu_ops.py checks) */
    for (int64_t g = 0; g < group; g++)
        for (int64_t d = 0; d < D; d++)
            qf[g * D + d] = load(a->q, b * a->q_stride + (kv * group + g) * D + d, is_bf16) * a->scale;
    for (int64_t j = 0; j < L; j++) {
        const int64_t slot = table[j / a->block_size] * a->block_size + j % a->block_size;
        load_row(a->k_cache, slot * Hkv + kv, D, is_bf16, row);
        for (int64_t g = 0; g < group; g++) p[g * L + j] = dot(qf + g * D, row, D);
    }
    for (int64_t g = 0; g < group; g++) {
        float *pg = p + g * L, max = -INFINITY, sum = 0.0f;
        for (int64_t j = 0; j < L; j++) max = pg[j] > max ? pg[j] : max;
        for (int64_t j = 0; j < L; j++) {
            pg[j] = expf(pg[j] - max);
            sum += pg[j];
        }
        for (int64_t j = 0; j < L; j++) pg[j] /= sum;
    }
    for (int64_t j = 0; j < L; j++) {
        const int64_t slot = table[j / a->block_size] * a->block_size + j % a->block_size;
        load_row(a->v_cache, slot * Hkv + kv, D, is_bf16, row);
        for (int64_t g = 0; g < group; g++) {
            const float w = p[g * L + j];
            for (int64_t d = 0; d < D; d++) acc[g * D + d] += w * row[d];
        }
    }
}
#endif

/* Work item (sequence b, KV head kv): the query heads sharing that KV head. */
static void attention_item(void *arg, int64_t item) {
    attention_args *a = arg;
    const int64_t Hkv = a->Hkv, D = a->D, group = a->H / Hkv;
    const int64_t b = item / Hkv, kv = item % Hkv, L = a->lens[b];
    float p_stack[STACK_SCORES], acc[8 * 512]; /* [group, L] scores, then weights; [group, D] sums */
    memset(acc, 0, (size_t)(group * D) * sizeof(float));
    float *p = group * L <= STACK_SCORES ? p_stack : malloc((size_t)(group * L) * sizeof(float));
    if (!p) {
        atomic_store(&a->failed, 1);
        return;
    }
#if defined(__AVX512F__)
    attention_item_avx512(a, b, kv, a->tables + b * a->max_blocks, L, p, acc);
#else
    attention_item_plain(a, b, kv, a->tables + b * a->max_blocks, L, p, acc);
#endif
    for (int64_t g = 0; g < group; g++)
        for (int64_t d = 0; d < D; d++) store(a->out, (b * a->H + kv * group + g) * D + d, acc[g * D + d], a->is_bf16);
    if (p != p_stack) free(p);
}

int edgellm_paged_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                            const int64_t *tables, int64_t max_blocks, const int64_t *lens, int64_t block_size,
                            int64_t B, int64_t H, int64_t Hkv, int64_t D, double scale, void *out, int64_t is_bf16,
                            int64_t num_threads) {
    attention_args args = {q, k_cache, v_cache, tables, lens, q_stride, max_blocks, block_size, H, Hkv, D, is_bf16,
                           (float)scale, out, 0};
    pool_run(attention_item, &args, B * Hkv, num_threads);
    return atomic_load(&args.failed) ? -1 : 0;
}

/* out [B, I] = silu(gate) * up for gu [B, 2I] = (gate | up) rows, as torch's F.silu(gate) * up:
 * silu(g) = g / (1 + e^-g), and in bf16 both it and the product are rounded to bf16. */
void edgellm_silu_mul(const void *gu, int64_t B, int64_t I, void *out, int64_t is_bf16) {
    for (int64_t b = 0; b < B; b++) {
        const int64_t gate = b * 2 * I, up = gate + I, o = b * I;
        int64_t i = 0;
#if defined(__AVX512F__)
        const __m512 one = _mm512_set1_ps(1.0f);
        for (; i + LANES <= I; i += LANES) {
            const __m512 g = load16(gu, gate + i, is_bf16), u = load16(gu, up + i, is_bf16);
            const __m512 silu = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            if (is_bf16) {
                const __m512i r = round16_bf16(_mm512_mul_ps(_mm512_castsi512_ps(round16_bf16(silu)), u));
                _mm256_storeu_si256((__m256i *)((uint16_t *)out + o + i), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
            } else {
                _mm512_storeu_ps((float *)out + o + i, _mm512_mul_ps(silu, u));
            }
        }
#endif
        for (; i < I; i++) {
            const float g = load(gu, gate + i, is_bf16), u = load(gu, up + i, is_bf16);
            float silu = g / (1.0f + expf(-g));
            if (is_bf16) silu = bf16_to_f32(f32_to_bf16(silu));
            store(out, o + i, silu * u, is_bf16);
        }
    }
}
