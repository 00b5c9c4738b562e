"""Decode side: assemble streamed KV chunks into a sequence's cache, then hand it to Decode.

Lifecycle of one request here:
  PushKV stream opens -> chunks verified (checksum, order, ranges) and written into staging
  tensors [layers, kv_heads, prompt_tokens, head_dim] -> closing message checks that every
  layer x token was covered -> entry becomes ready -> Decode(request_id) takes it (or it
  expires after a TTL) and hands it to the engine, which copies it into KV blocks when the
  sequence joins the decode batch. Staging keeps the transfer independent of block supply.
A request whose stream fails any check is dropped whole: it is never decoded from wrong KV.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from edgellm.logs import bind_request
from edgellm.transfer import codec
from edgellm.v1 import decode_pb2


@dataclass
class ReceivedKV:
    request_id: str
    k: torch.Tensor  # [layers, kv_heads, prompt_tokens, head_dim]
    v: torch.Tensor
    num_prompt_tokens: int
    first_token_id: int
    num_chunks: int
    num_bytes: int
    first_chunk_received_unix_ns: int
    last_chunk_received_unix_ns: int


@dataclass
class _Slot:
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    result: ReceivedKV | None = None
    created: float = field(default_factory=time.monotonic)


class KVStore:
    """Received prompt KV by request id, waiting to be claimed by a Decode call."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, ttl_s: float) -> None:
        self._shape = (num_layers, num_kv_heads, head_dim)
        self._dtype = dtype
        self._ttl_s = ttl_s
        self._slots: dict[str, _Slot] = {}

    def __len__(self) -> int:
        return sum(1 for s in self._slots.values() if s.result is not None)

    def _slot(self, request_id: str) -> _Slot:
        self._expire()
        return self._slots.setdefault(request_id, _Slot())

    def _expire(self) -> None:
        now = time.monotonic()
        for rid in [r for r, s in self._slots.items() if now - s.created > self._ttl_s]:
            del self._slots[rid]

    async def receive(self, chunks: AsyncIterator[decode_pb2.KVChunk]) -> ReceivedKV:
        """Consume one PushKV stream; raises codec.ChunkError if it is not complete and intact."""
        k_all: torch.Tensor | None = None
        v_all: torch.Tensor | None = None
        num_prompt = 0
        request_id = None
        expected_seq = 0
        covered: dict[int, int] = {}  # layer -> tokens received contiguously from 0
        num_bytes, first_ns = 0, 0
        async for chunk in chunks:
            now = time.time_ns()
            first_ns = first_ns or now
            if request_id is None:
                request_id = chunk.request_id
                bind_request(request_id)  # the PushKV handler's log lines (a rejection too) name it
            if chunk.request_id != request_id:
                raise codec.ChunkError(f"chunk for {chunk.request_id!r} inside the stream of {request_id!r}")
            if chunk.seq_no != expected_seq:
                raise codec.ChunkError(f"chunk {chunk.seq_no} arrived where {expected_seq} was expected")
            expected_seq += 1
            if chunk.is_last:
                if chunk.num_chunks != expected_seq - 1:
                    raise codec.ChunkError(f"stream ended after {expected_seq - 1} chunks, sender sent {chunk.num_chunks}")
                if k_all is None or any(covered.get(layer, 0) != num_prompt for layer in range(self._shape[0])):
                    raise codec.ChunkError("stream ended before every layer's KV arrived")
                result = ReceivedKV(
                    request_id, k_all, v_all, num_prompt, chunk.first_token_id, expected_seq - 1, num_bytes, first_ns, now
                )
                slot = self._slot(request_id)
                slot.result = result
                slot.ready.set()
                return result
            k, v = codec.decode(chunk)
            if k_all is None:
                num_prompt = chunk.num_prompt_tokens
                num_layers, num_heads, head_dim = self._shape
                k_all = torch.empty(num_layers, num_heads, num_prompt, head_dim, dtype=self._dtype)
                v_all = torch.empty_like(k_all)
            if chunk.num_prompt_tokens != num_prompt or chunk.token_end > num_prompt or k.shape[1:2] + k.shape[3:] != (
                self._shape[1],
                self._shape[2],
            ):
                raise codec.ChunkError(f"chunk {chunk.seq_no}: shape or prompt length disagrees with the stream")
            for i, layer in enumerate(range(chunk.layer_start, chunk.layer_end)):
                if layer >= self._shape[0] or covered.get(layer, 0) != chunk.token_start:
                    raise codec.ChunkError(f"chunk {chunk.seq_no}: layer {layer} tokens out of order")
                k_all[layer, :, chunk.token_start : chunk.token_end] = k[i]
                v_all[layer, :, chunk.token_start : chunk.token_end] = v[i]
                covered[layer] = chunk.token_end
            num_bytes += codec.wire_bytes(chunk)
        raise codec.ChunkError("stream closed without its closing message")

    async def claim(self, request_id: str, timeout_s: float) -> ReceivedKV:
        """Wait for a request's KV and take it out of the store."""
        slot = self._slot(request_id)
        try:
            await asyncio.wait_for(slot.ready.wait(), timeout_s)
        finally:
            self._slots.pop(request_id, None)
        assert slot.result is not None
        return slot.result

