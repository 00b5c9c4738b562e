"""Start a grpc.aio server with health and reflection, and stop it gracefully on SIGTERM/SIGINT.

Every EdgeLLM service runs through `serve`: it registers the service's servicers, the
standard grpc.health.v1 service and server reflection, so grpcurl and reflection-only
clients work without stubs.

Health, for the "" service and each registered one: NOT_SERVING until `ready` has run; then
SERVING, or, for a service whose readiness comes and goes (the gateway: only while it has a
route), whatever its `readiness` stream says last; NOT_SERVING again first thing on shutdown.
"""

from __future__ import annotations

import asyncio
import signal
from typing import AsyncIterator, Awaitable, Callable, Iterable, Sequence

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from edgellm.rpc.security import OPEN, ClusterSecurity

log = structlog.get_logger(__name__)

SHUTDOWN_GRACE_S = 5.0
# Room for long prompts' token lists; KV chunks stay far below this by construction.
MAX_MESSAGE_BYTES = 16 << 20
SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # a port that is taken must fail loudly, not be shared
    # Peers ping streams that go quiet (channels.liveness_options); never answer that with a
    # GOAWAY for pinging too often, which would cut every call on the connection.
    ("grpc.http2.max_ping_strikes", 0),
    # And this server pings a caller it has read nothing from for a second: a caller cut off
    # (a dead link, a killed gateway whose RST never arrived) no longer leaves its calls running
    # here, an engine generating tokens nobody will read. A live caller's gRPC core answers.
    ("grpc.keepalive_time_ms", 1000),
    ("grpc.keepalive_timeout_ms", 1000),
    ("grpc.http2.ping_timeout_ms", 1000),
]


async def serve(
    name: str,
    address: str,
    register: Callable[[grpc.aio.Server], Iterable[str]],
    ready: Callable[[], Awaitable[None]] | None = None,
    on_stop: Callable[[], Awaitable[None]] | None = None,
    readiness: Callable[[], AsyncIterator[bool]] | None = None,
    security: ClusterSecurity = OPEN,
    interceptors: Sequence[grpc.aio.ServerInterceptor] | None = None,
    max_concurrent_rpcs: int | None = None,
) -> None:
    """Run a server until SIGTERM/SIGINT. `register` adds servicers and returns their full service
    names; `ready` runs once the server listens; `readiness` (optional), started after `ready`,
    yields whether the server can take requests now, each time that changes (True: SERVING);
    `on_stop` runs after health went NOT_SERVING, before the graceful stop.
    `security` gives the listening port its TLS; `interceptors` guard the service's own RPCs (by
    default the cluster credential of `security`: internal services; the gateway passes its API-key
    check). `max_concurrent_rpcs`: more calls at once get RESOURCE_EXHAUSTED."""
    if interceptors is None:
        interceptors = security.server_interceptors()
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=interceptors,
                             maximum_concurrent_rpcs=max_concurrent_rpcs)
    service_names = list(register(server))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    port = security.add_port(server, address)
    if port == 0:
        raise RuntimeError(f"{name}: cannot listen on {address}")
    for svc in ("", *service_names):
        await health_servicer.set(svc, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()
    log.info("listening", service=name, address=address, tls=bool(security.cert),
             authenticated=bool(interceptors))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def set_serving(serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for svc in ("", *service_names):
            await health_servicer.set(svc, status)
        log.info("serving" if serving else "not_serving", service=name, address=address)

    async def follow_readiness() -> None:
        async for serving in readiness():
            await set_serving(serving)

    if ready is not None:
        await ready()
    readiness_task = asyncio.create_task(follow_readiness()) if readiness is not None else None
    if readiness_task is None:
        await set_serving(True)

    await stop.wait()
    log.info("shutting_down", service=name)
    if readiness_task is not None:
        readiness_task.cancel()
    await health_servicer.enter_graceful_shutdown()  # NOT_SERVING first, so routes move away
    if on_stop is not None:
        await on_stop()
    await server.stop(SHUTDOWN_GRACE_S)
    log.info("stopped", service=name)
