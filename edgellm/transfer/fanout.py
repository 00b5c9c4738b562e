"""One request's KV from one prefill rank to a whole decode unit: one KVStreamSender per
pipeline stage, each carrying the layers that stage owns (issue 15). A decode unit without
stages is one stage owning every layer, so this is also the plain one-stream case.

The engine thread calls on_layer_kv(layer, k, v) as each layer finishes; the layer goes to
its stage's stream. `ack` resolves once every stage acknowledged: on a tensor-parallel prefill
the primary rank's acks also mean the other ranks' heads arrived (receiver.py).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Callable

import torch

from edgellm.transfer.sender import KVStreamSender
from edgellm.v1 import decode_pb2, decode_pb2_grpc


@dataclass(frozen=True)
class StageTarget:
    """Where one range of a decode unit's layers goes."""

    address: str
    layer_start: int
    layer_end: int


def unit_targets(address: str, stages, num_layers: int) -> tuple[StageTarget, ...]:
    """The targets of the decode unit at `address`: its advertised stages (Load.stages), or the
    address itself owning every layer."""
    if not stages:
        return (StageTarget(address, 0, num_layers),)
    targets = tuple(StageTarget(s.address, s.layer_start, s.layer_end) for s in stages)
    bounds = [0] + [t.layer_end for t in targets]
    if [t.layer_start for t in targets] != bounds[:-1] or bounds[-1] != num_layers:
        raise ValueError(f"the stages of {address} do not cover layers 0..{num_layers} in order: {targets}")
    return targets


class KVFanout:
    def __init__(self, targets: tuple[StageTarget, ...], stub_for: Callable[[str], decode_pb2_grpc.DecodeStub],
                 request_id: str, num_prompt_tokens: int, num_layers: int, **sender_options) -> None:
        """sender_options: KVStreamSender's keyword arguments (chunking, window, heads, ...)."""
        self.targets = targets
        self.senders = [
            KVStreamSender(stub_for(t.address), request_id, num_prompt_tokens, num_layers,
                           layers=(t.layer_start, t.layer_end), **sender_options)
            for t in targets
        ]
        self._by_layer = [s for s in self.senders for _ in range(*s.layers)]
        self.ack: asyncio.Future[decode_pb2.KVAck] = asyncio.ensure_future(self._ack_all())

    def on_layer_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Engine thread: k, v [kv_heads, S, D] of `layer` are final."""
        self._by_layer[layer].on_layer_kv(layer, k, v)

    def finish(self, first_token_id: int) -> None:
        for sender in self.senders:
            sender.finish(first_token_id)

    def abort(self) -> None:
        for sender in self.senders:
            sender.abort()

    @property
    def gave_up(self) -> bool:
        return any(s.gave_up for s in self.senders)

    @property
    def num_bytes_sent(self) -> int:
        return sum(s.num_bytes_sent for s in self.senders)

    def failed_address(self, error: BaseException) -> str:
        """The stage whose stream ended with `error` (the first target when none can be told)."""
        for target, sender in zip(self.targets, self.senders):
            if sender.ack.done() and not sender.ack.cancelled() and sender.ack.exception() is error:
                return target.address
        return self.targets[0].address

    async def _ack_all(self) -> decode_pb2.KVAck:
        """Every stage's ack folded into one: chunks and bytes summed, first to last arrival.
        The first stream that fails fails this (and the others are cancelled)."""
        try:
            acks = await asyncio.gather(*(s.ack for s in self.senders))
        except BaseException:
            self.abort()
            raise
        return decode_pb2.KVAck(
            request_id=acks[0].request_id,
            num_chunks=sum(a.num_chunks for a in acks),
            num_bytes=sum(a.num_bytes for a in acks),
            first_chunk_received_unix_ns=min(a.first_chunk_received_unix_ns for a in acks),
            last_chunk_received_unix_ns=max(a.last_chunk_received_unix_ns for a in acks),
        )
