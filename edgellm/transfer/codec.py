"""KV chunk encoding: tensors <-> KVChunk messages, with checksums.

A chunk holds layers [layer_start, layer_end) x tokens [token_start, token_end) of one
request's prompt KV as K and V tensors of shape [layers, kv_heads, tokens, head_dim].
A layer group larger than max_bytes is split along tokens so that no message comes
near gRPC's 4 MiB limit, however long the prompt.
"""

from __future__ import annotations

import zlib
from typing import Iterator

import numpy as np
import torch

from edgellm.v1 import decode_pb2

DTYPE_TO_WIRE = {
    torch.float32: decode_pb2.KV_DTYPE_FP32,
    torch.float16: decode_pb2.KV_DTYPE_FP16,
    torch.bfloat16: decode_pb2.KV_DTYPE_BF16,
}
WIRE_TO_DTYPE = {v: k for k, v in DTYPE_TO_WIRE.items()}


class ChunkError(ValueError):
    """A chunk that must not be used: bad checksum, shape, dtype or order."""


def _raw(t: torch.Tensor) -> bytes:
    # Reinterpret as bytes (works for bf16, which numpy lacks).
    return t.contiguous().view(torch.uint8).numpy().tobytes()


def checksum(k: bytes, v: bytes) -> int:
    return zlib.crc32(v, zlib.crc32(k))


def encode(
    request_id: str,
    layer_start: int,
    k: torch.Tensor,
    v: torch.Tensor,
    max_bytes: int,
    first_seq_no: int,
) -> Iterator[decode_pb2.KVChunk]:
    """Split k, v ([layers, kv_heads, tokens, head_dim]) into chunks of at most max_bytes of K+V."""
    num_layers, num_heads, num_tokens, head_dim = k.shape
    bytes_per_token = 2 * num_layers * num_heads * head_dim * k.element_size()
    tokens_per_chunk = max(1, max_bytes // bytes_per_token)
    seq_no = first_seq_no
    for token_start in range(0, num_tokens, tokens_per_chunk):
        token_end = min(num_tokens, token_start + tokens_per_chunk)
        k_bytes, v_bytes = _raw(k[:, :, token_start:token_end]), _raw(v[:, :, token_start:token_end])
        yield decode_pb2.KVChunk(
            request_id=request_id,
            seq_no=seq_no,
            layer_start=layer_start,
            layer_end=layer_start + num_layers,
            token_start=token_start,
            token_end=token_end,
            dtype=DTYPE_TO_WIRE[k.dtype],
            shape=[num_layers, num_heads, token_end - token_start, head_dim],
            k=k_bytes,
            v=v_bytes,
            crc32=checksum(k_bytes, v_bytes),
        )
        seq_no += 1


def decode(chunk: decode_pb2.KVChunk) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify a chunk and return its (k, v); raises ChunkError on any inconsistency."""
    if checksum(chunk.k, chunk.v) != chunk.crc32:
        raise ChunkError(f"chunk {chunk.seq_no}: checksum mismatch")
    dtype = WIRE_TO_DTYPE.get(chunk.dtype)
    if dtype is None:
        raise ChunkError(f"chunk {chunk.seq_no}: unknown dtype {chunk.dtype}")
    shape = tuple(chunk.shape)
    if len(shape) != 4 or shape[0] != chunk.layer_end - chunk.layer_start or shape[2] != chunk.token_end - chunk.token_start:
        raise ChunkError(f"chunk {chunk.seq_no}: shape {shape} disagrees with its layer/token ranges")
    expected = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
    if len(chunk.k) != expected or len(chunk.v) != expected:
        raise ChunkError(f"chunk {chunk.seq_no}: {len(chunk.k)}/{len(chunk.v)} bytes, expected {expected}")
    k = torch.frombuffer(bytearray(chunk.k), dtype=dtype).view(shape)
    v = torch.frombuffer(bytearray(chunk.v), dtype=dtype).view(shape)
    return k, v
