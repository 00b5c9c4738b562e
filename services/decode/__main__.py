"""`python -m services.decode [options]` (what `edgellm serve decode` runs)."""

from __future__ import annotations

import sys

import structlog
import uvloop

from edgellm import config as cfg
from edgellm import logs, metrics
from edgellm.placement import pin_process
from edgellm.engine.weights import TORCH_DTYPES
from edgellm.device import DeviceUnavailable
from edgellm.engine_builder import build_engine
from edgellm.quant.checkpoint import CheckpointError
from edgellm.rpc.security import ClusterSecurity, SecurityError
from edgellm.rpc.server import serve
from edgellm.transfer.receiver import KVStore
from edgellm.v1 import decode_pb2, decode_pb2_grpc
from services.decode.servicer import DecodeServicer


async def run(config: cfg.Config) -> None:
    security = ClusterSecurity.for_service(config, "decode")  # before the model loads: a wrong file fails fast
    engine, loaded = build_engine(config, "decode")
    # Unclaimed KV (a request whose first token already finished it, or whose gateway went away) expires.
    info = engine.info
    store = KVStore(info.num_layers, info.num_kv_heads, info.head_dim, TORCH_DTYPES[info.dtype],
                    ttl_s=2 * config.transfer.kv_wait_timeout_s, vocab_size=info.vocab_size,
                    max_context=info.max_context, max_staged_bytes=int(config.limits.max_staged_kv_mb * 2**20),
                    max_streams=config.limits.max_kv_streams)

    metrics.engine_gauges(engine)
    metrics.gauge("edgellm_kv_staged_requests", "Requests whose KV arrived and awaits Decode", lambda: len(store))
    metrics.serve_metrics(config.network.decode_metrics_port, config.network.host)

    def register(server):
        servicer = DecodeServicer(engine, store, config.transfer)
        decode_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
        return [decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name]

    try:
        await serve("decode", f"{config.network.host}:{config.network.decode_port}", register, security=security,
                    max_concurrent_rpcs=config.limits.max_concurrent_rpcs)
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> None:
    config = cfg.parse(argv, prog="edgellm serve decode")
    logs.configure("decode", config.log_level)
    pin_process(config.placement.cpus("decode"))
    try:
        uvloop.run(run(config))
    except CheckpointError as e:  # corrupt, or made for another model or settings: never served
        structlog.get_logger("decode").error("int4_checkpoint_rejected", error=str(e))
        sys.exit(2)
    except SecurityError as e:  # a credential or TLS file that cannot be used: never served
        structlog.get_logger("decode").error("refused_to_start", error=str(e))
        sys.exit(2)
    except DeviceUnavailable as e:  # --decode-device names a GPU this machine cannot use: never a silent CPU
        structlog.get_logger("decode").error("device_unavailable", error=str(e))
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
