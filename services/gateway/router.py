"""The gateway's route table: where prefill and decode work goes right now.

It starts from the configured addresses (all assumed up, NORMAL mode) and then follows
the monitor's WatchRoutes stream. If the monitor is unreachable the last table stays in
force and the stream is re-opened with a short backoff, so a monitor restart resyncs.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Callable

import grpc
import structlog

from edgellm.rpc.channels import ChannelPool
from edgellm.v1 import monitor_pb2, monitor_pb2_grpc

log = structlog.get_logger(__name__)
RECONNECT_DELAY_S = 0.5


class NoRoute(Exception):
    """No healthy service can take the request."""


@dataclass(frozen=True)
class Route:
    prefill: str
    decode: str | None  # None: degraded, the prefill service decodes too


class Router:
    def __init__(self, prefill_addresses: tuple[str, ...], decode_addresses: tuple[str, ...]) -> None:
        self.table = monitor_pb2.RouteTable(
            version=0,
            mode=monitor_pb2.ROUTE_MODE_NORMAL if decode_addresses else monitor_pb2.ROUTE_MODE_COLOCATED,
            prefill_addresses=prefill_addresses,
            decode_addresses=decode_addresses,
        )
        self._counter = itertools.count()

    @property
    def is_degraded(self) -> bool:
        return self.table.mode == monitor_pb2.ROUTE_MODE_DEGRADED

    def pick(self, choose_decode: Callable[[monitor_pb2.RouteTable], str | None]) -> Route:
        """A prefill service (round robin) and, in NORMAL mode, the decode service choose_decode picks."""
        table, n = self.table, next(self._counter)
        if not table.prefill_addresses:
            raise NoRoute("no healthy prefill service")
        prefill = table.prefill_addresses[n % len(table.prefill_addresses)]
        if table.mode != monitor_pb2.ROUTE_MODE_NORMAL:
            return Route(prefill, None)
        return Route(prefill, choose_decode(table))

    async def follow(self, channels: ChannelPool, monitor_address: str) -> None:
        """Run forever: apply every table the monitor publishes."""
        stub = monitor_pb2_grpc.MonitorStub(channels.get(monitor_address))
        while True:
            try:
                async for table in stub.WatchRoutes(monitor_pb2.WatchRoutesRequest(watcher="gateway")):
                    if table.version != self.table.version or table.mode != self.table.mode:  # not load-only
                        log.info(
                            "routes_updated",
                            version=table.version,
                            mode=monitor_pb2.RouteMode.Name(table.mode),
                            prefill=list(table.prefill_addresses),
                            decode=list(table.decode_addresses),
                        )
                    self.table = table
            except grpc.aio.AioRpcError as e:
                log.debug("monitor_unreachable", code=e.code().name)
            await asyncio.sleep(RECONNECT_DELAY_S)
