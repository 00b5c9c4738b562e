"""The CPU decode step's fused ops (edgellm/native/decode_cpu.c), each one ctypes call in place of
several torch ops: residual add + RMSNorm, RoPE + KV-cache store, and attention straight over
the paged cache (no gather of the context into a new tensor, no mask).

A decode step of the 135M model ran about 25 torch ops a layer, each a few microseconds of
dispatch and allocation whatever its size, and torch's SDPA took 150 us a layer at batch 1
for a one-token query (its flash kernel is tiled for long queries). A ctypes call costs about
what one torch op costs, so only these multi-op fusions pay.

They compute what the torch path of model.py computes (fp32 inside, rounded to the activation
dtype where torch rounds), up to the order of fp32 sums; tests/unit/test_cpu_ops.py holds them
to it. `usable()` says when they apply; elsewhere (a GPU, other dtypes, no C compiler) the model
keeps its torch path.
"""

from __future__ import annotations

import ctypes
import functools
import math

import torch

from edgellm import native

MAX_HEAD_DIM = 512  # the C file's row buffers
MAX_GROUP = 8  # query heads per KV head (the C file's buffer)
LANES = 16  # the C file's sums run in 16 lanes: widths must be multiples of it

_p, _i64, _f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
SIGNATURES: native.Signatures = {
    "edgellm_add_rms_norm": ((_p, _p, _p, _p, _i64, _i64, _f64, _i64), None),
    "edgellm_rope_store": ((_p, _i64, _i64, _i64, _i64, _p, _p, _i64, _i64, _i64, _p, _p, _p, _i64), None),
    "edgellm_paged_attention": ((_p, _i64, _p, _p, _p, _i64, _p, _i64, _i64, _i64, _i64, _i64, _f64, _p, _i64, _i64),
                                ctypes.c_int),
}


@functools.cache
def library() -> ctypes.CDLL | None:
    lib = native.library()
    return None if lib is None else native.bind(lib, SIGNATURES)


def usable(device: torch.device, dtype: torch.dtype, hidden_size: int, num_heads: int, num_kv_heads: int,
           head_dim: int) -> bool:
    """Whether a decode step of this shape and dtype can take the fused ops."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)
            and hidden_size % LANES == 0 and head_dim % LANES == 0 and head_dim <= MAX_HEAD_DIM
            and num_heads % num_kv_heads == 0 and num_heads // num_kv_heads <= MAX_GROUP
            and library() is not None)


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x (in place; x None: no add), then weight * rms_norm(residual) as model.RMSNorm
    computes it. residual, x [M, N] contiguous, weight [N], all one dtype; returns [M, N]."""
    out = torch.empty_like(residual)
    library().edgellm_add_rms_norm(
        0 if x is None else x.data_ptr(), residual.data_ptr(), weight.data_ptr(), out.data_ptr(),
        residual.shape[0], residual.shape[1], eps, residual.dtype == torch.bfloat16,
    )
    return out


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, num_kv_heads: int,
               slots: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """In place on qkv [T, H + 2 Hkv, D] (contiguous, q heads then k then v): RoPE on the q and k
    heads (cos, sin [T, D] contiguous, in qkv's dtype); then each token's k and v heads into the
    caches [S, Hkv, D] at slots [T] (int64; None: not stored)."""
    t, total_heads, d = qkv.shape
    library().edgellm_rope_store(
        qkv.data_ptr(), t, total_heads, d, num_heads + num_kv_heads, cos.data_ptr(), sin.data_ptr(),
        num_heads, num_heads + num_kv_heads, num_kv_heads, 0 if slots is None else slots.data_ptr(),
        k_cache.data_ptr(), v_cache.data_ptr(), qkv.dtype == torch.bfloat16,
    )


def paged_attention(qkv: torch.Tensor, num_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int) -> torch.Tensor:
    """Attention of each sequence's one new token over its context in the paged cache. qkv
    [B, H + 2 Hkv, D] contiguous (the query heads first); caches [S, Hkv, D]; block_tables
    [B, max_blocks] and context_lens [B] int64 (the new token included). Returns [B, H, D]."""
    b, total_heads, d = qkv.shape
    num_kv_heads = k_cache.shape[1]
    out = torch.empty(b, num_heads, d, dtype=qkv.dtype)
    status = library().edgellm_paged_attention(
        qkv.data_ptr(), total_heads * d, k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(),
        block_tables.shape[1], context_lens.data_ptr(), block_size, b, num_heads, num_kv_heads, d,
        1 / math.sqrt(d), out.data_ptr(), qkv.dtype == torch.bfloat16, torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError("decode attention: out of memory for its score buffers")
    return out
