"""The gateway's route table: where prefill and decode work goes right now.

Lifecycle: the router starts with no route. It follows the monitor's WatchRoutes stream and
applies every table it publishes; the first one arrives once the monitor has checked every
service, so while the engines still load the gateway has no route (and reports NOT_SERVING,
see `readiness`). A request that finds no route waits for an applied table that has one
(`wait_pick`) instead of failing at once: start-up, or a short gap in a failover. If the
monitor becomes unreachable the last table stays in force (stream errors still reveal
failed services, see migration.py) and the stream is re-opened with a short backoff, so a
restarted monitor resyncs.

A service the monitor marks down sets its `down_signal`: streams in flight on it are
moved elsewhere at once, which matters for a hung service (SIGSTOP, a cut link) whose
TCP connection stays open and so never produces a stream error. A service that comes back
up gets a fresh signal and a new `up_count`, so a request that failed on it may use it again.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Collection

import structlog

from edgellm import metrics
from edgellm.rpc.channels import ChannelPool
from edgellm.rpc.routes import follow_routes
from edgellm.v1 import monitor_pb2

log = structlog.get_logger(__name__)
NO_ROUTE = "no healthy prefill or decode service"


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
    def __init__(self) -> None:
        self.table = monitor_pb2.RouteTable()  # version 0, no service: no route until the monitor's first table
        self._counter = itertools.count()
        self._down: dict[str, asyncio.Event] = {}
        self._seen_up: set[str] = set()  # services a monitor table has shown healthy
        self.up_count: collections.Counter[str] = collections.Counter()  # address -> times it came (back) up
        self._applied = asyncio.Event()  # set (then replaced) by every applied table

    @property
    def mode(self) -> int:
        return self.table.mode

    def _candidates(self, avoid: Collection[str]) -> tuple[list[str], list[str]]:
        table = self.table
        prefills = [a for a in table.prefill_addresses if a not in avoid]
        decodes = [a for a in table.decode_addresses if a not in avoid]
        if table.mode in (monitor_pb2.ROUTE_MODE_DEGRADED, monitor_pb2.ROUTE_MODE_COLOCATED):
            decodes = []
        return prefills, decodes

    def has_route(self, avoid: Collection[str] = ()) -> bool:
        """Whether a request that must avoid `avoid` can be routed now."""
        return any(self._candidates(avoid))

    def has_decode(self, avoid: Collection[str] = ()) -> bool:
        """Whether the table routes to a decode service outside `avoid` (else to prefill services only)."""
        return bool(self._candidates(avoid)[1])

    def pick(
        self, choose_decode: Callable[[list[str], monitor_pb2.RouteTable], str], avoid: Collection[str] = ()
    ) -> Route:
        """A prefill service (round robin) and, when the table has one, the decode service
        choose_decode picks; services in `avoid` (failed for this request) are left out.
        Raises NoRoute when nothing is left."""
        prefills, decodes = self._candidates(avoid)
        if not prefills and not decodes:
            raise NoRoute(NO_ROUTE)
        prefill = prefills[next(self._counter) % len(prefills)] if prefills else None
        return Route(prefill, choose_decode(decodes, self.table) if decodes else None)

    async def wait_pick(
        self,
        choose_decode: Callable[[list[str], monitor_pb2.RouteTable], str],
        avoid: Callable[[], Collection[str]],
        timeout_s: float,
    ) -> Route:
        """pick(), waiting up to timeout_s for an applied table with a route when there is none
        now. `avoid` is asked again after each table (a failed service may have come back).
        Raises NoRoute when the time is up."""
        try:
            async with asyncio.timeout(timeout_s):
                while not self.has_route(avoid()):
                    await self._applied.wait()
        except TimeoutError:
            raise NoRoute(NO_ROUTE) from None
        return self.pick(choose_decode, avoid())

    async def readiness(self) -> AsyncIterator[bool]:
        """has_route() now, then again each time it changes (for the gateway's health)."""
        last: bool | None = None
        while True:
            now = self.has_route()
            if now != last:
                last = now
                yield now
            else:
                await self._applied.wait()

    def down_signal(self, address: str) -> asyncio.Event:
        """Set when the monitor marks `address` down (a fresh one once it is up again)."""
        return self._down.setdefault(address, asyncio.Event())

    def apply(self, table: monitor_pb2.RouteTable) -> None:
        """Make `table` the one in force: set the down signals of services it shows down, and wake
        every request waiting for a route (and the readiness watcher)."""
        if table.version != self.table.version or table.mode != self.table.mode:  # not a load-only update
            log.info("routes_updated", version=table.version, mode=monitor_pb2.RouteMode.Name(table.mode),
                     prefill=list(table.prefill_addresses), decode=list(table.decode_addresses))
        for s in table.services:
            signal = self.down_signal(s.address)
            if not s.healthy and not signal.is_set():
                if s.address in self._seen_up:  # a failure, not a service still starting
                    metrics.FAILURES_DETECTED.labels("monitor").inc()
                signal.set()
            elif s.healthy and (signal.is_set() or s.address not in self._seen_up):
                self._seen_up.add(s.address)
                self.up_count[s.address] += 1
                if signal.is_set():
                    self._down[s.address] = asyncio.Event()
        self.table = table
        applied, self._applied = self._applied, asyncio.Event()
        applied.set()

    async def follow(self, channels: ChannelPool, monitor_address: str) -> None:
        """Run forever: apply every table the monitor publishes."""
        await follow_routes(channels, monitor_address, "gateway", self.apply)
