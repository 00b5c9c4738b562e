"""The gateway's route table: where prefill and decode work goes right now.

It starts from the configured addresses (all assumed up, NORMAL mode) and then follows
the monitor's WatchRoutes stream. If the monitor is unreachable the last table stays in
force (stream errors still reveal failed services, see servicer.py) and the stream is
re-opened with a short backoff, so a restarted monitor resyncs.

A service the monitor marks down sets its `down_signal`: streams in flight on it are
moved elsewhere at once, which matters for a hung service (SIGSTOP, a cut link) whose
TCP connection stays open and so never produces a stream error.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Callable, Collection

import grpc
import structlog

from edgellm import metrics
from edgellm.rpc.channels import ChannelPool
from edgellm.v1 import monitor_pb2, monitor_pb2_grpc

log = structlog.get_logger(__name__)
RECONNECT_DELAY_S = 0.5


class NoRoute(Exception):
    """No healthy service can take the request."""


@dataclass(frozen=True)
class Route:
    prefill: str | None  # None: no healthy prefill service, the decode service prefills too
    decode: str | None  # None: degraded (or colocated), the prefill service decodes too

    @property
    def is_split(self) -> bool:
        """Prefill here, decode there (NORMAL mode); otherwise one engine runs the whole request."""
        return self.prefill is not None and self.decode is not None


class Router:
    def __init__(self, prefill_addresses: tuple[str, ...], decode_addresses: tuple[str, ...]) -> None:
        self.table = monitor_pb2.RouteTable(
            version=0,
            mode=monitor_pb2.ROUTE_MODE_NORMAL if decode_addresses else monitor_pb2.ROUTE_MODE_COLOCATED,
            prefill_addresses=prefill_addresses,
            decode_addresses=decode_addresses,
        )
        self._counter = itertools.count()
        self._down: dict[str, asyncio.Event] = {}
        self._seen_up: set[str] = set()  # services a monitor table has shown healthy

    @property
    def mode(self) -> int:
        return self.table.mode

    def pick(
        self, choose_decode: Callable[[list[str], monitor_pb2.RouteTable], str], avoid: Collection[str] = ()
    ) -> Route:
        """A prefill service (round robin) and, when the table has one, the decode service
        choose_decode picks; services in `avoid` (failed for this request) are left out."""
        table, n = self.table, next(self._counter)
        prefills = [a for a in table.prefill_addresses if a not in avoid]
        decodes = [a for a in table.decode_addresses if a not in avoid]
        if table.mode in (monitor_pb2.ROUTE_MODE_DEGRADED, monitor_pb2.ROUTE_MODE_COLOCATED):
            decodes = []
        if not prefills and not decodes:
            raise NoRoute("no healthy prefill or decode service")
        prefill = prefills[n % len(prefills)] if prefills else None
        return Route(prefill, choose_decode(decodes, table) if decodes else None)

    def down_signal(self, address: str) -> asyncio.Event:
        """Set when the monitor marks `address` down (a fresh one once it is up again)."""
        return self._down.setdefault(address, asyncio.Event())

    def _apply(self, table: monitor_pb2.RouteTable) -> None:
        if table.version != self.table.version or table.mode != self.table.mode:  # not a load-only update
            log.info("routes_updated", version=table.version, mode=monitor_pb2.RouteMode.Name(table.mode),
                     prefill=list(table.prefill_addresses), decode=list(table.decode_addresses))
        for s in table.services:
            signal = self.down_signal(s.address)
            if not s.healthy and not signal.is_set():
                if s.address in self._seen_up:  # a failure, not a service still starting
                    metrics.FAILURES_DETECTED.labels("monitor").inc()
                signal.set()
            elif s.healthy:
                self._seen_up.add(s.address)
                if signal.is_set():
                    self._down[s.address] = asyncio.Event()
        self.table = table

    async def follow(self, channels: ChannelPool, monitor_address: str) -> None:
        """Run forever: apply every table the monitor publishes."""
        stub = monitor_pb2_grpc.MonitorStub(channels.get(monitor_address))
        while True:
            try:
                async for table in stub.WatchRoutes(monitor_pb2.WatchRoutesRequest(watcher="gateway")):
                    self._apply(table)
            except grpc.aio.AioRpcError as e:
                log.debug("monitor_unreachable", code=e.code().name)
            await asyncio.sleep(RECONNECT_DELAY_S)
