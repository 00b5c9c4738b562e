"""One long-lived grpc.aio channel per remote address, shared by all requests of a process.

Every channel of the pool carries the process's cluster credential (and TLS) from `security`,
so whatever a service calls through it passes the other services' doors. A pool may be given
`admit`, which says which addresses a caller-supplied address may be (prefill: only decode
services of the monitor's route table, services/prefill/routes.py); `forget` closes the channels
to addresses that are no longer admitted.
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Collection

import grpc

from edgellm.rpc.security import OPEN, ClusterSecurity
from edgellm.rpc.server import MAX_MESSAGE_BYTES

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Reconnect quickly after a peer restarts: the default backoff grows to minutes.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def liveness_options(ping_after_ms: int, ping_timeout_ms: int) -> list[tuple[str, int]]:
    """Channel options that find a hung or cut-off peer about ping_after_ms + ping_timeout_ms
    after its last message, unless a ping already went out in the second before (see below).

    A stopped process or a dead link never closes its TCP connection, so a stream from it just
    goes quiet. gRPC's keepalive sends an HTTP/2 ping once a connection with calls in flight has
    read nothing for ping_after_ms; the peer's gRPC core answers it on its own threads, so a
    busy engine (a long prefill, a loaded 2-core machine) still answers and only a frozen or
    unreachable one fails. Two defaults stand in the way and are changed: the ping deadline
    (`http2.ping_timeout_ms`, 60 s; keepalive_timeout_ms alone does not shorten it) and BDP
    probing, whose pings count against the same at-most-one-a-second budget and delay the
    keepalive ping by up to a second. Without BDP probing the flow-control window stays at its
    default, plenty for token streams. (A 4 MiB `http2.lookahead_bytes` to make up for it was
    tried: token streams got 8x slower.)

    A client transport sends at most one ping a second, whatever these say, so a ping that went
    out in an ordinary pause can delay the one that matters by up to a second: the gateway
    probes its engine services itself instead (services/gateway/liveness.py). These options
    serve a decode unit's calls to its later stages (parallel/control.py, pipeline.py). Never on
    KV uploads: a ping queues behind whatever the connection already sends, and on a slow link a
    KV upload (prefill -> decode) holds seconds of bytes in socket buffers, which would fail a
    live stream; a KV stream has its own window timeout."""
    if ping_after_ms <= 0:
        return []
    return [
        ("grpc.keepalive_time_ms", ping_after_ms),
        ("grpc.keepalive_timeout_ms", ping_timeout_ms),
        ("grpc.http2.ping_timeout_ms", ping_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 0),  # idle channels stay quiet
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.bdp_probe", 0),
    ]


class ChannelPool:
    def __init__(self, security: ClusterSecurity = OPEN, admit: Callable[[str], Awaitable[bool]] | None = None) -> None:
        self.security = security
        self._options = CHANNEL_OPTIONS
        self._admit = admit
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task] = set()

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self.security.channel(address, options=self._options)
        return channel

    async def admits(self, address: str) -> bool:
        """Whether this process may call `address` when a caller names it (always, without `admit`)."""
        return self._admit is None or await self._admit(address)

    def forget(self, keep: Collection[str]) -> None:
        """Close (in the background, calls in flight get their grace) the channels to every address not in `keep`."""
        for address in [a for a in self._channels if a not in keep]:
            task = asyncio.get_running_loop().create_task(self._channels.pop(address).close(grace=1.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
