"""Prefill side: stream one request's KV to a decode service while the forward pass runs.

The engine thread calls `on_layer_kv(layer, k, v)` as each layer finishes; full layer
groups are handed to the event loop at once, where they are encoded and written to the
client-streaming PushKV call. So chunk i is on the wire while layer i+1 computes.
`finish()` appends the closing message (chunk count, prompt length, first token);
`ack` resolves with the decode service's KVAck.

Backpressure: gRPC's flow control stops taking messages when the decode side (or the link)
is slow. Layer groups waiting for it are bounded by `max_inflight_bytes`: past that the
engine thread waits in `on_layer_kv`, so a slow decode service slows the forward pass down
rather than growing the prefill service's memory. The window opens again as gRPC takes each
group, and for good once the stream ends in any way (ack, error, abort), so a dead decode
service never leaves the engine waiting.

For benchmarks: `link_mbps` paces the stream like a link of that bandwidth (a token bucket,
the portable stand-in for shaping a real interface), and `after_prefill` holds every chunk
until the forward pass is done: the send-after-prefill baseline layer-wise streaming is
measured against.
"""

from __future__ import annotations

import asyncio
import threading
from typing import AsyncIterator

import torch

from edgellm.transfer import codec, faults
from edgellm.v1 import decode_pb2, decode_pb2_grpc

_END = object()


