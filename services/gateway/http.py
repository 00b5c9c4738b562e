"""The gateway's OpenAI-compatible HTTP API (aiohttp), on the gateway's own event loop.

A second face over the same request pipeline as the gRPC servicer (never a client of the
gRPC port):
  POST /v1/chat/completions, POST /v1/completions   body -> GenerateInput (openai_format.py)
      -> pipeline events -> one JSON object, or server-sent events ending in `data: [DONE]`
  GET  /v1/models                                    the one model this gateway serves
  GET  /health                                       200 while the gateway has a route (the
                                                     rule of its gRPC health), else 503
Lifecycle of a streamed request: auth and rate limits (in the pipeline) -> the first event
is awaited before any byte is sent, so a request refused before generating gets its real
status (400, 401, 429, 503, 504) with OpenAI's error body -> one chunk per text delta -> a
chunk with finish_reason -> the usage chunk (stream_options.include_usage) -> [DONE]. An
error after the first byte is sent as one `data: {"error": ...}` event before [DONE].
A client that disconnects cancels its handler (handler_cancellation), which closes the
pipeline's stream: the upstream call is cancelled and the engine frees the request's KV.
With --api-keys-file every route but /health needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Callable, Collection

import grpc
import structlog
from aiohttp import web

from edgellm import metrics
from edgellm.rpc.security import bearer_key, contains
from services.gateway import errors
from services.gateway.openai_format import ModelNotFound, OpenAIRequest, Reply, parse_chat, parse_completion
from services.gateway.pipeline import Pipeline
from services.gateway.request import Caller, Finished
from services.gateway.servicer import status_code

log = structlog.get_logger(__name__)

SHUTDOWN_TIMEOUT_S = 5.0
# gRPC status (of a pipeline error) -> HTTP status and OpenAI error type
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: (400, "invalid_request_error"),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "server_busy"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}
SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"


def _dumps(body: Any) -> str:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def error_response(status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                   headers: dict[str, str] | None = None) -> web.Response:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return web.Response(status=status, text=_dumps(body), content_type="application/json", headers=headers)


def _error_parts(e: errors.GatewayError) -> tuple[int, dict[str, Any], dict[str, str]]:
    """(HTTP status, the error object, headers) of a pipeline error."""
    if isinstance(e, ModelNotFound):
        return 404, {"message": e.message, "type": "invalid_request_error", "param": "model",
                     "code": "model_not_found"}, {}
    if isinstance(e, errors.RateLimited):
        kind = "tokens" if e.limit == "rate_limit_tpm" else "requests"
        return 429, {"message": e.message, "type": kind, "param": None, "code": "rate_limit_exceeded"}, e.headers
    status, type_ = HTTP_STATUS.get(status_code(e), (500, "server_error"))
    headers = {"retry-after": "1"} if status == 429 else {}
    return status, {"message": e.message, "type": type_, "param": getattr(e, "param", None), "code": None}, headers


@web.middleware
async def openai_http_errors(request: web.Request, handler: Callable) -> web.StreamResponse:
    """aiohttp's own refusals (unknown route, wrong method) in OpenAI's error shape."""
    try:
        return await handler(request)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, f"{e.reason}: {request.method} {request.path}", "invalid_request_error")


class HttpApi:
    """The HTTP face of one gateway process: `start` listens, `stop` closes (both on the gateway's loop)."""

    def __init__(self, pipeline: Pipeline, model_id: str, api_keys: Collection[str], is_ready: Callable[[], bool],
                 max_body_bytes: int) -> None:
        self.pipeline = pipeline
        self.model_id = model_id
        self.api_keys = api_keys
        self.is_ready = is_ready
        self.app = web.Application(client_max_size=max_body_bytes, middlewares=[openai_http_errors])
        self.app.add_routes([
            web.post("/v1/chat/completions", self.chat_completions),
            web.post("/v1/completions", self.completions),
            web.get("/v1/models", self.models),
            web.get("/health", self.health),
        ])
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen on host:port; raises OSError when the port is taken."""
        self._runner = web.AppRunner(self.app, handler_cancellation=True, access_log=None,
                                     shutdown_timeout=SHUTDOWN_TIMEOUT_S)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, reuse_port=False).start()
        log.info("http_listening", address=f"{host}:{port}", authenticated=bool(self.api_keys))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- the routes ------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        if self.is_ready():
            return web.json_response({"status": "ok"})
        return web.json_response({"status": "no route: no healthy prefill or decode service"}, status=503)

    async def models(self, request: web.Request) -> web.Response:
        if (refused := self._authenticate(request)) is not None:
            return refused
        model = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "edgellm"}
        return web.json_response({"object": "list", "data": [model]})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_chat)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, parse_completion)

    # ---- one generation --------------------------------------------------------------------

    def _authenticate(self, request: web.Request) -> web.Response | None:
        """None when the request may pass; the 401 response otherwise."""
        if not self.api_keys:
            return None
        key = bearer_key(request.headers.get("Authorization", ""))
        if key and contains(self.api_keys, key):
            return None
        return error_response(401, "an API key is needed: header `Authorization: Bearer <key>`",
                              "invalid_request_error", code="invalid_api_key")

    def _caller(self, request: web.Request) -> Caller:
        key = bearer_key(request.headers.get("Authorization", "")) if self.api_keys else ""
        return Caller.of(key, request.remote or "")

    async def _generate(self, request: web.Request, parse: Callable[[Any, str], OpenAIRequest]) -> web.StreamResponse:
        if (refused := self._authenticate(request)) is not None:
            return refused
        try:
            body = await request.json()
        except web.HTTPException as e:  # a body over client_max_size
            return error_response(e.status, e.reason, "invalid_request_error")
        except ValueError:
            return error_response(400, "the request body is not valid JSON", "invalid_request_error")
        caller = self._caller(request)
        try:
            parsed = parse(body, self.model_id)
        except errors.GatewayError as e:  # FieldError (400 naming the field), ModelNotFound (404)
            return self._error(e)
        events = self.pipeline.generate(parsed.inp, None, caller)
        async with contextlib.aclosing(events):
            try:
                first = await anext(events)
            except errors.GatewayError as e:
                return self._error(e)
            except asyncio.CancelledError:
                metrics.ERRORS.labels(grpc.StatusCode.CANCELLED.name).inc()
                raise
            headers = self.pipeline.limiter.budget(caller.id).headers() if self.pipeline.limiter.enabled else {}
            reply = Reply(parsed.kind, first.request_id, self.model_id)
            if parsed.stream:
                return await self._stream(request, parsed, reply, first, events, headers)
            return await self._whole(reply, first, events, headers)

    def _error(self, e: errors.GatewayError) -> web.Response:
        status, error, headers = _error_parts(e)
        metrics.ERRORS.labels(status_code(e).name).inc()
        return web.Response(status=status, text=_dumps({"error": error}), content_type="application/json",
                            headers=headers)

    async def _whole(self, reply: Reply, event: Any, events: Any, headers: dict[str, str]) -> web.Response:
        parts: list[str] = []
        try:
            while not isinstance(event, Finished):
                parts.append(event.text)
                event = await anext(events)
        except errors.GatewayError as e:
            return self._error(e)
        return web.Response(text=_dumps(reply.whole("".join(parts), event.finish_reason, event.usage)),
                            content_type="application/json", headers=headers)

    async def _stream(self, request: web.Request, parsed: OpenAIRequest, reply: Reply, event: Any, events: Any,
                      headers: dict[str, str]) -> web.StreamResponse:
        response = web.StreamResponse(headers={**SSE_HEADERS, **headers})
        await response.prepare(request)

        async def send(body: dict[str, Any]) -> None:
            await response.write(b"data: " + _dumps(body).encode() + b"\n\n")

        try:
            first = parsed.kind == "chat"  # the chat stream opens with the assistant role
            while not isinstance(event, Finished):
                if event.text or first:
                    await send(reply.chunk(event.text, first=first))
                    first = False
                event = await anext(events)
            await send(reply.chunk("", event.finish_reason))
            if parsed.include_usage:
                await send(reply.usage_chunk(event.usage))
        except errors.GatewayError as e:
            status, error, _ = _error_parts(e)
            metrics.ERRORS.labels(status_code(e).name).inc()
            await send({"error": {**error, "code": error["code"] or status}})
        except asyncio.CancelledError:  # the client went away (handler_cancellation): the pipeline unwinds
            metrics.ERRORS.labels(grpc.StatusCode.CANCELLED.name).inc()
            raise
        except ConnectionResetError:  # went away as we wrote: leaving closes the pipeline's stream
            metrics.ERRORS.labels(grpc.StatusCode.CANCELLED.name).inc()
            return response
        await response.write(DONE)
        await response.write_eof()
        return response
