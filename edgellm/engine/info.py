"""The engine's face to services: the limits it is built with (EngineLimits), what it is
(EngineInfo, fixed at construction) and how busy it is (EngineStats, a snapshot). Services
read these, never the engine's cache, blocks, model, scheduler or runner, so the engine can
change shape without them noticing.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EngineLimits:
    num_blocks: int
    block_size: int = 16
    max_batch_tokens: int = 2048  # prefill tokens packed into one forward
    max_running: int = 64  # sequences in the decode batch
    max_consecutive_prefills: int = 4  # then a decode step runs, so decoding never starves
    max_waiting: int = 1024  # sequences queued and not yet running; more are refused (EngineBusy)
    # Takeovers reaching an idle engine wait until none has come for this long (at most 4x it)
    # so that one packed prefill takes every stream moved here by the same failure.
    takeover_gather_s: float = 0.01


@dataclass(frozen=True)
class EngineInfo:
    device: str  # e.g. "cpu"
    num_threads: int  # torch threads of the engine thread
    dtype: str  # of activations and the KV cache: "fp32", "bf16" or "fp16"
    weights_label: str  # what `edgellm status` shows, e.g. "bf16" or "int4-awq g32+8 outliers"
    weight_bytes: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int  # tokens a sequence may reach, prompt included
    num_kv_blocks: int
    kv_block_size: int
    max_running: int  # sequences in the decode batch
    max_waiting: int  # sequences queued and not yet running


@dataclass(frozen=True)
class EngineStats:
    num_running: int  # sequences in the decode batch
    num_waiting: int  # sequences queued (not yet prefilled, preempted, or staged awaiting blocks)
    num_free_kv_blocks: int
    num_steps: int
    num_preemptions: int
    max_decode_batch: int  # largest decode step so far (evidence of batching)
