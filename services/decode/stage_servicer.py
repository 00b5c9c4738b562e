"""PipelineStage servicer: stage k >= 1 of a pipeline-parallel decode unit.

Lifecycle of a FROM_KV request here: prefill streams this stage's layers of its prompt KV
(Decode.PushKV, StageKVServicer, into this stage's KVStore) -> stage 0's Decode call asks every stage to claim it
(ClaimKV: out of the store, held here by request id) -> the engine step on stage 0 that admits the
request names it with its slots (StageStep.kv_loads) -> it is copied into this stage's cache
right before that step's layers run. Claimed KV that no step loads (its request ended on stage
0 first) expires after the store's TTL, or goes at the next Reset.

Steps run one at a time on one thread (the model never runs on the event loop), in the order
they arrive.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

import grpc
import structlog
import torch

from edgellm.parallel.stages import KV, StageRunner
from edgellm.transfer.receiver import KVStore
from edgellm.v1 import common_pb2, decode_pb2, decode_pb2_grpc, decode_stage_pb2, decode_stage_pb2_grpc
from services.decode.servicer import push_kv

log = structlog.get_logger(__name__)


class StageKVServicer(decode_pb2_grpc.DecodeServicer):
    """The one Decode RPC a stage serves: prefill's PushKV of this stage's layers (its KVStore
    holds only those). The others stay UNIMPLEMENTED: requests go to stage 0."""

    def __init__(self, store: KVStore) -> None:
        self.store = store

    async def PushKV(self, request_iterator: AsyncIterator[decode_pb2.KVChunk],
                     context: grpc.aio.ServicerContext) -> decode_pb2.KVAck:
        return await push_kv(self.store, request_iterator, context)


class StageServicer(decode_stage_pb2_grpc.PipelineStageServicer):
    def __init__(self, runner: StageRunner, store: KVStore, describe: common_pb2.DecodeStage, num_threads: int,
                 claimed_ttl_s: float) -> None:
        self.runner, self.store, self.describe = runner, store, describe
        self.claimed_ttl_s = claimed_ttl_s
        self._claimed: dict[str, tuple[KV, float]] = {}  # request id -> (its KV here, when claimed)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="stage-engine",
                                            initializer=torch.set_num_threads, initargs=(max(1, num_threads),))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def Describe(self, request: decode_stage_pb2.DescribeStageRequest,
                       context: grpc.aio.ServicerContext) -> common_pb2.DecodeStage:
        return self.describe

    async def Step(self, request: decode_stage_pb2.StageStep,
                   context: grpc.aio.ServicerContext) -> decode_stage_pb2.StageResult:
        loads = []
        for load in request.kv_loads:
            held = self._claimed.pop(load.request_id, None)
            if held is None:
                await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"step {request.step_id}: no claimed KV for {load.request_id!r} here")
            loads.append((held[0], list(load.slots)))
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, self.runner.step, request, loads)
        except (ValueError, RuntimeError, IndexError) as e:
            log.exception("stage_step_failed", step_id=request.step_id)
            await context.abort(grpc.StatusCode.INTERNAL, f"step {request.step_id} failed: {type(e).__name__}: {e}")

    async def ClaimKV(self, request: decode_stage_pb2.ClaimStageKVRequest,
                      context: grpc.aio.ServicerContext) -> decode_stage_pb2.ClaimStageKVReply:
        self._expire()
        try:
            received = await self.store.claim(request.request_id, max(0.0, request.wait_s))
        except asyncio.TimeoutError:
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"no complete KV for {request.request_id!r} after {request.wait_s:g}s")
        self._claimed[request.request_id] = ((received.k, received.v), time.monotonic())
        return decode_stage_pb2.ClaimStageKVReply(request_id=request.request_id,
                                                  num_prompt_tokens=received.num_prompt_tokens)

    async def Reset(self, request: decode_stage_pb2.ResetStageRequest,
                    context: grpc.aio.ServicerContext) -> decode_stage_pb2.ResetStageReply:
        self._claimed.clear()
        log.info("stage_reset")
        return decode_stage_pb2.ResetStageReply()

    def _expire(self) -> None:
        now = time.monotonic()
        for rid in [r for r, (_, t) in self._claimed.items() if now - t > self.claimed_ttl_s]:
            del self._claimed[rid]
