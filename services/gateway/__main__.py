"""`python -m services.gateway [options]` (what `edgellm serve gateway` runs)."""

from __future__ import annotations

import asyncio
import sys

import uvloop

from edgellm import config as cfg
from edgellm import logs, metrics
from edgellm.placement import pin_process
from edgellm.rpc.channels import ChannelPool
from edgellm.rpc.server import serve
from edgellm.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.migration import Migrator
from services.gateway.pipeline import Pipeline
from services.gateway.pools import Pools
from services.gateway.router import Router
from services.gateway.servicer import GatewayServicer
from services.gateway.upstream import Upstream


async def run(config: cfg.Config) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from edgellm.model_store import resolve_model_dir

    model_dir = resolve_model_dir(config.model.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_context = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    net = config.network
    router = Router()  # no route until the monitor's first table
    channels = ChannelPool()
    follow_task: asyncio.Task | None = None

    def register(server):
        pools = Pools(config.gateway.max_queued_requests, config.gateway.max_inflight_prefills)
        metrics.gauge("edgellm_prefill_pool_waiting", "Requests waiting in the gateway's prefill pool",
                      lambda: pools.num_prefill_waiting)
        metrics.gauge("edgellm_prefill_pool_inflight", "Requests at prefill services", lambda: pools.num_prefilling)
        metrics.gauge("edgellm_decode_pool_streams", "Requests streaming from decode pools", lambda: pools.num_decoding)
        metrics.gauge("edgellm_route_table_version", "Version of the monitor's route table in force here",
                      lambda: router.table.version)
        metrics.gauge("edgellm_route_mode", "Routing mode in force here (1 normal, 2 degraded, 3 colocated, "
                      "4 no prefill)", lambda: router.mode)
        metrics.serve_metrics(net.gateway_metrics_port, net.host)
        migrator = Migrator(router, pools, Upstream(channels), config.gateway)
        pipeline = Pipeline(tokenizer, max_context, pools, migrator, config.gateway)
        gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(pipeline), server)
        return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

    async def ready() -> None:
        nonlocal follow_task
        follow_task = asyncio.create_task(router.follow(channels, net.monitor_address))

    async def on_stop() -> None:
        if follow_task is not None:
            follow_task.cancel()

    try:
        # Health follows the routes: SERVING only while the monitor's table has a healthy service.
        await serve("gateway", f"{net.host}:{net.gateway_port}", register, ready=ready, on_stop=on_stop,
                    readiness=router.readiness)
    finally:
        await channels.close()


def main(argv: list[str] | None = None) -> None:
    config = cfg.parse(argv, prog="edgellm serve gateway")
    logs.configure("gateway", config.log_level)
    pin_process(config.placement.cpus("gateway"))
    uvloop.run(run(config))


if __name__ == "__main__":
    main(sys.argv[1:])
