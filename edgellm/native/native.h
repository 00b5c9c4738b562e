/* The library's exported functions that its other C files call (each documented where it is
 * defined). */
#ifndef EDGELLM_NATIVE_H
#define EDGELLM_NATIVE_H
#include <stdint.h>

/* int4_cpu.c */
int edgellm_int4_matmul(const void *x, int64_t M, int64_t K, int64_t N, int64_t group, const uint8_t *codes,
                        const uint8_t *scodes, const int8_t *zcodes, const int8_t *sexp, const int8_t *zexp,
                        const int64_t *channels, int64_t num_channels, const uint16_t *residual, void *y,
                        int64_t ldy, int64_t is_bf16, int64_t num_threads);

/* decode_cpu.c */
void edgellm_add_rms_norm(const void *x, void *residual, const void *weight, void *out, int64_t M, int64_t N,
                          double eps, int64_t is_bf16);
void edgellm_rope_store(void *qkv, int64_t T, int64_t num_heads, int64_t D, int64_t num_rotated, const void *cos,
                        const void *sin, int64_t k_head, int64_t v_head, int64_t num_kv_heads, const int64_t *slots,
                        void *k_cache, void *v_cache, int64_t is_bf16);
int edgellm_paged_attention(const void *q, int64_t q_stride, const void *k_cache, const void *v_cache,
                            const int64_t *tables, int64_t max_blocks, const int64_t *lens, int64_t block_size,
                            int64_t B, int64_t H, int64_t Hkv, int64_t D, double scale, void *out, int64_t is_bf16,
                            int64_t num_threads);
void edgellm_silu_mul(const void *gu, int64_t B, int64_t I, void *out, int64_t is_bf16);

#endif
