"""Gateway servicer: the public Generate stream.

Lifecycle of a request:
  validate -> tokenize (prompt as is, or messages through the chat template) ->
  prefill pool (pools.py: bounded queue, deadline) -> route (monitor's table) ->
  NORMAL: Prefill on a prefill service, which streams the KV to the least loaded decode
  service and returns the first token; the request moves to that decode pool and Decode
  streams the rest. DEGRADED/COLOCATED: GenerateLocal on a prefill service does both.
  Token ids become text deltas (TextStream); the last message carries finish_reason,
  usage and timings. A client that cancels cancels the upstream calls, which frees the
  request's KV blocks at the engine's next step.
If the decode path fails (the service died before the monitor noticed), the request is
finished by GenerateLocal on the prefill service, resuming after the tokens already sent:
the client sees one uninterrupted stream.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import grpc
import structlog

from edgellm import metrics
from edgellm.config import GatewayConfig
from edgellm.logs import bind_request
from edgellm.rpc.channels import ChannelPool
from edgellm.rpc.convert import WIRE_TO_FINISH
from edgellm.v1 import common_pb2, decode_pb2, decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc
from edgellm.v1 import prefill_pb2, prefill_pb2_grpc
from services.gateway.pools import AdmissionError, Pools
from services.gateway.router import NoRoute, Route, Router
from services.gateway.text import TextStream

log = structlog.get_logger(__name__)
# Upstream failures after which the request is resumed on the prefill service.
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.FAILED_PRECONDITION,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED)


@dataclass
class Request:
    """One request as the gateway tracks it: enough to resume it elsewhere."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: common_pb2.SamplingParams
    max_new_tokens: int
    deadline: float | None  # time.monotonic() value, or None
    generated: list[int] = field(default_factory=list)

    def timeout(self) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, tokenizer: Any, max_context: int, router: Router, pools: Pools, channels: ChannelPool,
                 cfg: GatewayConfig):
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.router = router
        self.pools = pools
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

    def _deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        limits = [t for t in (context.time_remaining(), self.cfg.request_timeout_s or None) if t is not None]
        return time.monotonic() + min(limits) if limits else None

    # ---- Generate --------------------------------------------------------------------------
    async def Generate(
        self, request: gateway_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.GenerateResponse]:
        try:
            async for response in self._generate(request, context):
                yield response
        except asyncio.CancelledError:
            metrics.ERRORS.labels("CANCELLED").inc()
            raise
        except Exception:
            code = context.code() or grpc.StatusCode.UNKNOWN
            metrics.ERRORS.labels(getattr(code, "name", str(code))).inc()
            raise

    async def _generate(
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
        req = Request(
            request_id=request_id,
            prompt_token_ids=prompt_ids,
            sampling=common_pb2.SamplingParams(
                temperature=request.temperature,
                top_p=request.top_p,
                top_k=request.top_k,
                seed=request.seed if request.HasField("seed") else random.getrandbits(63),
            ),
            # Generation also ends at the context's end (finish_reason "length").
            max_new_tokens=min(request.max_tokens or self.cfg.default_max_tokens, self.max_context - len(prompt_ids)),
            deadline=self._deadline(context),
        )
        try:
            await self.pools.enter_prefill(req.timeout())
        except AdmissionError as e:
            log.warning("request_refused", code=e.code.name, reason=e.message)
            await context.abort(e.code, e.message)
        decode_pool: str | None = None  # set once the request has moved to a decode pool
        try:
            try:
                route = self.router.pick(self.pools.pick_decode)
            except NoRoute as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            log.info("request_accepted", num_prompt_tokens=len(prompt_ids), max_new_tokens=req.max_new_tokens,
                     prefill=route.prefill, decode=route.decode)
            text = TextStream(self.tokenizer, list(request.stop))
            finish = "length"
            first_token_at = None
            tokens = self._tokens(req, route, context)
            async for token, token_finish in tokens:
                if first_token_at is None:  # prefill done: from the prefill pool to a decode pool
                    first_token_at = time.monotonic()
                    self.pools.leave_prefill()
                    decode_pool = route.decode or route.prefill
                    self.pools.enter_decode(decode_pool)
                req.generated.append(token)
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
        finally:
            if decode_pool is None:
                self.pools.leave_prefill()
            else:
                self.pools.leave_decode(decode_pool)

        num_generated = len(req.generated)
        done = time.monotonic()
        ttft = (first_token_at - received) * 1000 if first_token_at else 0.0
        tpot = (done - first_token_at) * 1000 / (num_generated - 1) if num_generated > 1 else 0.0
        log.info("request_finished", finish_reason=finish, completion_tokens=num_generated, ttft_ms=round(ttft, 1))
        metrics.REQUESTS.labels(finish).inc()
        metrics.PROMPT_TOKENS.inc(len(prompt_ids))
        metrics.GENERATED_TOKENS.inc(num_generated)
        metrics.TTFT.observe(ttft / 1000)
        if num_generated > 1:
            metrics.TPOT.observe(tpot / 1000)
        yield gateway_pb2.GenerateResponse(
            request_id=request_id,
            finish_reason=finish,
            usage=gateway_pb2.Usage(prompt_tokens=len(prompt_ids), completion_tokens=num_generated),
            timings=gateway_pb2.Timings(ttft_ms=ttft, tpot_ms=tpot),
        )

    async def _tokens(
        self, req: Request, route: Route, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[tuple[int, str | None]]:
        """(token, finish_reason or None) from wherever the route says, resuming once on a decode failure."""
        prefill = prefill_pb2_grpc.PrefillStub(self.channels.get(route.prefill))
        try:
            if route.decode is not None:
                try:
                    async for item in self._disaggregated(req, route.decode, prefill):
                        yield item
                    return
                except grpc.aio.AioRpcError as e:
                    if e.code() not in RESUMABLE:
                        raise
                    metrics.RESUMED.inc()
                    log.warning("decode_path_failed", decode=route.decode, code=e.code().name, details=e.details(),
                                num_sent=len(req.generated))
            async for item in self._local(req, prefill):
                yield item
        except grpc.aio.AioRpcError as e:
            log.warning("upstream_failed", code=e.code().name, details=e.details())
            passed_on = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                         grpc.StatusCode.DEADLINE_EXCEEDED)
            code = e.code() if e.code() in passed_on else grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"generation failed upstream: {e.details()}")

    async def _disaggregated(self, req: Request, decode_address: str, prefill: prefill_pb2_grpc.PrefillStub):
        reply = await prefill.Prefill(
            prefill_pb2.PrefillRequest(
                request_id=req.request_id,
                prompt_token_ids=req.prompt_token_ids,
                sampling=req.sampling,
                decode_address=decode_address,
                max_new_tokens=req.max_new_tokens,
            ),
            timeout=req.timeout(),
        )
        finish = WIRE_TO_FINISH.get(reply.finish_reason)
        yield reply.first_token_id, finish
        if finish is not None:
            return
        decode = decode_pb2_grpc.DecodeStub(self.channels.get(decode_address))
        call = decode.Decode(
            decode_pb2.DecodeRequest(
                request_id=req.request_id,
                sampling=req.sampling,
                max_new_tokens=req.max_new_tokens,
                prompt_token_ids=req.prompt_token_ids,
            ),
            timeout=req.timeout(),
        )
        try:
            async for delta in call:
                for token in delta.token_ids:
                    yield token, WIRE_TO_FINISH.get(delta.finish_reason)
        finally:
            call.cancel()  # no-op when finished; otherwise decode frees the sequence now

    async def _local(self, req: Request, prefill: prefill_pb2_grpc.PrefillStub):
        """Degraded/colocated mode, or the rest of a request whose decode path failed."""
        call = prefill.GenerateLocal(
            prefill_pb2.GenerateLocalRequest(
                request_id=req.request_id,
                prompt_token_ids=req.prompt_token_ids + req.generated,
                sampling=req.sampling,
                max_new_tokens=req.max_new_tokens,
                num_generated=len(req.generated),
            ),
            timeout=req.timeout(),
        )
        try:
            async for delta in call:
                for token in delta.token_ids:
                    yield token, WIRE_TO_FINISH.get(delta.finish_reason)
        finally:
            call.cancel()
