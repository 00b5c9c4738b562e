"""Conversions between proto messages and engine types, and validation of internal requests."""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from edgellm import metrics
from edgellm.engine.errors import EngineBusy, EngineError, NeverFits, SequenceFailed
from edgellm.engine.loop import EngineLoop
from edgellm.engine.sampling_params import SamplingParams
from edgellm.transfer.receiver import MAX_REQUEST_ID_BYTES  # one bound for every internal door
from edgellm.v1 import common_pb2

FINISH_TO_WIRE = {
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "cancelled": common_pb2.FINISH_REASON_CANCELLED,
    "error": common_pb2.FINISH_REASON_ERROR,
}
WIRE_TO_FINISH = {v: k for k, v in FINISH_TO_WIRE.items()}
# Trailing metadata of a failed Prefill call naming the service at fault (its decode service):
# the gateway then avoids that one, not the prefill service.
FAILED_SERVICE_KEY = "edgellm-failed-service"
# How an engine's refusal or failure ends an internal call (never UNKNOWN):
#   NeverFits       OUT_OF_RANGE: larger than the whole KV cache; the gateway passes it on at once
#   EngineBusy      RESOURCE_EXHAUSTED: the queue is full now; the gateway may try another engine
#   SequenceFailed  ABORTED: this request alone failed (its sampling); not retried
#   EngineError     UNAVAILABLE: a whole engine step failed; the gateway may try another engine
ENGINE_ERROR_STATUS = (
    (NeverFits, grpc.StatusCode.OUT_OF_RANGE),
    (EngineBusy, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (SequenceFailed, grpc.StatusCode.ABORTED),
    (EngineError, grpc.StatusCode.UNAVAILABLE),
)


def status_for(error: Exception, table: tuple[tuple[type, grpc.StatusCode], ...]) -> grpc.StatusCode:
    """The status of the first (error class, status) row `error` is an instance of (subclasses first)."""
    return next(code for cls, code in table if isinstance(error, cls))


def engine_error_status(e: EngineError) -> grpc.StatusCode:
    return status_for(e, ENGINE_ERROR_STATUS)


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    """Raises ValueError for values the engine cannot sample with (SamplingParams' rules)."""
    return SamplingParams(temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k, seed=p.seed)


async def check_spec(
    context: grpc.aio.ServicerContext, spec: common_pb2.RequestSpec, engine: EngineLoop
) -> SamplingParams:
    """Every internal door's checks on a RequestSpec, before any work: a bounded id, a prompt of
    in-vocabulary ids inside the context, a consistent num_generated, a max_new_tokens the context
    holds, sampling values the engine accepts, room in the engine's queue. Aborts with a clear status; returns the sampling params."""
    if not spec.request_id or len(spec.request_id.encode()) > MAX_REQUEST_ID_BYTES:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"request_id must be 1..{MAX_REQUEST_ID_BYTES} bytes")
    await check_prompt(context, spec.prompt_token_ids, engine.info.vocab_size, engine.info.max_context)
    await check_num_generated(context, spec)
    num_prompt = len(spec.prompt_token_ids) - spec.num_generated
    if num_prompt + spec.max_new_tokens > engine.info.max_context:  # generation would run past the context
        await context.abort(
            grpc.StatusCode.OUT_OF_RANGE,
            f"max_new_tokens is {spec.max_new_tokens}, but the model's context of {engine.info.max_context} tokens "
            f"leaves {engine.info.max_context - num_prompt} after the prompt's {num_prompt}",
        )
    try:
        sampling = sampling_from_proto(spec.sampling)
    except ValueError as e:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling: {e}")
    try:
        engine.check_room()
    except EngineBusy as e:
        metrics.LIMIT_HITS.labels("max_waiting_sequences").inc()
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
    return sampling


def sampling_to_proto(s: SamplingParams) -> common_pb2.SamplingParams:
    return common_pb2.SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed)


async def check_prompt(context: grpc.aio.ServicerContext, token_ids, vocab_size: int, max_context: int) -> None:
    """Abort with INVALID_ARGUMENT unless token_ids is a usable prompt for this model."""
    if not token_ids:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt_token_ids is empty")
    if len(token_ids) >= max_context:
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"prompt has {len(token_ids)} tokens; the model's context is {max_context}",
        )
    if min(token_ids) < 0 or max(token_ids) >= vocab_size:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"token ids must be in [0, {vocab_size})")


async def check_num_generated(context: grpc.aio.ServicerContext, spec: common_pb2.RequestSpec) -> None:
    """Abort with INVALID_ARGUMENT unless a takeover's num_generated fits its prompt and max_new_tokens
    (prompt_token_ids ends with those tokens; max_new_tokens counts them)."""
    if spec.max_new_tokens <= spec.num_generated or spec.num_generated >= len(spec.prompt_token_ids):
        await context.abort(
            grpc.StatusCode.INVALID_ARGUMENT, "need num_generated < max_new_tokens and num_generated < len(prompt)"
        )


async def token_deltas(
    request_id: str, tokens: AsyncIterator[tuple[int, str | None]], context: grpc.aio.ServicerContext
) -> AsyncIterator[common_pb2.TokenDelta]:
    """An engine's (token, finish_reason) stream as TokenDelta messages; an engine error ends it
    with the status ENGINE_ERROR_STATUS gives."""
    try:
        async for token, finish in tokens:
            yield common_pb2.TokenDelta(request_id=request_id, token_ids=[token], finish_reason=FINISH_TO_WIRE.get(finish, 0))
    except EngineError as e:
        await context.abort(engine_error_status(e), str(e))
