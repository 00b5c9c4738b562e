"""Decode side: assemble streamed KV chunks into a sequence's cache, then hand it to Decode.

Lifecycle of one request here:
  PushKV stream opens (at most max_streams at once, else KVStoreFull) -> the first chunk's
  request id must be new here (else KVExists) and its declared prompt length inside the
  model's context and the staging budget (else InvalidKV / KVStoreFull), before any buffer
  is sized from it -> chunks verified (ranges, checksum, order) and written into staging
  tensors [layers, kv_heads, prompt_tokens, head_dim] -> closing message checks that every
  layer x token was covered and that first_token_id is in the vocabulary -> entry becomes
  ready -> Decode(request_id) takes it (or it expires after a TTL) and hands it to the
  engine, which copies it into KV blocks when the sequence joins the decode batch. Staging
  keeps the transfer independent of block supply; its bytes (arriving and unclaimed) stay
  under max_staged_bytes.
A request whose stream fails any check is dropped whole: it is never decoded from wrong KV.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import torch

from edgellm import metrics
from edgellm.logs import bind_request
from edgellm.transfer import codec
from edgellm.v1 import decode_pb2

MAX_REQUEST_ID_BYTES = 256  # internal ids are made by the gateway (uuid hex + attempt)


class InvalidKV(ValueError):
    """The stream declares something this service cannot hold (sizes, ids): INVALID_ARGUMENT."""


class KVExists(ValueError):
    """KV for this request id is already here or arriving: ALREADY_EXISTS."""


class KVStoreFull(RuntimeError):
    """Too many streams at once, or staging is full: RESOURCE_EXHAUSTED (try another decode service)."""


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
    prompt_digest: bytes = b""  # codec.prompt_digest of the prompt the KV was computed from
    num_staged_bytes: int = 0  # the staging tensors' bytes


@dataclass
class _Slot:
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    result: ReceivedKV | None = None
    created: float = field(default_factory=time.monotonic)


class KVStore:
    """Received prompt KV by request id, waiting to be claimed by a Decode call."""

    def __init__(
        self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, ttl_s: float, *,
        vocab_size: int, max_context: int, max_staged_bytes: int = 512 << 20, max_streams: int = 64,
    ) -> None:
        self._shape = (num_layers, num_kv_heads, head_dim)
        self._dtype = dtype
        self._ttl_s = ttl_s
        self.vocab_size, self.max_context = vocab_size, max_context
        self.max_staged_bytes, self.max_streams = max_staged_bytes, max_streams
        self._slots: dict[str, _Slot] = {}
        self._receiving: dict[str, int] = {}  # request id -> staging bytes of a stream still arriving
        self.num_streams = 0

    def __len__(self) -> int:
        return sum(1 for s in self._slots.values() if s.result is not None)

    @property
    def num_staged_bytes(self) -> int:
        """Staging bytes held: streams arriving and KV not claimed yet."""
        held = sum(s.result.num_staged_bytes for s in self._slots.values() if s.result is not None)
        return held + sum(self._receiving.values())

    def _slot(self, request_id: str) -> _Slot:
        self._expire()
        return self._slots.setdefault(request_id, _Slot())

    def _expire(self) -> None:
        now = time.monotonic()
        for rid in [r for r, s in self._slots.items() if now - s.created > self._ttl_s]:
            del self._slots[rid]

    async def receive(self, chunks: AsyncIterator[decode_pb2.KVChunk]) -> ReceivedKV:
        """Consume one PushKV stream; raises codec.ChunkError if it is not complete and intact,
        InvalidKV / KVExists / KVStoreFull if it may not be held here (nothing is allocated then)."""
        if self.num_streams >= self.max_streams:
            metrics.LIMIT_HITS.labels("max_kv_streams").inc()
            raise KVStoreFull(f"{self.num_streams} KV streams are arriving already (max_kv_streams={self.max_streams})")
        self.num_streams += 1
        try:
            return await self._receive(chunks)
        finally:
            self.num_streams -= 1

    def _open(self, chunk: decode_pb2.KVChunk) -> None:
        """Checks on a stream's first message, before anything is allocated for it."""
        rid = chunk.request_id
        if not rid or len(rid.encode()) > MAX_REQUEST_ID_BYTES:
            raise InvalidKV(f"request_id must be 1..{MAX_REQUEST_ID_BYTES} bytes")
        bind_request(rid)  # the PushKV handler's log lines (a rejection too) name it
        self._expire()
        slot = self._slots.get(rid)
        if rid in self._receiving or (slot is not None and slot.result is not None):
            raise KVExists(f"KV for {rid!r} is already here")

    def _staging_bytes(self, num_prompt: int) -> int:
        """Bytes of K and V staging tensors for num_prompt tokens, once the length is checked."""
        if not 1 <= num_prompt < self.max_context:
            raise InvalidKV(f"num_prompt_tokens is {num_prompt}; it must be in [1, {self.max_context}) "
                            "(the model's context)")
        num_layers, num_heads, head_dim = self._shape
        num_bytes = 2 * num_layers * num_heads * num_prompt * head_dim * self._dtype.itemsize
        if self.num_staged_bytes + num_bytes > self.max_staged_bytes:
            metrics.LIMIT_HITS.labels("max_staged_kv_mb").inc()
            raise KVStoreFull(f"staged KV would pass max_staged_kv_mb={self.max_staged_bytes / 2**20:g} "
                              f"({self.num_staged_bytes} bytes held, this stream needs {num_bytes})")
        return num_bytes

    async def _receive(self, chunks: AsyncIterator[decode_pb2.KVChunk]) -> ReceivedKV:
        k_all: torch.Tensor | None = None
        v_all: torch.Tensor | None = None
        num_prompt = 0
        request_id = None
        expected_seq = 0
        covered: dict[int, int] = {}  # layer -> tokens received contiguously from 0
        num_bytes, first_ns = 0, 0
        try:
            async for chunk in chunks:
                now = time.time_ns()
                first_ns = first_ns or now
                if request_id is None:
                    self._open(chunk)
                    request_id = chunk.request_id
                    self._receiving[request_id] = 0
                if chunk.request_id != request_id:
                    raise codec.ChunkError(f"chunk for {chunk.request_id!r} inside the stream of {request_id!r}")
                if chunk.seq_no != expected_seq:
                    raise codec.ChunkError(f"chunk {chunk.seq_no} arrived where {expected_seq} was expected")
                expected_seq += 1
                if chunk.is_last:
                    return self._close(chunk, k_all, v_all, num_prompt, covered, expected_seq - 1, num_bytes,
                                       first_ns, now)
                if k_all is None:
                    num_prompt = chunk.num_prompt_tokens
                    self._receiving[request_id] = self._staging_bytes(num_prompt)
                    num_layers, num_heads, head_dim = self._shape
                    k_all = torch.empty(num_layers, num_heads, num_prompt, head_dim, dtype=self._dtype)
                    v_all = torch.empty_like(k_all)
                if chunk.num_prompt_tokens != num_prompt:
                    raise codec.ChunkError(f"chunk {chunk.seq_no}: prompt length disagrees with the stream")
                if not (chunk.layer_start < chunk.layer_end <= self._shape[0]
                        and chunk.token_start < chunk.token_end <= num_prompt):
                    raise InvalidKV(f"chunk {chunk.seq_no}: layers [{chunk.layer_start}, {chunk.layer_end}) x tokens "
                                    f"[{chunk.token_start}, {chunk.token_end}) must be non-empty and inside "
                                    f"{self._shape[0]} layers x {num_prompt} tokens")
                try:
                    k, v = codec.decode(chunk)
                except (ValueError, RuntimeError) as e:  # a buffer torch cannot view as the declared shape
                    raise codec.ChunkError(f"chunk {chunk.seq_no}: {e}") from None
                if k.shape[1:2] + k.shape[3:] != (self._shape[1], self._shape[2]):
                    raise codec.ChunkError(f"chunk {chunk.seq_no}: shape disagrees with this model's KV")
                for i, layer in enumerate(range(chunk.layer_start, chunk.layer_end)):
                    if covered.get(layer, 0) != chunk.token_start:
                        raise codec.ChunkError(f"chunk {chunk.seq_no}: layer {layer} tokens out of order")
                    k_all[layer, :, chunk.token_start : chunk.token_end] = k[i]
                    v_all[layer, :, chunk.token_start : chunk.token_end] = v[i]
                    covered[layer] = chunk.token_end
                num_bytes += codec.wire_bytes(chunk)
            raise codec.ChunkError("stream closed without its closing message")
        finally:
            if request_id is not None:
                self._receiving.pop(request_id, None)

    def _close(self, chunk, k_all, v_all, num_prompt, covered, num_chunks, num_bytes, first_ns, now) -> ReceivedKV:
        """The closing message: every layer x token covered, a first token in the vocabulary."""
        if chunk.num_chunks != num_chunks:
            raise codec.ChunkError(f"stream ended after {num_chunks} chunks, sender sent {chunk.num_chunks}")
        if k_all is None or any(covered.get(layer, 0) != num_prompt for layer in range(self._shape[0])):
            raise codec.ChunkError("stream ended before every layer's KV arrived")
        if not 0 <= chunk.first_token_id < self.vocab_size:
            raise InvalidKV(f"first_token_id {chunk.first_token_id} is outside the vocabulary [0, {self.vocab_size})")
        result = ReceivedKV(chunk.request_id, k_all, v_all, num_prompt, chunk.first_token_id, num_chunks, num_bytes,
                            first_ns, now, chunk.prompt_digest, 2 * k_all.nbytes)
        slot = self._slot(chunk.request_id)
        slot.result = result
        slot.ready.set()
        return result

    async def claim(self, request_id: str, timeout_s: float) -> ReceivedKV:
        """Wait for a request's KV and take it out of the store."""
        slot = self._slot(request_id)
        try:
            await asyncio.wait_for(slot.ready.wait(), timeout_s)
        finally:
            self._slots.pop(request_id, None)
        assert slot.result is not None
        return slot.result
