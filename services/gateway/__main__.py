"""`python -m services.gateway [options]` (what `edgellm serve gateway` runs)."""

from __future__ import annotations

import asyncio
import sys

import structlog
import uvloop

from edgellm import config as cfg
from edgellm import logs, metrics
from edgellm.placement import pin_process
from edgellm.rpc.channels import ChannelPool
from edgellm.rpc.security import ClusterSecurity, SecurityError, api_key_interceptor, is_loopback, read_api_keys
from edgellm.rpc.server import serve
from edgellm.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway.http import HttpApi
from services.gateway.liveness import LivenessProber
from services.gateway.migration import Migrator
from services.gateway.pipeline import Pipeline
from services.gateway.pools import Pools
from services.gateway.router import Router
from services.gateway.servicer import GatewayServicer
from services.gateway.upstream import Upstream


async def run(config: cfg.Config) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from edgellm.model_store import resolve_model_dir

    # The gateway serves no internal RPC: the cluster credential is only what it presents to the
    # others; its own door is the API keys.
    security = ClusterSecurity.for_service(config, "gateway")
    api_keys = read_api_keys(config.security.api_keys_file)
    if not api_keys and not is_loopback(config.network.host):
        structlog.get_logger("gateway").warning(
            "no_api_keys", host=config.network.host,
            hint="anyone who reaches its gRPC or HTTP port can generate: set --api-keys-file (EDGELLM_API_KEYS_FILE)")
    model_dir = resolve_model_dir(config.model.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    max_context = AutoConfig.from_pretrained(model_dir).max_position_embeddings
    net = config.network
    router = Router()  # no route until the monitor's first table
    channels = ChannelPool(security)
    follow_task: asyncio.Task | None = None
    http_api: HttpApi | None = None

    def register(server):
        nonlocal http_api
        pools = Pools(config.gateway.max_queued_requests, config.gateway.max_inflight_prefills,
                      config.limits.max_decode_streams)
        metrics.gauge("edgellm_prefill_pool_waiting", "Requests waiting in the gateway's prefill pool",
                      lambda: pools.num_prefill_waiting)
        metrics.gauge("edgellm_prefill_pool_inflight", "Requests at prefill services", lambda: pools.num_prefilling)
        metrics.gauge("edgellm_decode_pool_streams", "Requests streaming from decode pools", lambda: pools.num_decoding)
        metrics.gauge("edgellm_route_table_version", "Version of the monitor's route table in force here",
                      lambda: router.table.version)
        metrics.gauge("edgellm_route_mode", "Routing mode in force here (1 normal, 2 degraded, 3 colocated, "
                      "4 no prefill)", lambda: router.mode)
        metrics.serve_metrics(net.gateway_metrics_port, net.host)
        prober = LivenessProber(channels, config.monitor.stream_ping_after_ms, config.monitor.stream_ping_timeout_ms)
        upstream = Upstream(channels, prober, label_ids=config.transfer.kv_fault_injection)
        migrator = Migrator(router, pools, upstream, config.gateway)
        pipeline = Pipeline(tokenizer, max_context, pools, migrator, config.gateway, config.limits)
        gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(pipeline, bool(api_keys)), server)
        if net.gateway_http_port:  # the OpenAI-compatible face of the same pipeline, on this loop
            # JSON escapes (\uXXXX) take up to 6 bytes per prompt byte; the prompt limit itself is checked later
            http_api = HttpApi(pipeline, model_dir.name, api_keys, router.has_route,
                               max_body_bytes=6 * config.limits.max_prompt_bytes + (1 << 20))
        return [gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name]

    async def ready() -> None:
        nonlocal follow_task
        if http_api is not None:
            await http_api.start(net.host, net.gateway_http_port)  # a taken port fails the start
        follow_task = asyncio.create_task(router.follow(channels, net.monitor_address))

    async def on_stop() -> None:
        if http_api is not None:
            await http_api.stop()
        if follow_task is not None:
            follow_task.cancel()

    try:
        # Health follows the routes: SERVING only while the monitor's table has a healthy service.
        await serve("gateway", f"{net.host}:{net.gateway_port}", register, ready=ready, on_stop=on_stop,
                    # the public port: plaintext, API keys (TLS here is internal, between devices)
                    readiness=router.readiness,
                    interceptors=[api_key_interceptor(api_keys)] if api_keys else [],
                    max_concurrent_rpcs=config.limits.max_concurrent_rpcs)
    finally:
        await channels.close()


def main(argv: list[str] | None = None) -> None:
    config = cfg.parse(argv, prog="edgellm serve gateway")
    logs.configure("gateway", config.log_level)
    pin_process(config.placement.cpus("gateway"))
    try:
        uvloop.run(run(config))
    except SecurityError as e:  # a credential or TLS file that cannot be used: never served
        structlog.get_logger("gateway").error("refused_to_start", error=str(e))
        sys.exit(2)
    except OSError as e:  # e.g. --gateway-http-port taken
        structlog.get_logger("gateway").error("refused_to_start", error=str(e))
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
