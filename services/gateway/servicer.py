"""Gateway servicer: the public Generate stream.

Lifecycle of a request:
  validate -> tokenize (prompt as is, or messages through the chat template) ->
  route (monitor's table) -> NORMAL: Prefill on a prefill service, which streams the KV to
  the chosen decode service and returns the first token; then Decode on that service
  streams the rest. DEGRADED: GenerateLocal on a prefill service does both.
  Token ids become text deltas (TextStream); the last message carries finish_reason,
  usage and timings.
If the decode path fails (the service died before the monitor noticed), the request is
finished by GenerateLocal on the prefill service, resuming after the tokens already sent:
the client sees one uninterrupted stream.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import grpc
import structlog

from edgellm.config import GatewayConfig
from edgellm.logs import bind_request
from edgellm.rpc.channels import ChannelPool
from edgellm.rpc.convert import WIRE_TO_FINISH
from edgellm.v1 import common_pb2, decode_pb2, decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from edgellm.v1 import prefill_pb2, prefill_pb2_grpc
from services.gateway.router import NoRoute, Route, Router
from services.gateway.text import TextStream

log = structlog.get_logger(__name__)


@dataclass
class Progress:
    """What the client has been sent so far: enough to resume the request elsewhere."""

    prompt_token_ids: list[int]
    generated: list[int] = field(default_factory=list)


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, tokenizer: Any, max_context: int, router: Router, channels: ChannelPool, cfg: GatewayConfig):
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.router = router
        self.channels = channels
        self.cfg = cfg

    # ---- request preparation -------------------------------------------------------------
    async def _tokenize(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> list[int]:
        if bool(request.prompt) == bool(request.messages):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "give exactly one of prompt or messages")
        if request.prompt:
            return list(self.tokenizer(request.prompt)["input_ids"])
        if not self.tokenizer.chat_template:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "this model has no chat template: send prompt instead")
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        if any(m["role"] not in ("system", "user", "assistant") for m in messages):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "message roles must be system, user or assistant")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)

    async def _validate(self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext) -> None:
        if request.temperature < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "temperature must be >= 0")
        if not 0 <= request.top_p <= 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "top_p must be in [0, 1]")
        if request.top_k < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "top_k must be >= 0")

    # ---- Generate --------------------------------------------------------------------------
    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        received = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        bind_request(request_id)
        await self._validate(request, context)
        prompt_ids = await self._tokenize(request, context)
        if not prompt_ids:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the prompt is empty")
        if len(prompt_ids) >= self.max_context:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt is {len(prompt_ids)} tokens; the model's context is {self.max_context} tokens",
            )
        # Generation also ends at the context's end (finish_reason "length").
        max_new = min(request.max_tokens or self.cfg.default_max_tokens, self.max_context - len(prompt_ids))
        sampling = common_pb2.SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed if request.HasField("seed") else random.getrandbits(63),
        )
        try:
            route = self.router.pick()
        except NoRoute as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        log.info("request_accepted", num_prompt_tokens=len(prompt_ids), max_new_tokens=max_new, route=str(route))

        text = TextStream(self.tokenizer, list(request.stop))
        progress = Progress(prompt_ids)
        finish = "length"
        first_token_at = None
        tokens = self._tokens(request_id, route, progress, sampling, max_new, context)
        async for token, token_finish in tokens:
            first_token_at = first_token_at or time.monotonic()
            progress.generated.append(token)
            delta = text.add(token)
            if text.stopped:
                finish = "stop"
            elif token_finish is not None:
                finish = token_finish
                delta += text.flush()
            yield gateway_pb2.GenerateResponse(text=delta, token_ids=[token], request_id=request_id)
            if text.stopped or token_finish is not None:
                break
        await tokens.aclose()  # a stop string ends it early: cancels the upstream stream

        num_generated = len(progress.generated)
        done = time.monotonic()
        ttft = (first_token_at - received) * 1000 if first_token_at else 0.0
        tpot = (done - first_token_at) * 1000 / (num_generated - 1) if num_generated > 1 else 0.0
        log.info("request_finished", finish_reason=finish, completion_tokens=num_generated, ttft_ms=round(ttft, 1))
        yield gateway_pb2.GenerateResponse(
            request_id=request_id,
            finish_reason=finish,
            usage=gateway_pb2.Usage(prompt_tokens=len(prompt_ids), completion_tokens=num_generated),
            timings=gateway_pb2.Timings(ttft_ms=ttft, tpot_ms=tpot),
        )

    async def _tokens(
        self,
        request_id: str,
        route: Route,
        progress: Progress,
        sampling: common_pb2.SamplingParams,
        max_new: int,
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[tuple[int, str | None]]:
        """(token, finish_reason or None) from wherever the route says, resuming once on a decode failure."""
        prefill = prefill_pb2_grpc.PrefillStub(self.channels.get(route.prefill))
        try:
            if route.decode is not None:
                try:
                    async for item in self._disaggregated(request_id, route, prefill, progress, sampling, max_new):
                        yield item
                    return
                except grpc.aio.AioRpcError as e:
                    if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
                                        grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.CANCELLED):
                        raise
                    log.warning("decode_path_failed", decode=route.decode, code=e.code().name, details=e.details(),
                                num_sent=len(progress.generated))
            async for item in self._local(request_id, prefill, progress, sampling, max_new):
                yield item
        except grpc.aio.AioRpcError as e:
            log.warning("upstream_failed", code=e.code().name, details=e.details())
            code = e.code() if e.code() == grpc.StatusCode.INVALID_ARGUMENT else grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"generation failed upstream: {e.details()}")

    async def _disaggregated(self, request_id, route, prefill, progress, sampling, max_new):
        reply = await prefill.Prefill(
            prefill_pb2.PrefillRequest(
                request_id=request_id,
                prompt_token_ids=progress.prompt_token_ids,
                sampling=sampling,
                decode_address=route.decode,
                max_new_tokens=max_new,
            )
        )
        finish = WIRE_TO_FINISH.get(reply.finish_reason)
        yield reply.first_token_id, finish
        if finish is not None:
            return
        decode = decode_pb2_grpc.DecodeStub(self.channels.get(route.decode))
        call = decode.Decode(
            decode_pb2.DecodeRequest(
                request_id=request_id,
                sampling=sampling,
                max_new_tokens=max_new,
                prompt_token_ids=progress.prompt_token_ids,
            )
        )
        async for delta in call:
            for token in delta.token_ids:
                yield token, WIRE_TO_FINISH.get(delta.finish_reason)

    async def _local(self, request_id, prefill, progress, sampling, max_new):
        """Degraded mode, or the rest of a request whose decode path failed."""
        request = prefill_pb2.GenerateLocalRequest(
            request_id=request_id,
            prompt_token_ids=progress.prompt_token_ids + progress.generated,
            sampling=sampling,
            max_new_tokens=max_new,
            num_generated=len(progress.generated),
        )
        async for delta in prefill.GenerateLocal(request):
            for token in delta.token_ids:
                yield token, WIRE_TO_FINISH.get(delta.finish_reason)
