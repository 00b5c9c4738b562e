"""Deliberate damage to a KV stream, so tests can prove a damaged stream is never decoded.

Off unless the prefill service runs with --kv-fault-injection true; then a request whose id
starts with `kv-fault-<kind>-` has its PushKV stream damaged that way at chunk 1: a chunk
dropped, sent twice, swapped with the next, one bit of its K flipped, or the stream ended
there without its closing message. The decode side must reject the stream and the gateway
must send it again (a retry's upstream id carries an attempt suffix and is left alone), so
the client gets the same text and no error.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from edgellm.v1 import decode_pb2

FAULTS = ("drop", "duplicate", "reorder", "corrupt", "cut")
PREFIX = "kv-fault-"


def fault_for(request_id: str) -> str | None:
    # Only a request's first attempt is damaged: the gateway's retry ("<id>/2") must get through.
    if not request_id.startswith(PREFIX) or "/" in request_id:
        return None
    kind = request_id.removeprefix(PREFIX).split("-", 1)[0]
    return kind if kind in FAULTS else None


async def damage(
    chunks: AsyncIterator[decode_pb2.KVChunk], fault: str, at: int = 1
) -> AsyncIterator[decode_pb2.KVChunk]:
    held = None
    index = 0
    async for chunk in chunks:
        if index == at:
            if fault == "cut":
                return
            if fault == "drop":
                index += 1
                continue
            if fault == "reorder":
                held, index = chunk, index + 1
                continue
            if fault == "duplicate":
                yield chunk
            if fault == "corrupt":
                chunk.k = bytes([chunk.k[0] ^ 0x01]) + chunk.k[1:]
        yield chunk
        if held is not None:
            yield held
            held = None
        index += 1
