"""The Load message an engine service reports on each monitor heartbeat."""

from __future__ import annotations

from edgellm.engine.loop import EngineLoop
from edgellm.v1 import common_pb2


def engine_load(engine: EngineLoop) -> common_pb2.Load:
    info, stats = engine.info, engine.stats()
    return common_pb2.Load(
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        num_free_kv_blocks=stats.num_free_kv_blocks,
        num_kv_blocks=info.num_kv_blocks,
        kv_block_size=info.kv_block_size,
        max_running=info.max_running,
        dtype=info.dtype,
        weights=info.weights_label,
        weight_bytes=info.weight_bytes,
        num_threads=info.num_threads,
        device=info.device,
    )
