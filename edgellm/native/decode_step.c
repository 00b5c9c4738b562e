/* A whole CPU decode step's layer loop in one call, for a model whose projections are all INT4
 * layers on our kernel: the same ops, in the same order, as model.py's _fused_decode calls them
 * one by one (INT4 matmuls, fused add + RMSNorm, RoPE + KV store, paged attention, SwiGLU).
 *
 * Why: that loop made about 300 calls from Python a step (each a few microseconds of dispatch
 * and allocation, 2-3 ms a step in all at batch 1, a fifth of it), and between two of them the
 * thread pool's helpers sat idle while Python ran. Here the helpers stay busy from the first
 * layer to the last, as in llama.cpp's graph executor.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "native.h"

typedef struct { /* one INT4 layer's tiles (edgellm/quant/linear.py's Int4Linear, C kernel) */
    const uint8_t *codes, *scodes;
    const int8_t *zcodes, *sexp, *zexp;
    const int64_t *channels; /* outlier channels (num_channels; 0: none) and their bf16 residual */
    int64_t num_channels;
    const uint16_t *residual;
    int64_t in_features, out_features, group;
} int4_linear;

typedef struct {
    int4_linear qkv, o, gate_up, down; /* q/k/v and gate/up fused along their outputs */
    const void *input_norm, *post_norm; /* RMSNorm weights [hidden] in the activation dtype */
    void *k_cache, *v_cache; /* [slots, Hkv, D] */
} decode_layer;

typedef struct {
    int64_t num_layers, hidden, num_heads, num_kv_heads, head_dim, intermediate;
    double eps;
    const decode_layer *layers;
    const void *final_norm;
} decode_model;

static int matmul(const int4_linear *w, const void *x, int64_t B, void *y, int64_t is_bf16, int64_t num_threads) {
    return edgellm_int4_matmul(x, B, w->in_features, w->out_features, w->group, w->codes, w->scodes, w->zcodes,
                               w->sexp, w->zexp, w->channels, w->num_channels, w->residual, y, w->out_features,
                               is_bf16, num_threads);
}

/* The layers of one decode step for B sequences (one new token each). h [B, hidden] is the
 * residual stream (the embeddings in; updated in place); x_out [B, hidden] gets the final
 * norm of the last layer's output (the LM head's input). cos, sin [B, D]; slots [B] where the
 * new K/V go; tables [B, max_blocks] and lens [B] (the new token included) for attention.
 * Returns 0, or -1 when out of memory. */
int edgellm_decode_layers(const decode_model *model, int64_t B, void *h, void *x_out, const void *cos,
                          const void *sin, const int64_t *slots, const int64_t *tables, int64_t max_blocks,
                          const int64_t *lens, int64_t block_size, int64_t is_bf16, int64_t num_threads) {
    const int64_t H = model->num_heads, Hkv = model->num_kv_heads, D = model->head_dim;
    const int64_t hidden = model->hidden, I = model->intermediate, size = is_bf16 ? 2 : 4;
    const int64_t qkv_width = (H + 2 * Hkv) * D;
    /* activations: qkv, attention output, x (a norm's output), a projection's output, gate|up, act */
    char *scratch = malloc((size_t)(B * (qkv_width + H * D + 2 * hidden + 3 * I) * size));
    if (!scratch) return -1;
    void *qkv = scratch, *attn = (char *)qkv + B * qkv_width * size, *x = (char *)attn + B * H * D * size;
    void *proj = (char *)x + B * hidden * size, *gu = (char *)proj + B * hidden * size;
    void *act = (char *)gu + B * 2 * I * size;
    int status = 0;
    edgellm_add_rms_norm(NULL, h, model->layers[0].input_norm, x, B, hidden, model->eps, is_bf16);
    for (int64_t i = 0; i < model->num_layers && status == 0; i++) {
        const decode_layer *l = &model->layers[i];
        status |= matmul(&l->qkv, x, B, qkv, is_bf16, num_threads);
        edgellm_rope_store(qkv, B, H + 2 * Hkv, D, H + Hkv, cos, sin, H, H + Hkv, Hkv, slots, l->k_cache, l->v_cache,
                           is_bf16);
        status |= edgellm_paged_attention(qkv, qkv_width, l->k_cache, l->v_cache, tables, max_blocks, lens,
                                          block_size, B, H, Hkv, D, 1.0 / sqrt((double)D), attn, is_bf16, num_threads);
        status |= matmul(&l->o, attn, B, proj, is_bf16, num_threads);
        edgellm_add_rms_norm(proj, h, l->post_norm, x, B, hidden, model->eps, is_bf16);
        status |= matmul(&l->gate_up, x, B, gu, is_bf16, num_threads);
        edgellm_silu_mul(gu, B, I, act, is_bf16);
        status |= matmul(&l->down, act, B, proj, is_bf16, num_threads);
        const void *next_norm = i + 1 < model->num_layers ? model->layers[i + 1].input_norm : model->final_norm;
        edgellm_add_rms_norm(proj, h, next_norm, i + 1 < model->num_layers ? x : x_out, B, hidden, model->eps,
                             is_bf16);
    }
    free(scratch);
    return status ? -1 : 0;
}
