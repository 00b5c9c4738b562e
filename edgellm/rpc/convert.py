"""Conversions between proto messages and engine types, and validation of internal requests."""

from __future__ import annotations

from typing import AsyncIterator

import grpc

from edgellm.engine.loop import EngineError
from edgellm.engine.sampling_params import SamplingParams
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


def sampling_from_proto(p: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k, seed=p.seed)


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
    """An engine's (token, finish_reason) stream as TokenDelta messages; a request the engine
    cannot hold (larger than its whole KV cache) ends with RESOURCE_EXHAUSTED."""
    try:
        async for token, finish in tokens:
            yield common_pb2.TokenDelta(request_id=request_id, token_ids=[token], finish_reason=FINISH_TO_WIRE.get(finish, 0))
    except EngineError as e:
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e))
