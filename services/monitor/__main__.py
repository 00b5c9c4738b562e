"""`python -m services.monitor [options]` (what `edgellm serve monitor` runs)."""

from __future__ import annotations

import asyncio
import sys

import structlog
import uvloop

from edgellm import config as cfg
from edgellm import logs, metrics
from edgellm.placement import pin_process
from edgellm.rpc.channels import ChannelPool
from edgellm.rpc.security import ClusterSecurity, SecurityError
from edgellm.rpc.server import serve
from edgellm.v1 import common_pb2, monitor_pb2, monitor_pb2_grpc
from services.monitor.registry import Registry
from services.monitor.servicer import HealthChecker, MonitorServicer


async def run(config: cfg.Config) -> None:
    net = config.network
    security = ClusterSecurity.for_service(config, "monitor")
    services = [(a, common_pb2.SERVICE_ROLE_PREFILL) for a in net.prefill_addresses]
    services += [(a, common_pb2.SERVICE_ROLE_DECODE) for a in net.decode_addresses]
    registry = Registry(services, config.monitor.down_after, config.monitor.up_after)
    channels = ChannelPool(security)
    checker = HealthChecker(registry, channels, config.monitor)
    check_task: asyncio.Task | None = None
    metrics.gauge("edgellm_route_mode", "Routing mode (1 normal, 2 degraded, 3 colocated, 4 no prefill)", lambda: registry.mode)
    metrics.gauge("edgellm_healthy_services", "Services the monitor sees healthy",
                  lambda: sum(s.healthy for s in registry.services.values()))
    metrics.serve_metrics(net.monitor_metrics_port, net.host)

    def register(server):
        servicer = MonitorServicer(checker, config.limits.max_route_watchers)
        monitor_pb2_grpc.add_MonitorServicer_to_server(servicer, server)
        return [monitor_pb2.DESCRIPTOR.services_by_name["Monitor"].full_name]

    async def ready() -> None:
        nonlocal check_task
        check_task = asyncio.create_task(checker.run())

    async def on_stop() -> None:
        if check_task is not None:
            check_task.cancel()
        await channels.close()

    await serve("monitor", f"{net.host}:{net.monitor_port}", register, ready=ready, on_stop=on_stop,
                security=security, max_concurrent_rpcs=config.limits.max_concurrent_rpcs)


def main(argv: list[str] | None = None) -> None:
    config = cfg.parse(argv, prog="edgellm serve monitor")
    logs.configure("monitor", config.log_level)
    pin_process(config.placement.cpus("monitor"))
    try:
        uvloop.run(run(config))
    except SecurityError as e:  # a credential or TLS file that cannot be used: never served
        structlog.get_logger("monitor").error("refused_to_start", error=str(e))
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
