"""Compose a ready EngineLoop for a prefill or decode service: pick its device, load the
weights there (dense, or INT4 through quant's transform), size the KV cache from the config,
start the engine thread.

It sits above both engine and quant: quant transforms the engine's model, the engine
imports neither quant nor this module.
"""

from __future__ import annotations

import torch

from edgellm.config import Config, ModelConfig
from edgellm.device import resolve_device
from edgellm.engine.kv_cache import PagedKVCache
from edgellm.engine.loop import EngineLimits, EngineLoop
from edgellm.engine.weights import LoadedModel, load_model
from edgellm.placement import engine_threads
from edgellm.quant.prepare import Int4Settings, load_int4_model


def int4_settings(model_cfg: ModelConfig) -> Int4Settings | None:
    return Int4Settings.from_weights(
        model_cfg.decode_weights, model_cfg.int4_group_size, model_cfg.int4_outliers, model_cfg.int4_lm_head
    )


def weights_label(model_cfg: ModelConfig, service: str) -> str:
    """What `edgellm status` shows as a service's precision, e.g. 'int4-awq g32+8 outliers'."""
    int4 = int4_settings(model_cfg) if service == "decode" else None
    return int4.label if int4 is not None else model_cfg.dtype_for(service)


def load_service_model(model_cfg: ModelConfig, service: str, num_threads: int, device: torch.device) -> LoadedModel:
    """The model a prefill or decode service runs, on `device`: INT4 weights for decode when
    configured (calibrated with num_threads if its checkpoint is not cached yet), else dense
    weights."""
    int4 = int4_settings(model_cfg) if service == "decode" else None
    if int4 is None:  # prefill (and dense decode) keep full precision
        loaded = load_model(model_cfg.model, model_cfg.dtype_for(service))
        loaded.model.to(device)
        return loaded
    return load_int4_model(model_cfg.model, int4, model_cfg.int4_checkpoint, num_threads, model_cfg.int4_kernel, device)


def build_engine(config: Config, service: str) -> tuple[EngineLoop, LoadedModel]:
    """Load the service's model onto its device (--prefill-device / --decode-device) and
    return its started (warmed-up) engine. A device that cannot be used raises
    DeviceUnavailable before anything loads."""
    model_cfg, engine_cfg, placement = config.model, config.engine, config.placement
    device = resolve_device(placement.device(service), f"--{service}-device")
    num_threads = engine_threads(placement.threads(service))
    loaded = load_service_model(model_cfg, service, num_threads, device)
    a = loaded.model.arch
    dtype = loaded.model.norm.weight.dtype
    block_bytes = PagedKVCache.bytes_per_block(a.num_layers, engine_cfg.kv_block_size, a.num_kv_heads, a.head_dim, dtype)
    limits = EngineLimits(
        num_blocks=max(1, engine_cfg.kv_cache_mb * 2**20 // block_bytes),
        block_size=engine_cfg.kv_block_size,
        max_batch_tokens=engine_cfg.max_batch_tokens,
        max_running=engine_cfg.max_running,
        max_consecutive_prefills=engine_cfg.max_consecutive_prefills,
        max_waiting=config.limits.max_waiting_sequences,
    )
    engine = EngineLoop(loaded.model, loaded.eos_token_ids, limits, num_threads=num_threads,
                        weights_label=weights_label(model_cfg, service), cuda_graphs=placement.cuda_graphs)
    engine.start()  # returns after the engine thread's warm-up
    return engine, loaded
