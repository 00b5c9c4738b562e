"""Build a ready EngineLoop from the model section of the config (shared by prefill and decode)."""

from __future__ import annotations

import os

import torch

from edgellm.config import EngineConfig, ModelConfig
from edgellm.engine.kv_cache import PagedKVCache
from edgellm.engine.loop import EngineLimits, EngineLoop
from edgellm.engine.weights import LoadedModel, load_model
from edgellm.quant.int4 import quantize_model


def engine_threads(requested: int) -> int:
    """Keep torch single-threaded on the calling (event loop) thread; return the thread count
    for the engine thread: `requested`, or one per CPU this process may use.

    Why: torch's OpenMP team belongs to the thread that first runs a parallel op. If the main
    thread (KV staging, cache allocation) also had a multi-threaded team, two teams fight over
    the cores: a decode step went from 33 to 61-73 ms/token here.
    """
    torch.set_num_threads(1)
    return requested or len(os.sched_getaffinity(0))


def build_engine(
    model_cfg: ModelConfig, engine_cfg: EngineConfig, threads: int, service: str
) -> tuple[EngineLoop, LoadedModel]:
    num_threads = engine_threads(threads)
    loaded = load_model(model_cfg.model, model_cfg.dtype_for(service))
    if service == "decode" and model_cfg.decode_weights == "int4":
        quantize_model(loaded.model, model_cfg.int4_group_size)  # prefill keeps full precision
    a = loaded.model.arch
    dtype = loaded.model.embed_tokens.weight.dtype
    block_bytes = PagedKVCache.bytes_per_block(a.num_layers, engine_cfg.kv_block_size, a.num_kv_heads, a.head_dim, dtype)
    limits = EngineLimits(
        num_blocks=max(1, engine_cfg.kv_cache_mb * 2**20 // block_bytes),
        block_size=engine_cfg.kv_block_size,
        max_batch_tokens=engine_cfg.max_batch_tokens,
        max_running=engine_cfg.max_running,
        max_consecutive_prefills=engine_cfg.max_consecutive_prefills,
    )
    engine = EngineLoop(loaded.model, loaded.eos_token_ids, limits, num_threads=num_threads)
    engine.start()  # returns after the engine thread's warm-up
    return engine, loaded
