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


class ChannelPool:
    def __init__(self, security: ClusterSecurity = OPEN,
                 admit: Callable[[str], Awaitable[bool]] | None = None) -> None:
        self.security = security
        self._admit = admit
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._closing: set[asyncio.Task] = set()

    def get(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = self._channels[address] = self.security.channel(address, options=CHANNEL_OPTIONS)
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
