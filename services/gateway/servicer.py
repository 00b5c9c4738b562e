"""Gateway servicer: the public Generate stream.

Lifecycle of a request:
  validate -> tokenize (prompt as is, or messages through the chat template) ->
  prefill pool (pools.py: bounded queue, deadline) -> route (monitor's table) ->
  NORMAL: Prefill on a prefill service, which streams the KV to the least loaded decode
  service and returns the first token; the request moves to that decode pool and Decode
  streams the rest. DEGRADED/COLOCATED: GenerateLocal on a prefill service does both;
  NO_PREFILL: GenerateLocal on a decode service.
  Token ids become text deltas (TextStream); the last message carries finish_reason,
  usage and timings. A client that cancels cancels the upstream calls, which frees the
  request's KV blocks at the engine's next step.

Migration: the gateway keeps each request's prompt and the tokens it has streamed. When a
service on its path fails (a stream error, or the monitor marking it down, whichever comes
first) the request is re-submitted elsewhere with prompt + streamed tokens and
num_generated set, so the next token is token index num_generated, sampled with the same
seed: the client's stream goes on with no gap and no repeat. Where it goes: another decode
service (re-prefilled on a prefill service, which streams the KV there), or, with no other
decode service, the prefill service decodes too (degraded). A damaged KV stream (DATA_LOSS)
is sent once more to the same decode service. `--migrate false` ends such a request with
UNAVAILABLE instead.
"""

from __future__ import annotations

import asyncio
import itertools
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
from edgellm.rpc.convert import FAILED_SERVICE_KEY, WIRE_TO_FINISH
from edgellm.v1 import common_pb2, decode_pb2, decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc, monitor_pb2
from edgellm.v1 import prefill_pb2, prefill_pb2_grpc
from services.gateway.pools import AdmissionError, Pools
from services.gateway.router import NoRoute, Route, Router
from services.gateway.text import TextStream

