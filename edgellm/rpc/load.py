"""The Load message an engine service reports on each monitor heartbeat."""

from __future__ import annotations

from edgellm.engine.loop import EngineLoop
from edgellm.engine.weights import DTYPE_NAMES
from edgellm.v1 import common_pb2


def engine_load(engine: EngineLoop) -> common_pb2.Load:
    return common_pb2.Load(
        num_running=engine.num_running,
        num_waiting=engine.num_waiting,
        num_free_kv_blocks=engine.blocks.num_free_blocks,
        num_kv_blocks=engine.blocks.num_blocks,
        kv_block_size=engine.blocks.block_size,
        max_running=engine.limits.max_running,
        dtype=DTYPE_NAMES[engine.cache.k[0].dtype],
        weights=engine.weights_label,
        weight_bytes=engine.weight_bytes,
    )
