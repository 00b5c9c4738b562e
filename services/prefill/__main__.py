"""`python -m services.prefill [options]` (what `edgellm serve prefill` runs)."""

from __future__ import annotations

import sys

import uvloop

from edgellm import config as cfg
from edgellm import logs, metrics
from edgellm.placement import pin_process
from edgellm.engine_builder import build_engine
from edgellm.rpc.channels import ChannelPool
from edgellm.rpc.server import serve
from edgellm.v1 import prefill_pb2, prefill_pb2_grpc
from services.prefill.servicer import PrefillServicer


async def run(config: cfg.Config) -> None:
    engine, loaded = build_engine(config.model, config.engine, config.placement.threads("prefill"), "prefill")
    channels = ChannelPool()
    metrics.engine_gauges(engine)
    metrics.serve_metrics(config.network.prefill_metrics_port, config.network.host)

    servicer = PrefillServicer(engine, channels, config.transfer)
    metrics.gauge("edgellm_kv_backup_bytes", "Prompt KV kept for takeovers", lambda: servicer.backup.num_bytes)
    metrics.gauge("edgellm_kv_backup_hits", "Takeovers that reused a kept prompt KV", lambda: servicer.backup.hits)

    def register(server):
        prefill_pb2_grpc.add_PrefillServicer_to_server(servicer, server)
        return [prefill_pb2.DESCRIPTOR.services_by_name["Prefill"].full_name]

    async def on_stop() -> None:
        await channels.close()

    try:
        await serve("prefill", f"{config.network.host}:{config.network.prefill_port}", register, on_stop=on_stop)
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> None:
    config = cfg.parse(argv, prog="edgellm serve prefill")
    logs.configure("prefill", config.log_level)
    pin_process(config.placement.cpus("prefill"))
    uvloop.run(run(config))


if __name__ == "__main__":
    main(sys.argv[1:])
