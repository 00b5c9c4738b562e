"""The gateway's calls to the engine services: one attempt at (the rest of) a request.

  split route   Prefill on the prefill service, which streams the KV to the decode service
                and returns the first token; then Decode on that decode service streams the
                rest.
  local route   GenerateLocal on one engine (prefill or decode service) streams every token.
Both end in the same loop over a TokenDelta stream. An attempt yields (token, finish_reason or
None) and fails with PathFailed when a service on its path failed in a way the request
survives elsewhere (migration.py decides where), or with UpstreamError when the request
itself was refused or ran out of time there. Closing the iterator cancels the upstream call,
which frees the request's KV at the engine's next step.

An attempt resumes after what the client already has: prompt + generated tokens go up as
context with num_generated set, so the engine's next token is token index num_generated,
sampled with the request's seed. The internal request messages are built in one place below.
"""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

import grpc

from edgellm.rpc.channels import ChannelPool
from edgellm.rpc.convert import FAILED_SERVICE_KEY, WIRE_TO_FINISH
from edgellm.v1 import common_pb2, decode_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from services.gateway.errors import UpstreamError
from services.gateway.liveness import LivenessProber
from services.gateway.request import Request
from services.gateway.router import Route

# Upstream failures a request survives by moving elsewhere; other codes go to the client.
# RESOURCE_EXHAUSTED is "busy now" (another engine may take it); a request larger than any KV
# cache comes back as OUT_OF_RANGE and goes to the client at once, like INVALID_ARGUMENT.
RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.FAILED_PRECONDITION,
             grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED)

Tokens = AsyncIterator[tuple[int, str | None]]


class PathFailed(Exception):
    """A service on the request's path failed: `failed` is the one to avoid (None: try it again)."""

    def __init__(self, failed: str | None, reason: str, details: str) -> None:
        super().__init__(details)
        self.failed, self.reason, self.details = failed, reason, details


# ---- the internal request messages ------------------------------------------------------------
# Each takes the request as it stands when the attempt starts (req.generated grows while
# tokens stream, so an attempt builds all its messages before its first token).


def request_spec(req: Request, upstream_id: str) -> common_pb2.RequestSpec:
    """The request as every internal call carries it: prompt + the tokens already streamed."""
    s = req.sampling
    return common_pb2.RequestSpec(
        request_id=upstream_id,
        prompt_token_ids=req.prompt_token_ids + req.generated,
        sampling=common_pb2.SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=req.seed),
        max_new_tokens=req.max_new_tokens,
        num_generated=len(req.generated),
    )


def prefill_request(req: Request, upstream_id: str, decode_address: str) -> prefill_pb2.PrefillRequest:
    return prefill_pb2.PrefillRequest(spec=request_spec(req, upstream_id), decode_address=decode_address)


def decode_request(req: Request, upstream_id: str) -> decode_pb2.DecodeRequest:
    return decode_pb2.DecodeRequest(spec=request_spec(req, upstream_id))


def local_request(req: Request, upstream_id: str) -> common_pb2.GenerateLocalRequest:
    return common_pb2.GenerateLocalRequest(spec=request_spec(req, upstream_id))


# ---- the calls ------------------------------------------------------------------------------


