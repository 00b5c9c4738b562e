"""Monitor servicer and its health-check loop.

The checker calls grpc.health.v1 Check on every service each interval (concurrently,
each with a deadline) and feeds the Registry. When the table changes, every
WatchRoutes stream gets the new table; a new watcher gets the current one at once.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgellm.config import MonitorConfig
from edgellm.rpc.channels import ChannelPool
from edgellm.v1 import common_pb2, monitor_pb2, monitor_pb2_grpc
from services.monitor.registry import Registry

log = structlog.get_logger(__name__)


class HealthChecker:
    def __init__(self, registry: Registry, channels: ChannelPool, cfg: MonitorConfig) -> None:
        self.registry = registry
        self.channels = channels
        self.cfg = cfg
        self.changed = asyncio.Condition()

    async def _check(self, address: str) -> bool:
        stub = health_pb2_grpc.HealthStub(self.channels.get(address))
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=self.cfg.health_timeout_s)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def run(self) -> None:
        addresses = list(self.registry.services)
        while True:
            results = await asyncio.gather(*(self._check(a) for a in addresses))
            changed = False
            for address, ok in zip(addresses, results):
                if self.registry.record(address, ok):
                    changed = True
                    s = self.registry.services[address]
                    log.warning(
                        "service_up" if s.healthy else "service_down",
                        address=address,
                        role=common_pb2.ServiceRole.Name(s.role),
                    )
            if changed:
                log.info("routes_changed", version=self.registry.version, mode=monitor_pb2.RouteMode.Name(self.registry.mode))
                async with self.changed:
                    self.changed.notify_all()
            await asyncio.sleep(self.cfg.health_interval_s)


class MonitorServicer(monitor_pb2_grpc.MonitorServicer):
    def __init__(self, checker: HealthChecker) -> None:
        self.checker = checker

    async def WatchRoutes(
        self, request: monitor_pb2.WatchRoutesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[monitor_pb2.RouteTable]:
        log.info("watcher_joined", watcher=request.watcher)
        sent = 0
        while True:
            registry = self.checker.registry
            if registry.version != sent:
                sent = registry.version
                yield registry.table()
            async with self.checker.changed:
                if registry.version == sent:
                    await self.checker.changed.wait()

    async def GetStatus(
        self, request: monitor_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> monitor_pb2.RouteTable:
        return self.checker.registry.table()
