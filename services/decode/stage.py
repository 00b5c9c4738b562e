"""`python -m services.decode.stage --decode-stages N --decode-stage K` (K >= 1): one pipeline
stage of a decode unit. It loads the model, keeps its layers (stages.stage_plan: balanced by
weight bytes), sizes its paged cache like stage 0's, warms up, then serves
PipelineStage on config.parallel.stage_addresses(decode_port)[K-1]. Stage 0 (services.decode) is
the unit's face to the gateway and the monitor; start the stages before it."""

from __future__ import annotations

import sys

import structlog
import torch
import uvloop

from edgellm import config as cfg
from edgellm import logs
from edgellm.device import DeviceUnavailable, device_label
from edgellm.engine.weights import DTYPE_NAMES
from edgellm.engine_builder import decode_stage_limits, load_decode_stage
from edgellm.parallel.stages import StageRunner
from edgellm.placement import pin_process
from edgellm.quant.checkpoint import CheckpointError
from edgellm.rpc.security import ClusterSecurity, SecurityError
from edgellm.rpc.server import serve
from edgellm.transfer.receiver import KVStore
from edgellm.v1 import common_pb2, decode_pb2, decode_pb2_grpc, decode_stage_pb2, decode_stage_pb2_grpc
from services.decode.stage_servicer import StageKVServicer, StageServicer


def listen_address(config: cfg.Config) -> str:
    """This stage's port (from its address in stage_addresses) on --host."""
    address = config.parallel.stage_addresses(config.network.decode_port)[config.parallel.decode_stage - 1]
    return f"{config.network.host}:{address.rsplit(':', 1)[1]}"


def stage_kv_store(config: cfg.Config, runner: StageRunner, layers: tuple[int, int]) -> KVStore:
    """This stage's arrival store for prefill's PushKV of its layers (and only those)."""
    a = runner.model.arch
    return KVStore(a.num_layers, a.num_kv_heads, a.head_dim, runner.model.norm.weight.dtype,
                   ttl_s=2 * config.transfer.kv_wait_timeout_s, vocab_size=a.vocab_size,
                   max_context=a.max_position_embeddings, max_staged_bytes=int(config.limits.max_staged_kv_mb * 2**20),
                   max_streams=config.limits.max_kv_streams, layer_range=layers)


async def run(config: cfg.Config) -> None:
    stage = config.parallel.decode_stage
    if stage < 1:
        raise SystemExit("services.decode.stage runs stages 1 .. decode_stages-1 (stage 0 is services.decode)")
    security = ClusterSecurity.for_service(config, "decode")
    loaded, num_threads, ranges = load_decode_stage(config, stage)
    torch.set_num_threads(max(1, num_threads))
    model = loaded.model
    runner = StageRunner(model, decode_stage_limits(config, model, ranges).num_blocks, config.engine.kv_block_size)
    runner.warm_up()
    layers = ranges[stage]
    describe = common_pb2.DecodeStage(layer_start=layers[0], layer_end=layers[1], weight_bytes=model.weight_bytes(),
                                      device=device_label(model.norm.weight.device), healthy=True)
    store = stage_kv_store(config, runner, layers)
    servicer = StageServicer(runner, store, describe, num_threads, claimed_ttl_s=2 * config.transfer.kv_wait_timeout_s)
    structlog.get_logger("decode-stage").info("stage_loaded", stage=stage, layers=list(layers),
                                              weight_bytes=describe.weight_bytes, dtype=DTYPE_NAMES[model.norm.weight.dtype])

    def register(server):
        decode_stage_pb2_grpc.add_PipelineStageServicer_to_server(servicer, server)
        decode_pb2_grpc.add_DecodeServicer_to_server(StageKVServicer(store), server)
        return [decode_stage_pb2.DESCRIPTOR.services_by_name["PipelineStage"].full_name,
                decode_pb2.DESCRIPTOR.services_by_name["Decode"].full_name]

    try:
        await serve(f"decode-stage{stage}", listen_address(config), register, security=security,
                    max_concurrent_rpcs=config.limits.max_concurrent_rpcs)
    finally:
        servicer.close()


def main(argv: list[str] | None = None) -> None:
    config = cfg.parse(argv, prog="python -m services.decode.stage")
    logs.configure(f"decode-stage{config.parallel.decode_stage}", config.log_level)
    pin_process(config.placement.cpus("decode"))
    log = structlog.get_logger("decode-stage")
    try:
        uvloop.run(run(config))
    except (CheckpointError, SecurityError, DeviceUnavailable) as e:  # never served
        log.error("refused_to_start", error=str(e))
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
