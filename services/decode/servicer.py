"""Decode servicer.

PushKV(stream KVChunk): prefill streams a request's prompt KV here, layer by layer, while
its forward pass runs. The KVStore verifies and assembles it; the ack carries arrival
timestamps so overlap with prefill can be measured.

Decode(request): claims the request's KV (waiting for it if it is still arriving), joins
the engine's running batch and streams tokens 2, 3, ... back to the gateway. A client
that goes away removes the sequence at the next step.

GenerateLocal(request): no prefill service is healthy, so this service prefills too.

Pipeline-parallel decode (--decode-stages N > 1): this is stage 0. It holds only its layers'
KV; Decode admits a request once every other stage holds its layers' KV too (StageControl), and
GetLoad lists every stage (Load.stages) so that prefill pushes each layer's KV to its owner.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc
import structlog

from edgellm import metrics
from edgellm.config import TransferConfig
from edgellm.engine.loop import EngineLoop
from edgellm.logs import bind_request
from edgellm.parallel.control import StageControl, StageKVMissing
from edgellm.rpc.load import engine_load
from edgellm.rpc.convert import check_spec, status_for, token_deltas
from edgellm.transfer import codec
from edgellm.rpc.local import generate_local
from edgellm.transfer.codec import ChunkError
from edgellm.transfer.receiver import InvalidKV, KVExists, KVStore, KVStoreFull
from edgellm.v1 import common_pb2, decode_pb2, decode_pb2_grpc

log = structlog.get_logger(__name__)

PUSH_KV_STATUS = (
    (ChunkError, grpc.StatusCode.DATA_LOSS),
    (InvalidKV, grpc.StatusCode.INVALID_ARGUMENT),
    (KVExists, grpc.StatusCode.ALREADY_EXISTS),
    (KVStoreFull, grpc.StatusCode.RESOURCE_EXHAUSTED),
)
PUSH_KV_ERRORS = tuple(cls for cls, _ in PUSH_KV_STATUS)


async def push_kv(store: KVStore, request_iterator: AsyncIterator[decode_pb2.KVChunk],
                  context: grpc.aio.ServicerContext) -> decode_pb2.KVAck:
    """One PushKV stream into `store` (the decode service's, or a pipeline stage's)."""
    try:
        received = await store.receive(request_iterator)
    except PUSH_KV_ERRORS as e:
        # damaged in transit: DATA_LOSS (sent once more); declared sizes or ids this service
        # will not hold: INVALID_ARGUMENT; an id already here: ALREADY_EXISTS; full: RESOURCE_EXHAUSTED
        code = status_for(e, PUSH_KV_STATUS)
        metrics.KV_REJECTED.inc()
        log.warning("kv_rejected", reason=str(e), code=code.name)
        await context.abort(code, f"KV stream rejected: {e}")
    metrics.KV_BYTES_RECEIVED.inc(received.num_bytes)
    log.info("kv_received", request_id=received.request_id, num_chunks=received.num_chunks, num_bytes=received.num_bytes)
    return decode_pb2.KVAck(
        request_id=received.request_id,
        num_chunks=received.num_chunks,
        num_bytes=received.num_bytes,
        first_chunk_received_unix_ns=received.first_chunk_received_unix_ns,
        last_chunk_received_unix_ns=received.last_chunk_received_unix_ns,
    )


class DecodeServicer(decode_pb2_grpc.DecodeServicer):
    def __init__(self, engine: EngineLoop, store: KVStore, transfer: TransferConfig,
                 stages: StageControl | None = None, own_stage: common_pb2.DecodeStage | None = None) -> None:
        """stages, own_stage: stage 0 of a pipeline-parallel unit (--decode-stages N > 1): its
        other stages, and what this process owns (for Load.stages)."""
        self.engine = engine
        self.store = store
        self.transfer = transfer
        self.stages, self.own_stage = stages, own_stage

    async def PushKV(
        self, request_iterator: AsyncIterator[decode_pb2.KVChunk], context: grpc.aio.ServicerContext
    ) -> decode_pb2.KVAck:
        return await push_kv(self.store, request_iterator, context)

    async def Decode(
        self, request: decode_pb2.DecodeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.TokenDelta]:
        spec = request.spec
        bind_request(spec.request_id)
        sampling = await check_spec(context, spec, self.engine)
        if spec.max_new_tokens < spec.num_generated + 2:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "max_new_tokens must be >= num_generated + 2 (prefill samples the next token)",
            )
        try:
            received = await self.store.claim(spec.request_id, self.transfer.kv_wait_timeout_s)
        except asyncio.TimeoutError:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"no complete KV for {spec.request_id!r} after {self.transfer.kv_wait_timeout_s}s",
            )
        if len(spec.prompt_token_ids) != received.num_prompt_tokens:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"prompt_token_ids has {len(spec.prompt_token_ids)} tokens, the KV {received.num_prompt_tokens}",
            )
        if received.prompt_digest != codec.prompt_digest(spec.prompt_token_ids):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the KV held for {spec.request_id!r} was computed from another prompt")
        if self.stages is not None:  # every other stage must hold its layers' KV before the engine takes it
            try:
                await self.stages.claim_kv(spec.request_id, self.transfer.kv_wait_timeout_s)
            except StageKVMissing as e:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
            except RuntimeError as e:  # a stage is down: another decode unit may take the request
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        tokens = self.engine.generate(
            spec.request_id,
            [*spec.prompt_token_ids, received.first_token_id],
            sampling,
            spec.max_new_tokens,
            num_generated=spec.num_generated + 1,
            staged_kv=(received.k, received.v),
        )
        async for delta in token_deltas(spec.request_id, tokens, context):
            yield delta

    async def GenerateLocal(
        self, request: common_pb2.GenerateLocalRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.TokenDelta]:
        async for delta in generate_local(self.engine, request, context):
            yield delta

    async def GetLoad(self, request: common_pb2.GetLoadRequest, context: grpc.aio.ServicerContext) -> common_pb2.Load:
        load = engine_load(self.engine)
        if self.stages is not None:
            load.stages.extend(self.stages.stages(self.own_stage))
        return load