log = structlog.get_logger(__name__)
# Upstream failures a request survives by moving elsewhere; other codes go to the client.
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
    decode_pool: str | None = None  # the service streaming its tokens, once past the prefill pool

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
        log.info("request_accepted", num_prompt_tokens=len(prompt_ids), max_new_tokens=req.max_new_tokens)
        try:
            text = TextStream(self.tokenizer, list(request.stop))
            finish = "length"
            first_token_at = None
            tokens = self._tokens(req, context)
            async for token, token_finish in tokens:
                if first_token_at is None:
                    first_token_at = time.monotonic()
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
            if req.decode_pool is None:
                self.pools.leave_prefill()
            else:
                self.pools.leave_decode(req.decode_pool)

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

    # ---- routing and migration -------------------------------------------------------------
    async def _tokens(self, req: Request, context: grpc.aio.ServicerContext) -> AsyncIterator[tuple[int, str | None]]:
        """(token, finish_reason or None) from wherever the routes say, moving the request
        when a service on its path fails."""
        avoid: set[str] = set()  # services that failed this request
        resent = False
        for attempt in itertools.count(1):
            try:
                route = self.router.pick(self.pools.pick_decode, avoid)
            except NoRoute as e:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
            if not route.is_split and self.router.mode != monitor_pb2.ROUTE_MODE_COLOCATED:
                metrics.DEGRADED_REQUESTS.labels("prefill" if route.decode is None else "decode").inc()
            log.info("routed", attempt=attempt, prefill=route.prefill, decode=route.decode, num_sent=len(req.generated))
            streaming = route.decode or route.prefill
            try:
                async for item in self._until_down(self._attempt(req, route, attempt), route):
                    if req.decode_pool != streaming:
                        self._into_decode_pool(req, streaming)
                    yield item
                return
            except PathFailed as e:
                log.warning("path_failed", failed=e.failed, reason=e.reason, details=e.details, num_sent=len(req.generated))
                if e.reason == "stream_error" and e.failed is not None:
                    metrics.FAILURES_DETECTED.labels("stream").inc()
                if not self.cfg.migrate:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, f"generation failed upstream: {e.details}")
                if e.failed is None and resent:  # a second damaged KV stream: stop using that decode service
                    e.failed = route.decode
                resent = resent or e.failed is None
                if e.failed is not None:
                    avoid.add(e.failed)
                metrics.MIGRATIONS.labels(e.reason, "decode" if self._has_decode(avoid) else "prefill").inc()
            except grpc.aio.AioRpcError as e:  # the request itself was refused or ran out of time
                log.warning("upstream_failed", code=e.code().name, details=e.details())
                await context.abort(e.code(), f"generation failed upstream: {e.details()}")

    def _has_decode(self, avoid: set[str]) -> bool:
        return any(a not in avoid for a in self.router.table.decode_addresses) and self.router.mode in (
            monitor_pb2.ROUTE_MODE_NORMAL, monitor_pb2.ROUTE_MODE_NO_PREFILL)

    def _into_decode_pool(self, req: Request, address: str) -> None:
        """First token: from the prefill pool to a decode pool; after a migration, to the new one."""
        if req.decode_pool is None:
            self.pools.leave_prefill()
        else:
            self.pools.leave_decode(req.decode_pool)
        self.pools.enter_decode(address)
        req.decode_pool = address

    async def _until_down(self, items: AsyncIterator[tuple[int, str | None]], route: Route):
        """items, until the monitor marks a service the request depends on down: then PathFailed.
        A hung service (SIGSTOP, a cut link) keeps its TCP connection open and never fails a stream.
        On a split route the prefill service matters only until the first token."""
        signals = {asyncio.ensure_future(self.router.down_signal(a).wait()): a for a in (route.prefill, route.decode) if a}
        step: asyncio.Future | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(items))
                done, _ = await asyncio.wait([step, *signals], return_when=asyncio.FIRST_COMPLETED)
                if step not in done:
                    down = signals[next(iter(done))]
                    raise PathFailed(down, "monitor_verdict", f"the monitor marked {down} down")
                try:
                    item = step.result()
                except StopAsyncIteration:
                    return
                if route.is_split:  # the KV is at decode now: only decode matters
                    for signal in [f for f, a in signals.items() if a == route.prefill]:
                        signal.cancel()
                        del signals[signal]
                yield item
        finally:
            for signal in signals:
                signal.cancel()
            if step is not None and not step.done():
                step.cancel()  # cancels the upstream call
                await asyncio.wait([step])
            await items.aclose()

    def _attempt(self, req: Request, route: Route, attempt: int) -> AsyncIterator[tuple[int, str | None]]:
        # Each attempt has its own upstream id: a decode service never mixes KV of two attempts.
        upstream_id = req.request_id if attempt == 1 else f"{req.request_id}/{attempt}"
        if route.is_split:
            return self._split(req, upstream_id, route.prefill, route.decode)
        if route.prefill is not None:
            return self._local(req, upstream_id, route.prefill, prefill_pb2_grpc.PrefillStub)
        return self._local(req, upstream_id, route.decode, decode_pb2_grpc.DecodeStub)

    async def _split(self, req: Request, upstream_id: str, prefill_address: str, decode_address: str):
        """Prefill there (it streams the KV to decode_address), then decode here."""
        # After a migration, what the client already has is context. Both are fixed now: the
        # caller appends each token this yields to req.generated.
        tokens, num_generated = req.prompt_token_ids + req.generated, len(req.generated)
        prefill = prefill_pb2_grpc.PrefillStub(self.channels.get(prefill_address))
        try:
            reply = await prefill.Prefill(
                prefill_pb2.PrefillRequest(
                    request_id=upstream_id,
                    prompt_token_ids=tokens,
                    sampling=req.sampling,
                    decode_address=decode_address,
                    max_new_tokens=req.max_new_tokens,
                    num_generated=num_generated,
                ),
                timeout=req.timeout(),
            )
        except grpc.aio.AioRpcError as e:
            blamed = dict(e.trailing_metadata() or ()).get(FAILED_SERVICE_KEY)
            if e.code() == grpc.StatusCode.DATA_LOSS:
                blamed = None  # a damaged KV stream: send it again
            elif blamed is None:
                blamed = prefill_address
            raise path_failed(e, blamed) from e
        finish = WIRE_TO_FINISH.get(reply.finish_reason)
        yield reply.first_token_id, finish
        if finish is not None:
            return
        decode = decode_pb2_grpc.DecodeStub(self.channels.get(decode_address))
        call = decode.Decode(
            decode_pb2.DecodeRequest(
                request_id=upstream_id,
                sampling=req.sampling,
                max_new_tokens=req.max_new_tokens,
                prompt_token_ids=tokens,
                num_generated=num_generated,
            ),
            timeout=req.timeout(),
        )
        try:
            async for delta in call:
                for token in delta.token_ids:
                    yield token, WIRE_TO_FINISH.get(delta.finish_reason)
        except grpc.aio.AioRpcError as e:
            raise path_failed(e, decode_address) from e
        finally:
            call.cancel()  # no-op when finished; otherwise decode frees the sequence now

    async def _local(self, req: Request, upstream_id: str, address: str, stub_type: type):
        """One engine runs the whole request (degraded, no-prefill or colocated), or its rest."""
        call = stub_type(self.channels.get(address)).GenerateLocal(
            common_pb2.GenerateLocalRequest(
                request_id=upstream_id,
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
        except grpc.aio.AioRpcError as e:
            raise path_failed(e, address) from e
        finally:
            call.cancel()


class PathFailed(Exception):
    """A service on the request's path failed: `failed` is the one to avoid (None: try it again)."""

    def __init__(self, failed: str | None, reason: str, details: str) -> None:
        super().__init__(details)
        self.failed, self.reason, self.details = failed, reason, details


def path_failed(e: grpc.aio.AioRpcError, blamed: str | None) -> Exception:
    """A PathFailed for a failure the request survives elsewhere; the error itself (passed on
    to the client) when the request is at fault or out of time."""
    if e.code() not in RESUMABLE:
        return e
    return PathFailed(blamed, "kv_rejected" if e.code() == grpc.StatusCode.DATA_LOSS else "stream_error",
                      f"{e.code().name}: {e.details()}")