class KVStreamSender:
    def __init__(
        self,
        stub: decode_pb2_grpc.DecodeStub,
        request_id: str,
        num_prompt_tokens: int,
        num_layers: int,
        layers_per_chunk: int,
        max_chunk_bytes: int,
        wire_dtype: torch.dtype | None = None,
        fault: str | None = None,
        link_mbps: float = 0.0,
        after_prefill: bool = False,
        max_inflight_bytes: int = 32 << 20,
        window_timeout_s: float = 30.0,
        prompt_digest: bytes = b"",
        layers: tuple[int, int] | None = None,
        heads: tuple[int, int] | None = None,
        head_shard: bool = False,
    ) -> None:
        """prompt_digest: codec.prompt_digest of the prompt, sent on the closing message.
        layers: the layers [start, end) this stream carries (a decode pipeline stage's; None = all
        num_layers): on_layer_kv takes only those. heads: the KV heads [start, end) its tensors
        hold, as this tensor-parallel rank's share of the model's (None = all); head_shard: this
        stream is a non-primary rank's part (no first token on its closing message)."""
        self.request_id = request_id
        self._prompt_digest = prompt_digest
        self.num_prompt_tokens = num_prompt_tokens
        self.layers = layers or (0, num_layers)
        self._heads = heads or (0, 0)
        self._head_shard = head_shard
        self._layers_per_chunk = layers_per_chunk
        self._max_chunk_bytes = max_chunk_bytes
        self._wire_dtype = wire_dtype  # None: the prefill's own dtype
        self._loop = asyncio.get_running_loop()
        self._groups: asyncio.Queue = asyncio.Queue()
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pending_start = 0
        self.num_chunks = 0
        self.num_bytes_sent = 0  # wire bytes of the chunks handed to gRPC: our own count, never the receiver's
        self._link_bytes_per_s = link_mbps * 1e6 / 8
        self._link_free_at = 0.0
        self._after_prefill = after_prefill
        self._held: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor]], int]] = []
        self._window = threading.Condition()
        self._max_inflight_bytes = max_inflight_bytes
        self.inflight_bytes = 0
        self.max_seen_inflight_bytes = 0
        self._stream_over = False
        self._window_timeout_s = window_timeout_s
        self.gave_up = False  # the window stayed full for window_timeout_s: the stream was cancelled
        # Opening the call now means the stream is set up before the first layer is done.
        messages = self._messages() if fault is None else faults.damage(self._messages(), fault)
        # No gRPC deadline: the forward pass may be long; the caller bounds the wait for `ack`.
        self._call = stub.PushKV(messages)
        self.ack: asyncio.Task[decode_pb2.KVAck] = asyncio.ensure_future(self._call)
        self.ack.add_done_callback(lambda _: self._close_window())

    def on_layer_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Engine thread: k, v [kv_heads, S, D] of `layer` (one of this stream's layers) are final."""
        if not self._pending:
            self._pending_start = layer
        self._pending.append((k, v))
        if len(self._pending) == self._layers_per_chunk or layer == self.layers[1] - 1:
            group, start = self._pending, self._pending_start
            self._pending = []
            if self._after_prefill:  # the baseline holds everything until the end by design (no window)
                self._held.append((start, group, 0))
            else:
                reserved = sum(k.nbytes + v.nbytes for k, v in group)
                self._reserve(reserved)
                self._loop.call_soon_threadsafe(self._groups.put_nowait, (start, group, reserved))

    def _reserve(self, num_bytes: int) -> None:
        """Engine thread: wait until the window has room (a group larger than the window goes alone).
        A decode side that takes nothing for window_timeout_s (hung, link cut, no monitor to notice)
        loses the stream: the forward pass, and every request batched with this one, goes on."""
        with self._window:
            while (self.inflight_bytes and self.inflight_bytes + num_bytes > self._max_inflight_bytes
                   and not self._stream_over):
                if not self._window.wait(timeout=self._window_timeout_s):
                    self.gave_up = self._stream_over = True
                    self._loop.call_soon_threadsafe(self._call.cancel)
            self.inflight_bytes += num_bytes
            self.max_seen_inflight_bytes = max(self.max_seen_inflight_bytes, self.inflight_bytes)

    def _release(self, num_bytes: int) -> None:
        with self._window:
            self.inflight_bytes -= num_bytes
            self._window.notify_all()

    def _close_window(self) -> None:
        with self._window:
            self._stream_over = True
            self._window.notify_all()

    def finish(self, first_token_id: int) -> None:
        for item in self._held:  # the send-after-prefill baseline: everything goes now
            self._groups.put_nowait(item)
        self._held = []
        self._groups.put_nowait((_END, first_token_id))

    async def _pace(self, num_bytes: int) -> None:
        """Wait as long as a link of link_mbps would take to carry num_bytes after what it carries already."""
        if not self._link_bytes_per_s:
            return
        now = self._loop.time()
        self._link_free_at = max(now, self._link_free_at) + num_bytes / self._link_bytes_per_s
        await asyncio.sleep(self._link_free_at - now)

    def abort(self) -> None:
        self._call.cancel()
        self._close_window()

    async def _messages(self) -> AsyncIterator[decode_pb2.KVChunk]:
        while True:
            item = await self._groups.get()
            if item[0] is _END:
                yield decode_pb2.KVChunk(
                    request_id=self.request_id,
                    seq_no=self.num_chunks,
                    is_last=True,
                    num_chunks=self.num_chunks,
                    num_prompt_tokens=self.num_prompt_tokens,
                    first_token_id=0 if self._head_shard else item[1],
                    prompt_digest=self._prompt_digest,
                    head_shard=self._head_shard,
                )
                return
            start, group, reserved = item
            k = torch.stack([k for k, _ in group])  # [layers, kv_heads, S, D]
            v = torch.stack([v for _, v in group])
            chunks = codec.encode(self.request_id, start, k, v, self._max_chunk_bytes, self.num_chunks, self._wire_dtype)
            for chunk in chunks:
                chunk.num_prompt_tokens = self.num_prompt_tokens
                chunk.head_start, chunk.head_end = self._heads
                self.num_chunks += 1
                num_bytes = codec.wire_bytes(chunk)
                await self._pace(num_bytes)
                self.num_bytes_sent += num_bytes
                yield chunk
            # gRPC asks for the next message once it has taken this group's last chunk
            if reserved:
                self._release(reserved)
