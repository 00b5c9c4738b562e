"""`python -m services.prefill [options]` (what `edgellm serve prefill` runs)."""

from __future__ import annotations

import asyncio
import sys
import threading

import structlog
import uvloop

from edgellm import config as cfg
from edgellm import logs, metrics
from edgellm.placement import pin_process
from edgellm.device import DeviceUnavailable
from edgellm.engine_builder import build_engine, build_tp_prefill
from edgellm.rpc.channels import ChannelPool
from edgellm.rpc.routes import follow_routes
from edgellm.rpc.security import ClusterSecurity, SecurityError
from edgellm.rpc.server import serve
from edgellm.v1 import prefill_pb2, prefill_pb2_grpc
from services.prefill import tp_worker
from services.prefill.routes import DecodeRoutes
from services.prefill.servicer import PrefillServicer


async def run(config: cfg.Config) -> None:
    security = ClusterSecurity.for_service(config, "prefill")  # before the model loads: a wrong file fails fast
    parallel = config.parallel
    group = tp_heads = None
    if parallel.prefill_tp > 1:  # rank 0 of a tensor-parallel group: starts once every rank has joined
        engine, loaded, group = build_tp_prefill(config)
        a = loaded.model.arch  # rank 0's shard: its KV heads are the first ones
        tp_heads = (0, a.num_kv_heads)
        stop_watch = threading.Event()
        threading.Thread(target=group.supervise, args=(stop_watch,), name="tp-watch", daemon=True).start()
    else:
        engine, loaded = build_engine(config, "prefill")
    # KV goes only to decode services of the monitor's route table (followed on its own channel).
    routes = DecodeRoutes()
    channels = ChannelPool(security, admit=routes.admits)
    monitor_channels = ChannelPool(security)
    follow_task: asyncio.Task | None = None

    def apply_routes(table) -> None:
        if routes.apply(table):
            channels.forget(routes.addresses)
    metrics.engine_gauges(engine)
    metrics.serve_metrics(config.network.prefill_metrics_port, config.network.host)

    servicer = PrefillServicer(engine, channels, config.transfer, stages_of=routes.stages, tp_heads=tp_heads,
                               tensor_parallel=parallel.prefill_tp)
    metrics.gauge("edgellm_kv_backup_bytes", "Prompt KV kept for takeovers", lambda: servicer.backup.num_bytes)
    metrics.gauge("edgellm_kv_backup_hits", "Takeovers that reused a kept prompt KV", lambda: servicer.backup.hits)
    metrics.gauge("edgellm_kv_backup_extensions", "Kept KV extended with a request's streamed tokens",
                  lambda: servicer.backup.extensions)

    def register(server):
        prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, server)
        return [prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name]

    async def ready() -> None:
        nonlocal follow_task
        follow_task = asyncio.create_task(
            follow_routes(monitor_channels, config.network.monitor_address, "prefill", apply_routes))

    async def on_stop() -> None:
        if follow_task is not None:
            follow_task.cancel()
        await channels.close()
        await monitor_channels.close()

    try:
        await serve("prefill", f"{config.network.host}:{config.network.prefill_port}", register, ready=ready,
                    on_stop=on_stop, security=security, max_concurrent_rpcs=config.limits.max_concurrent_rpcs,
                    readiness=None if group is None else group.readiness)
    finally:
        if group is not None:
            stop_watch.set()
        engine.stop()


def main(argv: list[str] | None = None) -> None:
    config = cfg.parse(argv, prog="edgellm serve prefill")
    logs.configure("prefill", config.log_level)
    pin_process(config.placement.cpus("prefill"))
    try:
        uvloop.run(run(config) if config.parallel.prefill_tp_rank == 0 else tp_worker.run(config))
    except SecurityError as e:  # a credential or TLS file that cannot be used: never served
        structlog.get_logger("prefill").error("refused_to_start", error=str(e))
        sys.exit(2)
    except DeviceUnavailable as e:  # --prefill-device names a GPU this machine cannot use: never a silent CPU
        structlog.get_logger("prefill").error("device_unavailable", error=str(e))
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
