"""Following the monitor's route table: `follow_routes` applies every table WatchRoutes publishes.

Shared by the gateway (where to send requests) and the prefill service (which decode services
it may send KV to). If the monitor is unreachable the last applied table stays in force and the
stream is re-opened every RECONNECT_DELAY_S, so a restarted monitor resyncs.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import grpc
import structlog

from edgellm.rpc.channels import ChannelPool
from edgellm.v1 import monitor_pb2, monitor_pb2_grpc

log = structlog.get_logger(__name__)
RECONNECT_DELAY_S = 0.5


async def follow_routes(channels: ChannelPool, monitor_address: str, watcher: str,
                        apply: Callable[[monitor_pb2.RouteTable], None]) -> None:
    """Run forever: apply every table the monitor at `monitor_address` publishes."""
    stub = monitor_pb2_grpc.MonitorStub(channels.get(monitor_address))
    while True:
        try:
            async for table in stub.WatchRoutes(monitor_pb2.WatchRoutesRequest(watcher=watcher)):
                apply(table)
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                log.warning("monitor_refused", code=e.code().name, details=e.details())  # a wrong credential
            else:
                log.debug("monitor_unreachable", code=e.code().name)
        await asyncio.sleep(RECONNECT_DELAY_S)
