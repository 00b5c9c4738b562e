"""Each layer's K/V leaves the GPU while the next layer computes.

Layer-wise KV streaming hides the transfer behind the forward pass. On a GPU that only holds
if the device-to-host copy of layer i does not wait for the whole forward pass: each copy
goes on a side stream into pinned host memory (an asynchronous DMA), ordered after layer i's
kernels by a stream dependency, and the next layer's kernels are queued at once. The copies
are handed on (to the KV stream's sender, the prefill service's backup) on the engine thread
as they complete: polled after each layer, and all of them by the end of the forward pass.
"""

from __future__ import annotations

import collections
from typing import Callable

import torch

Deliver = Callable[[int, torch.Tensor, torch.Tensor], None]  # layer, K, V on the host: [T, Hkv, D]


class LayerKVOffload:
    def __init__(self, device: torch.device, deliver: Deliver) -> None:
        self._device = device
        self._stream = torch.cuda.Stream(device)
        self._deliver = deliver
        self._pending: collections.deque = collections.deque()

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Engine thread, right after layer `layer` was queued: start copying its K/V."""
        self._stream.wait_stream(torch.cuda.current_stream(self._device))
        with torch.cuda.stream(self._stream):
            k_host = torch.empty(k.shape, dtype=k.dtype, pin_memory=True)
            v_host = torch.empty(v.shape, dtype=v.dtype, pin_memory=True)
            k_host.copy_(k, non_blocking=True)
            v_host.copy_(v, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        # k and v were made on the compute stream: keep their memory from being reused there
        # before this stream has read it.
        k.record_stream(self._stream)
        v.record_stream(self._stream)
        self._pending.append((done, layer, k_host, v_host))
        self.poll()

    def poll(self) -> None:
        """Hand on every copy that has completed, in layer order."""
        while self._pending and self._pending[0][0].query():
            _, layer, k_host, v_host = self._pending.popleft()
            self._deliver(layer, k_host, v_host)

    def drain(self) -> None:
        """Wait for and hand on every copy still in flight (end of the forward pass)."""
        while self._pending:
            done, layer, k_host, v_host = self._pending.popleft()
            done.synchronize()
            self._deliver(layer, k_host, v_host)


class PerSequenceLayerKV:
    """A packed prefill's layer-KV hook that cuts each layer's K/V ([T, Hkv, D], every sequence's
    tokens packed) per sequence and hands each piece ([Hkv, S, D]) to that sequence's target. On a
    GPU it goes through pinned host copies (LayerKVOffload): drain() after the forward pass."""

    def __init__(self, device: torch.device, targets: list[tuple[Deliver, int, int]]) -> None:
        """targets: (deliver, start, end) of each sequence whose K/V leaves, its packed rows."""
        self._targets = targets
        self._offload = LayerKVOffload(device, self._split) if device.type == "cuda" else None

    def __call__(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        (self._offload or self._split)(layer, k, v)

    def _split(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        for deliver, start, end in self._targets:
            deliver(layer, k[start:end].transpose(0, 1), v[start:end].transpose(0, 1))

    def drain(self) -> None:
        if self._offload is not None:
            self._offload.drain()
