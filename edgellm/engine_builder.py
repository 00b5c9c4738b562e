"""Compose a ready EngineLoop for a prefill or decode service: pick its device, load the
weights there (dense, or INT4 through quant's transform), size the KV cache from the config,
start the engine thread.

It sits above engine, quant and parallel: quant transforms the engine's model, parallel shards
it (tensor-parallel prefill) or keeps a decode stage's layers; the engine imports none of them
nor this module.
"""

from __future__ import annotations

import torch

from edgellm.config import Config, ModelConfig
from edgellm.device import resolve_device
from edgellm.engine.kv_cache import PagedKVCache
from edgellm.engine.info import EngineLimits
from edgellm.engine.loop import EngineLoop
from edgellm.engine.runner import Forward, OnAdmitKV
from edgellm.engine.weights import LoadedModel, load_model
from edgellm.parallel.layout import tp_shards
from edgellm.parallel.stages import keep_stage_layers, stage_plan
from edgellm.parallel.tp import TPGroup, encode_step, shard_model
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


def engine_limits(config: Config, arch, dtype: torch.dtype, num_layers: int | None = None) -> EngineLimits:
    """The engine's sizes from the config: KV blocks from --kv-cache-mb at the whole model's
    head count (every rank of a tensor-parallel group then has the same number of blocks, each
    holding its own heads). num_layers: the layers a block holds (default: every layer)."""
    engine_cfg = config.engine
    block_bytes = PagedKVCache.bytes_per_block(num_layers or arch.num_layers, engine_cfg.kv_block_size,
                                               arch.num_kv_heads, arch.head_dim, dtype)
    return EngineLimits(
        num_blocks=max(1, engine_cfg.kv_cache_mb * 2**20 // block_bytes),
        block_size=engine_cfg.kv_block_size,
        max_batch_tokens=engine_cfg.max_batch_tokens,
        max_running=engine_cfg.max_running,
        max_consecutive_prefills=engine_cfg.max_consecutive_prefills,
        max_waiting=config.limits.max_waiting_sequences,
    )


def load_for(config: Config, service: str) -> tuple[LoadedModel, torch.device, int]:
    """The service's model on its device (--prefill-device / --decode-device), and its torch
    threads. A device that cannot be used raises DeviceUnavailable before anything loads."""
    device = resolve_device(config.placement.device(service), f"--{service}-device")
    num_threads = engine_threads(config.placement.threads(service))
    return load_service_model(config.model, service, num_threads, device), device, num_threads


def build_engine(config: Config, service: str) -> tuple[EngineLoop, LoadedModel]:
    """Load the service's model onto its device and return its started (warmed-up) engine."""
    loaded, _, num_threads = load_for(config, service)
    limits = engine_limits(config, loaded.model.arch, loaded.model.norm.weight.dtype)
    engine = EngineLoop(loaded.model, loaded.eos_token_ids, limits, num_threads=num_threads,
                        weights_label=weights_label(config.model, service), cuda_graphs=config.placement.cuda_graphs)
    engine.start()  # returns after the engine thread's warm-up
    return engine, loaded


def build_tp_prefill(config: Config) -> tuple[EngineLoop, LoadedModel, TPGroup]:
    """Rank 0 of a tensor-parallel prefill group: its shard of the model, an engine that
    publishes every forward pass to the other ranks, started once every rank has joined."""
    parallel = config.parallel
    loaded, device, num_threads = load_for(config, "prefill")
    model = loaded.model
    limits = engine_limits(config, model.arch, model.norm.weight.dtype)  # before sharding: the whole model's heads
    group = TPGroup(0, parallel.prefill_tp, parallel.tp_address, parallel.prefill_tp_timeout_s, device)
    a = model.arch
    shard_model(model, tp_shards(a.num_heads, a.num_kv_heads, a.intermediate_size, parallel.prefill_tp)[0],
                group.all_reduce)
    model.register_forward_pre_hook(
        lambda _module, args, kwargs: group.publish(encode_step(args[0], args[0].kv_routes or [])), with_kwargs=True)
    group.form_as_rank0()  # waits for every rank: the warm-up below already runs on the whole group
    engine = EngineLoop(model, loaded.eos_token_ids, limits, num_threads=num_threads,
                        weights_label=f"{weights_label(config.model, 'prefill')} tp{parallel.prefill_tp}",
                        cuda_graphs=False)  # a replayed graph would skip publishing its step to the workers
    engine.start()
    return engine, loaded, group


def load_decode_stage(config: Config, stage: int) -> tuple[LoadedModel, int, list[tuple[int, int]]]:
    """Pipeline stage `stage` of a decode unit (--decode-stages N): the decode model loaded, then
    cut to the stage's layers; its torch threads; every stage's layers (stages.stage_plan, made
    from the whole model before the cut, the same on every stage)."""
    loaded, _, num_threads = load_for(config, "decode")
    ranges = stage_plan(loaded.model, config.parallel.decode_stages)
    keep_stage_layers(loaded.model, ranges[stage])
    return loaded, num_threads, ranges


def decode_stage_limits(config: Config, model, ranges: list[tuple[int, int]]) -> EngineLimits:
    """Every stage of a decode unit has stage 0's number of KV blocks (its slot numbers are used
    everywhere), sized for the stage with the most layers, so that no stage passes --kv-cache-mb."""
    largest = max(end - start for start, end in ranges)
    return engine_limits(config, model.arch, model.norm.weight.dtype, num_layers=largest)


def start_decode_stage0(config: Config, loaded: LoadedModel, num_threads: int, ranges: list[tuple[int, int]],
                        forward: Forward, on_admit_kv: OnAdmitKV) -> EngineLoop:
    """Stage 0's started engine: its layers' model and cache, each batch carried through the
    other stages by `forward` (parallel/pipeline.py), its warm-up too."""
    engine = EngineLoop(loaded.model, loaded.eos_token_ids, decode_stage_limits(config, loaded.model, ranges),
                        num_threads=num_threads, weights_label=weights_label(config.model, "decode"),
                        cuda_graphs=False, forward=forward, on_admit_kv=on_admit_kv)
    engine.start()
    return engine
