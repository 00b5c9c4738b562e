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
from edgellm.engine.loop import EngineLoop
from edgellm.engine_builder import build_engine, load_decode_stage, start_decode_stage0
from edgellm.parallel.control import StageControl
from edgellm.parallel.pipeline import StagePipeline
from edgellm.quant.checkpoint import CheckpointError
from edgellm.rpc.security import ClusterSecurity, SecurityError
from edgellm.rpc.server import serve
from edgellm.transfer.receiver import KVStore
from edgellm.v1 import common_pb2, decode_pb2, decode_pb2_grpc
from services.decode.servicer import DecodeServicer


def own_address(config: cfg.Config) -> str:
    """Where the others reach this decode service: its --decode-addrs entry (matched by port),
    else --host:--decode-port."""
    port = str(config.network.decode_port)
    listed = [a for a in config.network.decode_addresses if a.rsplit(":", 1)[-1] == port]
    return listed[0] if listed else f"{config.network.host}:{port}"


async def start_pipeline(config: cfg.Config, security: ClusterSecurity) -> tuple[EngineLoop, StageControl]:
    """Stage 0 of a pipeline-parallel unit: its layers, a connection to every other stage (waits
    for them), then its engine, whose warm-up runs through them."""
    loaded, num_threads, ranges = load_decode_stage(config, 0)
    parallel = config.parallel
    pipeline = StagePipeline(loaded.model, parallel.stage_addresses(config.network.decode_port),
                             parallel.decode_stage_timeout_s, security, config.monitor.stream_ping_after_ms,
                             config.monitor.stream_ping_timeout_ms)
    stages = StageControl(pipeline, ranges, security,
                          config.monitor.health_interval_s, config.monitor.stream_ping_after_ms,
                          config.monitor.stream_ping_timeout_ms)
    await stages.connect()
    engine = start_decode_stage0(config, loaded, num_threads, ranges, pipeline, pipeline.admit)
    return engine, stages


async def run(config: cfg.Config) -> None:
    security = ClusterSecurity.for_service(config, "decode")  # before the model loads: a wrong file fails fast
    stages: StageControl | None = None
    if config.parallel.decode_stages > 1:
        engine, stages = await start_pipeline(config, security)
    else:
        engine, _ = build_engine(config, "decode")
    # Unclaimed KV (a request whose first token already finished it, or whose gateway went away) expires.
    info = engine.info
    store = KVStore(info.num_layers, info.num_kv_heads, info.head_dim, TORCH_DTYPES[info.dtype],
                    ttl_s=2 * config.transfer.kv_wait_timeout_s, vocab_size=info.vocab_size,
                    max_context=info.max_context, max_staged_bytes=int(config.limits.max_staged_kv_mb * 2**20),
                    max_streams=config.limits.max_kv_streams,
                    layer_range=None if stages is None else stages.layer_ranges[0])  # a stage holds its layers' KV

    metrics.engine_gauges(engine)
    metrics.gauge("edgellm_kv_staged_requests", "Requests whose KV arrived and awaits Decode", lambda: len(store))
    metrics.serve_metrics(config.network.decode_metrics_port, config.network.host)

    own_stage = None
    if stages is not None:
        start, end = stages.layer_ranges[0]
        own_stage = common_pb2.DecodeStage(address=own_address(config),
                                           layer_start=start, layer_end=end, weight_bytes=info.weight_bytes,
                                           device=info.device, healthy=True)

    def register(server):
        servicer = DecodeServicer(engine, store, config.transfer, stages, own_stage)
        decode_pb2_grpc.add_DecodeServicer_to_server(servicer, server)
        return [decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name]

    # A pipeline's unit serves while every stage answers (control.py); one engine always does.
    readiness = None if stages is None else (lambda: stages.readiness(lambda: engine.has_work))
    try:
        await serve("decode", f"{config.network.host}:{config.network.decode_port}", register, security=security,
                    max_concurrent_rpcs=config.limits.max_concurrent_rpcs, readiness=readiness)
    finally:
        engine.stop()
        if stages is not None:
            stages.pipeline.close()
            await stages.close()


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
