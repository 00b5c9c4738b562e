"""Gateway servicer: the public Generate stream over gRPC.

A thin face over the request pipeline (pipeline.py): a GenerateRequest becomes a
GenerateInput, each pipeline event a GenerateResponse (text deltas, then one last message
with finish_reason, usage and timings), and a GatewayError the matching status through
context.abort (RateLimited: RESOURCE_EXHAUSTED with retry-after and x-ratelimit-* in the
trailing metadata). A client that cancels cancels the pipeline, and with it the upstream calls.
The caller is the API key (the interceptor has checked it) or, without keys, the peer's host.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

import grpc

from edgellm import metrics
from edgellm.rpc.security import AUTHORIZATION_KEY, bearer_key, metadata_value
from edgellm.v1 import gateway_pb2, gateway_pb2_grpc
from services.gateway import errors
from services.gateway.pipeline import Pipeline
from services.gateway.request import Caller, ChatMessage, Event, Finished, GenerateInput, Sampling

STATUS = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def status_code(e: errors.GatewayError) -> grpc.StatusCode:
    """The gRPC status a pipeline error ends the call with (an upstream's status as it came)."""
    if isinstance(e, errors.UpstreamError):
        return e.code
    return next(STATUS[t] for t in type(e).__mro__ if t in STATUS)  # a subclass maps as its base


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


def peer_host(peer: str) -> str:
    """'ipv4:127.0.0.1:5555' -> '127.0.0.1', 'ipv6:[::1]:5555' -> '[::1]' (one budget per host, not per port)."""
    kind, _, address = peer.partition(":")
    return address.rsplit(":", 1)[0] if kind in ("ipv4", "ipv6") else peer


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, pipeline: Pipeline, has_api_keys: bool = False) -> None:
        """has_api_keys: the gateway checks API keys, so the key names the caller (else its address)."""
        self.pipeline = pipeline
        self.has_api_keys = has_api_keys

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        key = bearer_key(metadata_value(context.invocation_metadata(), AUTHORIZATION_KEY)) if self.has_api_keys else ""
        return Caller.of(key, peer_host(context.peer()))

    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        try:
            events = self.pipeline.generate(input_from_proto(request), context.time_remaining(), self._caller(context))
            async with contextlib.aclosing(events):
                async for event in events:
                    yield response_from_event(event)
        except asyncio.CancelledError:
            metrics.ERRORS.labels("CANCELLED").inc()
            raise
        except errors.GatewayError as e:
            code = status_code(e)
            metrics.ERRORS.labels(code.name).inc()
            trailing = tuple(e.headers.items()) if isinstance(e, errors.RateLimited) else ()
            await context.abort(code, e.message, trailing_metadata=trailing)
        except Exception:
            metrics.ERRORS.labels(grpc.StatusCode.UNKNOWN.name).inc()
            raise
