"""Monitor servicer and its health-check loop.

The checker calls grpc.health.v1 Check on every service each interval (one loop per
service, each check with a deadline, so a hung service costs only its own checks) and
feeds the Registry. A hung service (SIGSTOP, a cut link) fails on the deadline, a dead one
at once; with the defaults either is marked down within about 1 s. When the table changes,
every WatchRoutes stream gets the new table; a new watcher gets the current one at once,
once every service has been checked.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgellm import metrics
from edgellm.config import MonitorConfig
from edgellm.rpc.channels import ChannelPool
from edgellm.v1 import common_pb2, decode_pb2_grpc, monitor_pb2, monitor_pb2_grpc, prefill_pb2_grpc
from services.monitor.registry import Registry

log = structlog.get_logger(__name__)

# Engine services report their load on each heartbeat.
LOAD_RPCS = {
    common_pb2.SERVICE_ROLE_PREFILL: lambda channel: prefill_pb2_grpc.PrefillStub(channel).GetLoad,
    common_pb2.SERVICE_ROLE_DECODE: lambda channel: decode_pb2_grpc.DecodeStub(channel).GetLoad,
}


class HealthChecker:
    def __init__(self, registry: Registry, channels: ChannelPool, cfg: MonitorConfig) -> None:
        self.registry = registry
        self.channels = channels
        self.cfg = cfg
        self.changed = asyncio.Condition()
        self.generation = 0  # bumped on every check: a watcher busy sending a table misses no change
        self.ready = asyncio.Event()  # every service checked once
        self._first_check = {address: asyncio.Event() for address in registry.services}

    async def _check(self, address: str) -> bool:
        """One heartbeat: grpc.health.v1 Check, then (engines) the load report."""
        channel = self.channels.get(address)
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=self.cfg.health_timeout_s
            )
            if reply.status != health_pb2.HealthCheckResponse.SERVING:
                return False
            service = self.registry.services[address]
            get_load = LOAD_RPCS.get(service.role)
            if get_load is not None:
                service.load = await get_load(channel)(common_pb2.GetLoadRequest(), timeout=self.cfg.health_timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return True

    async def run(self) -> None:
        """One check loop per service: a hung service's slow checks never delay the others'."""
        loops = [asyncio.create_task(self._watch(address)) for address in self.registry.services]
        # A (re)started monitor publishes nothing before it has checked every service once:
        # an empty first table would send the gateway into a mode with no route at all.
        await asyncio.gather(*(self._first_check[a].wait() for a in self.registry.services))
        self.ready.set()
        await asyncio.gather(*loops)

    async def _watch(self, address: str) -> None:
        while True:
            ok = await self._check(address)
            if self.registry.record(address, ok):
                s = self.registry.services[address]
                log.warning("service_up" if s.healthy else "service_down", address=address,
                            role=common_pb2.ServiceRole.Name(s.role))
                log.info("routes_changed", version=self.registry.version,
                         mode=monitor_pb2.RouteMode.Name(self.registry.mode))
            self._first_check[address].set()
            async with self.changed:  # watchers get health changes and fresh loads
                self.generation += 1
                self.changed.notify_all()
            await asyncio.sleep(self.cfg.health_interval_s)


class MonitorServicer(monitor_pb2_grpc.MonitorServicer):
    def __init__(self, checker: HealthChecker, max_watchers: int = 64) -> None:
        """max_watchers: WatchRoutes streams at once (--max-route-watchers); more get RESOURCE_EXHAUSTED."""
        self.checker = checker
        self.max_watchers = max_watchers
        self.num_watchers = 0

    async def WatchRoutes(
        self, request: monitor_pb2.WatchRoutesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[monitor_pb2.RouteTable]:
        if self.num_watchers >= self.max_watchers:
            metrics.LIMIT_HITS.labels("max_route_watchers").inc()
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"{self.num_watchers} route watchers already (max_route_watchers={self.max_watchers})")
        self.num_watchers += 1
        try:
            log.info("watcher_joined", watcher=request.watcher[:128])
            await self.checker.ready.wait()
            checker, sent = self.checker, -1
            while True:
                async with checker.changed:
                    await checker.changed.wait_for(lambda: checker.generation != sent)
                    sent = checker.generation
                yield checker.registry.table()
        finally:
            self.num_watchers -= 1

    async def GetStatus(
        self, request: monitor_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.RouteTable:
        return self.checker.registry.table()