class Upstream:
    """Runs attempts over the process's shared channels."""

    def __init__(self, channels: ChannelPool, prober: LivenessProber, label_ids: bool = False) -> None:
        """prober: watches the token streams read here (liveness.py). label_ids (with --kv-fault-injection
        only): internal ids start with the client's label, so that the fault switch, keyed by id,
        can pick a request (still unique: the uuid follows)."""
        self.channels = channels
        self.prober = prober
        self.label_ids = label_ids

    def _base_id(self, req: Request) -> str:
        """The request's internal id; attempt n > 1 appends "/n" (prefill's backup.py keys by this base)."""
        label = req.request_id.replace("/", "_")  # "/" separates the attempt
        return f"{label}.{req.upstream_id}" if self.label_ids else req.upstream_id

    def attempt(self, req: Request, route: Route, attempt: int) -> Tokens:
        """The tokens of one attempt along `route` (attempt counts from 1)."""
        # Each attempt has its own internal id, made by the gateway and never the client's label: a
        # decode service never mixes KV of two attempts, nor of two requests with one request_id.
        base = self._base_id(req)
        upstream_id = base if attempt == 1 else f"{base}/{attempt}"
        if route.is_split:
            return self._split(req, upstream_id, route.prefill, route.decode)
        if route.prefill is not None:
            stub = prefill_pb2_grpc.PrefillStub(self.channels.get(route.prefill))
            return self._local(req, upstream_id, route.prefill, stub.GenerateLocal)
        stub = decode_pb2_grpc.DecodeStub(self.channels.get(route.decode))
        return self._local(req, upstream_id, route.decode, stub.GenerateLocal)

    async def _split(self, req: Request, upstream_id: str, prefill_address: str, decode_address: str) -> Tokens:
        """Prefill there (it streams the KV to decode_address), then decode here."""
        prefill_msg = prefill_request(req, upstream_id, decode_address)
        decode_msg = decode_request(req, upstream_id)
        prefill = prefill_pb2_grpc.PrefillStub(self.channels.get(prefill_address))
        try:
            # Not probed: a long prompt on a loaded machine can keep the prefill service's event
            # loop from answering in time, and the monitor finds a hung prefill service soon enough.
            reply = await prefill.Prefill(prefill_msg, timeout=req.timeout())
        except grpc.aio.AioRpcError as e:
            blamed = dict(e.trailing_metadata() or ()).get(FAILED_SERVICE_KEY)
            if e.code() == grpc.StatusCode.DATA_LOSS:
                blamed = None  # a damaged KV stream: send it again
            elif blamed is None:
                blamed = prefill_address
            raise _failure(e, blamed) from e
        finish = WIRE_TO_FINISH.get(reply.finish_reason)
        yield reply.first_token_id, finish
        if finish is not None:
            return
        decode = decode_pb2_grpc.DecodeStub(self.channels.get(decode_address))
        call = decode.Decode(decode_msg, timeout=req.timeout())
        async with contextlib.aclosing(self._token_stream(call, decode_address)) as items:
            async for item in items:
                yield item

    async def extend_backup(self, req: Request, prefill_address: str) -> int:
        """Ask the prefill service holding the request's kept KV to extend it with the tokens
        streamed so far; returns how many tokens it now keeps."""
        stub = prefill_pb2_grpc.PrefillStub(self.channels.get(prefill_address))
        reply = await stub.ExtendBackup(prefill_pb2.ExtendBackupRequest(spec=request_spec(req, self._base_id(req))),
                                        timeout=req.timeout())
        return reply.num_kept_tokens

    def _local(self, req: Request, upstream_id: str, address: str, generate_local) -> Tokens:
        """One engine runs the whole request (degraded, no-prefill or colocated), or its rest."""
        return self._token_stream(generate_local(local_request(req, upstream_id), timeout=req.timeout()), address)

    async def _token_stream(self, call: grpc.aio.UnaryStreamCall, address: str) -> Tokens:
        """The tokens of a TokenDelta stream from `address`; the finish reason comes with the last one."""
        try:
            with self.prober.watch(address):
                async for delta in call:
                    self.prober.heard_from(address)
                    finish = WIRE_TO_FINISH.get(delta.finish_reason)
                    for i, token in enumerate(delta.token_ids):
                        yield token, finish if i == len(delta.token_ids) - 1 else None
        except grpc.aio.AioRpcError as e:
            raise _failure(e, address) from e
        finally:
            call.cancel()  # no-op when finished; otherwise the engine frees the sequence now


def _failure(e: grpc.aio.AioRpcError, blamed: str | None) -> Exception:
    """PathFailed for a failure the request survives elsewhere; UpstreamError (passed on to the
    client) when the request is at fault or out of time."""
    if e.code() not in RESUMABLE:
        return UpstreamError(e.code(), e.details() or "")
    details = e.details() or ""
    return PathFailed(blamed, "kv_rejected" if e.code() == grpc.StatusCode.DATA_LOSS else "stream_error",
                      f"{e.code().name}: {details}")
