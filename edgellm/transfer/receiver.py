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

Several streams may fill one request's KV (issue 15):
  pipeline stages   a store holds only its stage's layers [layer_start, layer_end); prefill
                    opens one stream per stage
  tensor parallel   each prefill rank streams its own KV heads; a rank's stream is a head shard
                    (KVChunk.head_shard) whose closing message has no first token. The primary
                    stream (rank 0's: it carries first_token_id) returns only once every
                    layer x token x head is covered, so its ack means "all of it arrived".
Streams of one request may not overlap in heads; any of them failing drops the request.
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
class StreamReceipt:
    """What one stream delivered (a head shard's, whose KV joins its request's entry)."""

    request_id: str
    num_chunks: int
    num_bytes: int
    first_chunk_received_unix_ns: int
    last_chunk_received_unix_ns: int


@dataclass
class _Arriving:
    """One request's KV while its streams arrive: staging tensors [layers, kv_heads, P, D] of
    this store's layers, which (layer, head) rows are complete, and the primary's closing facts."""

    num_prompt: int
    k: torch.Tensor
    v: torch.Tensor
    complete: torch.Tensor  # [layers, kv_heads] bool
    heads_taken: list[tuple[int, int]] = field(default_factory=list)
    num_streams: int = 0
    num_chunks: int = 0
    num_bytes: int = 0
    first_ns: int = 0
    closing: decode_pb2.KVChunk | None = None  # the primary stream's closing message
    done: asyncio.Event = field(default_factory=asyncio.Event)  # complete, or failed
    error: BaseException | None = None
    result: ReceivedKV | None = None


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
        layer_range: tuple[int, int] | None = None,
    ) -> None:
        """layer_range: the layers this store holds (a pipeline stage's); None = all num_layers."""
        self.layer_start, self.layer_end = layer_range or (0, num_layers)
        if not 0 <= self.layer_start < self.layer_end <= num_layers:
            raise ValueError(f"layer_range {layer_range} is not inside {num_layers} layers")
        self._shape = (self.layer_end - self.layer_start, num_kv_heads, head_dim)
        self._dtype = dtype
        self._ttl_s = ttl_s
        self.vocab_size, self.max_context = vocab_size, max_context
        self.max_staged_bytes, self.max_streams = max_staged_bytes, max_streams
        self.shard_wait_s = ttl_s / 2  # how long a primary stream waits for the other ranks' heads
        self._slots: dict[str, _Slot] = {}
        self._arriving: dict[str, _Arriving] = {}
        self.num_streams = 0

    def __len__(self) -> int:
        return sum(1 for s in self._slots.values() if s.result is not None)

    @property
    def num_staged_bytes(self) -> int:
        """Staging bytes held: streams arriving and KV not claimed yet."""
        held = sum(s.result.num_staged_bytes for s in self._slots.values() if s.result is not None)
        return held + sum(2 * a.k.nbytes for a in self._arriving.values())

    def _slot(self, request_id: str) -> _Slot:
        self._expire()
        return self._slots.setdefault(request_id, _Slot())

    def _expire(self) -> None:
        now = time.monotonic()
        for rid in [r for r, s in self._slots.items() if now - s.created > self._ttl_s]:
            del self._slots[rid]

    async def receive(self, chunks: AsyncIterator[decode_pb2.KVChunk]) -> ReceivedKV | StreamReceipt:
        """Consume one PushKV stream; raises codec.ChunkError if it is not complete and intact,
        InvalidKV / KVExists / KVStoreFull if it may not be held here (nothing is allocated then).
        The primary stream returns the request's assembled KV; a head shard its own receipt."""
        if self.num_streams >= self.max_streams:
            metrics.LIMIT_HITS.labels("max_kv_streams").inc()
            raise KVStoreFull(f"{self.num_streams} KV streams are arriving already (max_kv_streams={self.max_streams})")
        self.num_streams += 1
        try:
            return await self._receive(chunks)
        finally:
            self.num_streams -= 1

    def _heads(self, chunk: decode_pb2.KVChunk) -> tuple[int, int]:
        heads = (chunk.head_start, chunk.head_end) if chunk.head_end else (0, self._shape[1])
        if not 0 <= heads[0] < heads[1] <= self._shape[1]:
            raise InvalidKV(f"heads [{heads[0]}, {heads[1]}) must be non-empty and inside {self._shape[1]} KV heads")
        return heads

    def _open(self, chunk: decode_pb2.KVChunk) -> tuple[int, int]:
        """Checks on a stream's first message, before anything is allocated for it: its heads."""
        rid = chunk.request_id
        if not rid or len(rid.encode()) > MAX_REQUEST_ID_BYTES:
            raise InvalidKV(f"request_id must be 1..{MAX_REQUEST_ID_BYTES} bytes")
        bind_request(rid)  # the PushKV handler's log lines (a rejection too) name it
        self._expire()
        heads = self._heads(chunk)
        slot, arriving = self._slots.get(rid), self._arriving.get(rid)
        if slot is not None and slot.result is not None:
            raise KVExists(f"KV for {rid!r} is already here")
        if arriving is not None and any(a < heads[1] and heads[0] < b for a, b in arriving.heads_taken):
            raise KVExists(f"KV heads [{heads[0]}, {heads[1]}) of {rid!r} are already arriving")
        return heads

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

    def _join(self, rid: str, heads: tuple[int, int], num_prompt: int) -> _Arriving:
        """The request's arriving entry (made by its first stream with data), with these heads taken."""
        entry = self._arriving.get(rid)
        if entry is None:
            self._staging_bytes(num_prompt)
            num_layers, num_heads, head_dim = self._shape
            k = torch.empty(num_layers, num_heads, num_prompt, head_dim, dtype=self._dtype)
            entry = self._arriving[rid] = _Arriving(num_prompt, k, torch.empty_like(k),
                                                    torch.zeros(num_layers, num_heads, dtype=torch.bool))
        elif entry.num_prompt != num_prompt:
            raise codec.ChunkError(f"prompt length {num_prompt} disagrees with another stream's {entry.num_prompt}")
        entry.heads_taken.append(heads)
        entry.num_streams += 1
        return entry

    def _fail(self, rid: str, entry: _Arriving, error: BaseException) -> None:
        """One stream failed: the request's KV is dropped whole, and its other streams learn it."""
        if self._arriving.get(rid) is entry:
            del self._arriving[rid]
        if entry.error is None and not entry.done.is_set():
            entry.error = error
            entry.done.set()

    async def _receive(self, chunks: AsyncIterator[decode_pb2.KVChunk]) -> ReceivedKV | StreamReceipt:
        request_id, entry, heads = None, None, (0, 0)
        expected_seq, num_bytes, first_ns = 0, 0, 0
        covered: dict[int, int] = {}  # layer -> tokens of this stream's heads received contiguously from 0
        try:
            async for chunk in chunks:
                now = time.time_ns()
                first_ns = first_ns or now
                if request_id is None:
                    heads = self._open(chunk)
                    request_id = chunk.request_id
                if chunk.request_id != request_id:
                    raise codec.ChunkError(f"chunk for {chunk.request_id!r} inside the stream of {request_id!r}")
                if chunk.seq_no != expected_seq:
                    raise codec.ChunkError(f"chunk {chunk.seq_no} arrived where {expected_seq} was expected")
                expected_seq += 1
                if chunk.is_last:
                    return await self._close(chunk, entry, heads, covered, expected_seq - 1, num_bytes, first_ns, now)
                if self._heads(chunk) != heads:
                    raise codec.ChunkError(f"chunk {chunk.seq_no}: heads disagree with the stream's first chunk")
                if entry is None:
                    entry = self._join(request_id, heads, chunk.num_prompt_tokens)
                num_prompt = entry.num_prompt
                if chunk.num_prompt_tokens != num_prompt:
                    raise codec.ChunkError(f"chunk {chunk.seq_no}: prompt length disagrees with the stream")
                if not (self.layer_start <= chunk.layer_start < chunk.layer_end <= self.layer_end
                        and chunk.token_start < chunk.token_end <= num_prompt):
                    raise InvalidKV(f"chunk {chunk.seq_no}: layers [{chunk.layer_start}, {chunk.layer_end}) x tokens "
                                    f"[{chunk.token_start}, {chunk.token_end}) must be non-empty and inside layers "
                                    f"[{self.layer_start}, {self.layer_end}) x {num_prompt} tokens")
                try:
                    k, v = codec.decode(chunk)
                except (ValueError, RuntimeError) as e:  # a buffer torch cannot view as the declared shape
                    raise codec.ChunkError(f"chunk {chunk.seq_no}: {e}") from None
                if k.shape[1:2] + k.shape[3:] != (heads[1] - heads[0], self._shape[2]):
                    raise codec.ChunkError(f"chunk {chunk.seq_no}: shape disagrees with this model's KV")
                for i, layer in enumerate(range(chunk.layer_start, chunk.layer_end)):
                    if covered.get(layer, 0) != chunk.token_start:
                        raise codec.ChunkError(f"chunk {chunk.seq_no}: layer {layer} tokens out of order")
                    row = layer - self.layer_start
                    entry.k[row, heads[0]:heads[1], chunk.token_start : chunk.token_end] = k[i]
                    entry.v[row, heads[0]:heads[1], chunk.token_start : chunk.token_end] = v[i]
                    covered[layer] = chunk.token_end
                    if chunk.token_end == num_prompt:
                        entry.complete[row, heads[0]:heads[1]] = True
                num_bytes += codec.wire_bytes(chunk)
                entry.num_chunks += 1  # the request's totals, over all its streams
                entry.num_bytes += codec.wire_bytes(chunk)
            raise codec.ChunkError("stream closed without its closing message")
        except BaseException as e:
            if request_id is not None:
                arriving = entry or self._arriving.get(request_id)
                if arriving is not None:  # this stream's failure (or cancellation) drops the whole request
                    self._fail(request_id, arriving, e if isinstance(e, Exception) else codec.ChunkError("cancelled"))
            raise

    async def _close(self, chunk, entry, heads, covered, num_chunks, num_bytes, first_ns, now):
        """A closing message: this stream's heads x layers x tokens covered; the primary's first
        token in the vocabulary. The primary then waits for the other ranks' heads."""
        if chunk.num_chunks != num_chunks:
            raise codec.ChunkError(f"stream ended after {num_chunks} chunks, sender sent {chunk.num_chunks}")
        if entry is None or any(covered.get(layer, 0) != entry.num_prompt
                                for layer in range(self.layer_start, self.layer_end)):
            raise codec.ChunkError("stream ended before every layer's KV arrived")
        entry.first_ns = min(entry.first_ns or first_ns, first_ns)
        if chunk.head_shard:
            self._complete_if_done(chunk.request_id, entry)
            return StreamReceipt(chunk.request_id, num_chunks, num_bytes, first_ns, now)
        if not 0 <= chunk.first_token_id < self.vocab_size:
            raise InvalidKV(f"first_token_id {chunk.first_token_id} is outside the vocabulary [0, {self.vocab_size})")
        entry.closing = chunk
        self._complete_if_done(chunk.request_id, entry)
        try:
            await asyncio.wait_for(entry.done.wait(), self.shard_wait_s)
        except TimeoutError:
            raise codec.ChunkError(f"the other ranks' KV heads did not all arrive within {self.shard_wait_s:g} s") from None
        if entry.error is not None:
            raise codec.ChunkError(f"another stream of this request failed: {entry.error}")
        assert entry.result is not None
        return entry.result

    def _complete_if_done(self, rid: str, entry: _Arriving) -> None:
        """Every head of every layer here arrived and the primary closed: the KV is ready."""
        if entry.closing is None or not bool(entry.complete.all()) or self._arriving.get(rid) is not entry:
            return
        del self._arriving[rid]
        c = entry.closing
        result = ReceivedKV(rid, entry.k, entry.v, entry.num_prompt, c.first_token_id, entry.num_chunks,
                            entry.num_bytes, entry.first_ns, time.time_ns(), c.prompt_digest, 2 * entry.k.nbytes)
        slot = self._slot(rid)
        slot.result = entry.result = result
        slot.ready.set()
        entry.done.set()

    async def claim(self, request_id: str, timeout_s: float) -> ReceivedKV:
        """Wait for a request's KV and take it out of the store."""
        slot = self._slot(request_id)
        try:
            await asyncio.wait_for(slot.ready.wait(), timeout_s)
        finally:
            self._slots.pop(request_id, None)
        assert slot.result is not None
        return slot.result
