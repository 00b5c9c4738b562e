"""Async and sync clients for the Gateway's Generate stream."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterator, Mapping, Sequence

import grpc

from edgellm.v1 import gateway_pb2, gateway_pb2_grpc


API_KEY_ENV = "EDGELLM_API_KEY"


def _auth_metadata(api_key: str | None) -> tuple[tuple[str, str], ...]:
    """`authorization: Bearer <key>` for a gateway with --api-keys-file; the key defaults to $EDGELLM_API_KEY."""
    key = os.environ.get(API_KEY_ENV, "") if api_key is None else api_key
    return (("authorization", f"Bearer {key}"),) if key else ()


class GenerationError(RuntimeError):
    """The gateway ended the stream with an error status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code, self.details = code, details


@dataclass(frozen=True)
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str = ""  # set on the last delta only
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0
    request_id: str = ""


@dataclass(frozen=True)
class Completion:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float = 0.0
    tpot_ms: float = 0.0


def build_request(
    prompt: str | None = None,
    messages: Sequence[Mapping[str, str]] | None = None,
    *,
    max_tokens: int = 0,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    request_id: str = "",
) -> gateway_pb2.GenerateRequest:
    if (prompt is None) == (messages is None):
        raise ValueError("give exactly one of prompt or messages")
    request = gateway_pb2.GenerateRequest(
        prompt=prompt or "",
        messages=[gateway_pb2.ChatMessage(role=m["role"], content=m["content"]) for m in messages or ()],
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        stop=list(stop),
        request_id=request_id,
    )
    if seed is not None:
        request.seed = seed
    return request


def _delta(r: gateway_pb2.GenerateResponse) -> Delta:
    return Delta(
        text=r.text,
        token_ids=list(r.token_ids),
        finish_reason=r.finish_reason,
        prompt_tokens=r.usage.prompt_tokens,
        completion_tokens=r.usage.completion_tokens,
        ttft_ms=r.timings.ttft_ms,
        tpot_ms=r.timings.tpot_ms,
        request_id=r.request_id,
    )


def _collect(deltas: list[Delta]) -> Completion:
    last = deltas[-1] if deltas else Delta("", [])
    return Completion(
        text="".join(d.text for d in deltas),
        token_ids=[t for d in deltas for t in d.token_ids],
        finish_reason=last.finish_reason,
        prompt_tokens=last.prompt_tokens,
        completion_tokens=last.completion_tokens,
        ttft_ms=last.ttft_ms,
        tpot_ms=last.tpot_ms,
    )


class AsyncClient:
    """timeout_s: each call's deadline. wait_for_ready: a call made while the gateway is not
    reachable yet (still starting) waits for it, within that deadline, instead of failing at once
    with UNAVAILABLE; leave it off without a deadline, or such a call may wait forever.
    api_key: sent as `authorization: Bearer <key>` (a gateway with --api-keys-file); None = the
    EDGELLM_API_KEY variable, if set."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout_s: float | None = None,
                 wait_for_ready: bool = False, api_key: str | None = None) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._timeout_s = timeout_s
        self._wait_for_ready = wait_for_ready
        self._metadata = _auth_metadata(api_key)

    async def generate(self, prompt: str | None = None, **kwargs) -> AsyncIterator[Delta]:
        """Yield text deltas as they are generated; the last one carries finish_reason and usage."""
        call = self._stub.Generate(build_request(prompt, **kwargs), timeout=self._timeout_s,
                                   wait_for_ready=self._wait_for_ready, metadata=self._metadata)
        try:
            async for response in call:
                yield _delta(response)
        except grpc.aio.AioRpcError as e:
            raise GenerationError(e.code(), e.details()) from None

    async def generate_text(self, prompt: str | None = None, **kwargs) -> Completion:
        return _collect([d async for d in self.generate(prompt, **kwargs)])

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class Client:
    """The blocking twin of AsyncClient (same arguments)."""

    def __init__(self, target: str = "127.0.0.1:50051", timeout_s: float | None = None,
                 wait_for_ready: bool = False, api_key: str | None = None) -> None:
        self._channel = grpc.insecure_channel(target)
        self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        self._timeout_s = timeout_s
        self._wait_for_ready = wait_for_ready
        self._metadata = _auth_metadata(api_key)

    def generate(self, prompt: str | None = None, **kwargs) -> Iterator[Delta]:
        """Yield text deltas as they are generated; the last one carries finish_reason and usage."""
        call = self._stub.Generate(build_request(prompt, **kwargs), timeout=self._timeout_s,
                                   wait_for_ready=self._wait_for_ready, metadata=self._metadata)
        try:
            for response in call:
                yield _delta(response)
        except grpc.RpcError as e:
            raise GenerationError(e.code(), e.details()) from None
        finally:
            call.cancel()  # no-op when finished; stops generation when the caller breaks early

    def generate_text(self, prompt: str | None = None, **kwargs) -> Completion:
        return _collect(list(self.generate(prompt, **kwargs)))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
