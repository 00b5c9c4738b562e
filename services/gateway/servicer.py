"""Gateway servicer: the public Generate stream over gRPC.

A thin face over the request pipeline (pipeline.py): a GenerateRequest becomes a
GenerateInput, each pipeline event a GenerateResponse (text deltas, then one last message
with finish_reason, usage and timings), and a GatewayError the matching status through
context.abort. A client that cancels cancels the pipeline, and with it the upstream calls.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import grpc

from edgellm import metrics
from edgellm.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway import errors
from services.gateway.pipeline import Pipeline
from services.gateway.request import ChatMessage, Event, Finished, GenerateInput, Sampling

STATUS = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(e: errors.GatewayError) -> grpc.StatusCode:
    """The gRPC status a pipeline error ends the call with (an upstream's status as it came)."""
    return e.code if isinstance(e, errors.UpstreamError) else STATUS[type(e)]


def input_from_proto(request: gateway_pb2.GenerateRequest) -> GenerateInput:
    return GenerateInput(
        prompt=request.prompt,
        messages=tuple(ChatMessage(m.role, m.content) for m in request.messages),
        sampling=Sampling(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k),
        max_tokens=request.max_tokens,
        stop=tuple(request.stop),
        seed=request.seed if request.HasField("seed") else None,
        request_id=request.request_id,
    )


def response_from_event(event: Event) -> gateway_pb2.GenerateResponse:
    if isinstance(event, Finished):
        return gateway_pb2.GenerateResponse(
            request_id=event.request_id,
            finish_reason=event.finish_reason,
            usage=gateway_pb2.Usage(prompt_tokens=event.usage.prompt_tokens,
                                    completion_tokens=event.usage.completion_tokens),
            timings=gateway_pb2.Timings(ttft_ms=event.timings.ttft_ms, tpot_ms=event.timings.tpot_ms),
        )
    return gateway_pb2.GenerateResponse(text=event.text, token_ids=event.token_ids, request_id=event.request_id)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        try:
            events = self.pipeline.generate(input_from_proto(request), context.time_remaining())
            async with contextlib.aclosing(events):
                async for event in events:
                    yield response_from_event(event)
        except asyncio.CancelledError:
            metrics.ERRORS.labels("CANCELLED").inc()
            raise
        except errors.GatewayError as e:
            code = status_code(e)
            metrics.ERRORS.labels(code.name).inc()
            await context.abort(code, e.message)
        except Exception:
            metrics.ERRORS.labels(grpc.StatusCode.UNKNOWN.name).inc()
            raise
