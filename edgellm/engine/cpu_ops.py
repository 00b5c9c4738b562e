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
from typing import Any

import torch

from edgellm import native

MAX_HEAD_DIM = 512  # the C file's row buffers
MAX_GROUP = 8  # query heads per KV head (the C file's buffer)
LANES = 16  # the C file's sums run in 16 lanes: widths must be multiples of it

_p, _i64, _f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double


class _Int4Linear(ctypes.Structure):  # decode_step.c's int4_linear
    _fields_ = [("codes", _p), ("scodes", _p), ("zcodes", _p), ("sexp", _p), ("zexp", _p), ("channels", _p),
                ("num_channels", _i64), ("residual", _p), ("in_features", _i64), ("out_features", _i64),
                ("group", _i64)]


class _Layer(ctypes.Structure):  # decode_step.c's decode_layer
    _fields_ = [("qkv", _Int4Linear), ("o", _Int4Linear), ("gate_up", _Int4Linear), ("down", _Int4Linear),
                ("input_norm", _p), ("post_norm", _p), ("k_cache", _p), ("v_cache", _p)]


class _Model(ctypes.Structure):  # decode_step.c's decode_model
    _fields_ = [("num_layers", _i64), ("hidden", _i64), ("num_heads", _i64), ("num_kv_heads", _i64),
                ("head_dim", _i64), ("intermediate", _i64), ("eps", _f64), ("layers", ctypes.POINTER(_Layer)),
                ("final_norm", _p)]


SIGNATURES: native.Signatures = {
    "edgellm_add_rms_norm": ((_p, _p, _p, _p, _i64, _i64, _f64, _i64), None),
    "edgellm_rope_store": ((_p, _i64, _i64, _i64, _i64, _p, _p, _i64, _i64, _i64, _p, _p, _p, _i64), None),
    "edgellm_paged_attention": ((_p, _i64, _p, _p, _p, _i64, _p, _i64, _i64, _i64, _i64, _i64, _f64, _p, _i64, _i64),
                                ctypes.c_int),
    "edgellm_silu_mul": ((_p, _i64, _i64, _p, _i64), None),
    "edgellm_decode_layers": ((ctypes.POINTER(_Model), _i64, _p, _p, _p, _p, _p, _p, _i64, _p, _i64, _i64, _i64),
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


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up for gate_up [M, 2I] = (gate | up) (contiguous): the SwiGLU MLP's middle,
    rounded as torch rounds it. Returns [M, I]."""
    m, width = gate_up.shape
    out = torch.empty(m, width // 2, dtype=gate_up.dtype)
    library().edgellm_silu_mul(gate_up.data_ptr(), m, width // 2, out.data_ptr(), gate_up.dtype == torch.bfloat16)
    return out


class DecodeLayers:
    """A model's layers as decode_step.c reads them (pointers into its weights and into a KV
    cache), made once and reused each step: the whole layer loop of a decode step in one call.

    It applies where every projection is an INT4 layer on our C kernel with whole tiles (its
    `c_layer()` is not None: quant/linear.py's Int4Linear, read by duck typing since the engine
    never imports quant); model.py keeps its op-by-op loop elsewhere, and for hooks between layers.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        a, num_layers = model.arch, len(model.layers)  # a pipeline stage holds some of arch.num_layers
        self.layers = (_Layer * num_layers)()
        self.model = _Model(num_layers, a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim,
                            a.intermediate_size, a.rms_norm_eps, self.layers, 0)
        self._source = model
        # batches the INT4 layers themselves run on the kernel (beyond: dense)
        self.max_rows: int = model.layers[0].self_attn.qkv_proj.MAX_KERNEL_ROWS
        self._weights_at: int | None = None  # the first projection's codes when the pointers were taken
        self._cache_at: tuple[int, ...] | None = None

    @staticmethod
    def applies(model: torch.nn.Module) -> bool:
        def ours(linear: torch.nn.Module | None) -> bool:
            return hasattr(linear, "c_layer") and linear.c_layer() is not None

        return (library() is not None and len(model.layers) > 0
                and all(ours(layer.self_attn.qkv_proj) and ours(layer.self_attn.o_proj)
                        and ours(layer.mlp.gate_up_proj) and ours(layer.mlp.down_proj) for layer in model.layers))

    def _take_weights(self) -> None:
        def linear(module: torch.nn.Module) -> _Int4Linear:
            return _Int4Linear(*module.c_layer())  # the struct's fields, in its order

        for c_layer, layer in zip(self.layers, self._source.layers):
            attn, mlp = layer.self_attn, layer.mlp
            c_layer.qkv, c_layer.o = linear(attn.qkv_proj), linear(attn.o_proj)
            c_layer.gate_up, c_layer.down = linear(mlp.gate_up_proj), linear(mlp.down_proj)
            c_layer.input_norm = layer.input_layernorm.weight.data_ptr()
            c_layer.post_norm = layer.post_attention_layernorm.weight.data_ptr()
        self.model.final_norm = self._source.norm.weight.data_ptr()
        self._weights_at = self._source.layers[0].self_attn.qkv_proj.tile_codes.data_ptr()

    def _take_cache(self, cache: Any) -> None:
        for c_layer, k, v in zip(self.layers, cache.k, cache.v):
            c_layer.k_cache, c_layer.v_cache = k.data_ptr(), v.data_ptr()
        self._cache_at = (cache.k[0].data_ptr(), cache.v[0].data_ptr())

    def run(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, slots: torch.Tensor,
            block_tables: torch.Tensor, context_lens: torch.Tensor, cache: Any) -> torch.Tensor:
        """The layers over h [B, hidden] (the embeddings; the residual stream, updated in place);
        returns the final norm of the last layer's output [B, hidden]. cos, sin [B, D]; slots,
        block_tables, context_lens as paged_attention and rope_store take them."""
        if self._source.layers[0].self_attn.qkv_proj.tile_codes.data_ptr() != self._weights_at:
            self._take_weights()  # first use, or the model moved
        if (cache.k[0].data_ptr(), cache.v[0].data_ptr()) != self._cache_at:
            self._take_cache(cache)
        out = torch.empty_like(h)
        status = library().edgellm_decode_layers(
            ctypes.byref(self.model), h.shape[0], h.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            slots.data_ptr(), block_tables.data_ptr(), block_tables.shape[1], context_lens.data_ptr(),
            cache.block_size, h.dtype == torch.bfloat16, torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError("decode step: out of memory for its activations")
        return out
