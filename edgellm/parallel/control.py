"""Stage 0's asyncio side of a pipeline-parallel decode unit: what it tells and asks the other
stages outside engine steps.

  connect     at start-up, wait until every stage answers Describe and owns the layers the
              config gives it (stages.stage_plan); only then does stage 0's engine warm up through them
  claim_kv    before a FROM_KV request joins the engine, every stage takes that request's KV
              of its layers out of its arrival store (PushKV from prefill) and holds it for the
              step that loads it; a stage without it fails the request before it costs a step
  readiness   the health stream `serve` follows: SERVING while every stage answers; a stage that
              fails a probe (or a step: StagePipeline.fail) makes the unit NOT_SERVING. It
              comes back once every stage answers again and stage 0's engine has let go of every
              sequence of before (their KV may be gone with a restarted stage): then every stage
              is Reset and the pipeline recovers
  stages      the unit's stages for GetLoad (Load.stages), stage 0 first
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

import grpc
import structlog

from edgellm.parallel.pipeline import StagePipeline
from edgellm.rpc.channels import CHANNEL_OPTIONS, liveness_options
from edgellm.rpc.security import ClusterSecurity
from edgellm.v1 import common_pb2, decode_stage_pb2, decode_stage_pb2_grpc

log = structlog.get_logger(__name__)


class StageKVMissing(RuntimeError):
    """A stage has no complete KV of the request (it did not arrive there in time)."""


class StageControl:
    def __init__(self, pipeline: StagePipeline, layer_ranges: list[tuple[int, int]], security: ClusterSecurity,
                 probe_interval_s: float = 0.2, ping_after_ms: int = 100, ping_timeout_ms: int = 300) -> None:
        """layer_ranges: every stage's [start, end), stage 0 first (stages.stage_plan). Probes and
        claims ping a quiet stage like the steps do (channels.liveness_options), so a hung stage
        fails them in well under decode_stage_timeout_s."""
        self.pipeline = pipeline
        self.addresses = pipeline.addresses
        self.layer_ranges = layer_ranges
        self.timeout_s = pipeline.timeout_s
        self.probe_interval_s = probe_interval_s
        options = CHANNEL_OPTIONS + liveness_options(ping_after_ms, ping_timeout_ms)
        self._channels = [security.channel(a, options=options) for a in self.addresses]
        self._stubs = [decode_stage_pb2_grpc.PipelineStageStub(c) for c in self._channels]
        self.described: list[common_pb2.DecodeStage] = [common_pb2.DecodeStage() for _ in self.addresses]
        self.answering = [False] * len(self.addresses)

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    # ---- start-up --------------------------------------------------------------------------
    async def connect(self, log_every_s: float = 5.0) -> None:
        """Return once every stage answers and owns the layers it should (ValueError if not)."""
        loop = asyncio.get_running_loop()
        last_log = loop.time()
        while not all(await self._probe_all()):
            if loop.time() - last_log > log_every_s:
                log.info("waiting_for_decode_stages", stages=[a for a, ok in zip(self.addresses, self.answering) if not ok])
                last_log = loop.time()
            await asyncio.sleep(self.probe_interval_s)
        for k, stage in enumerate(self.described, start=1):
            if (stage.layer_start, stage.layer_end) != self.layer_ranges[k]:
                raise ValueError(f"decode stage {k} ({self.addresses[k - 1]}) owns layers [{stage.layer_start}, "
                                 f"{stage.layer_end}), this unit expects {self.layer_ranges[k]}: do all stages run "
                                 "with the same --model and --decode-stages?")
        await self._reset_all()
        log.info("decode_stages_connected", stages=len(self.addresses) + 1)

    # ---- per request -----------------------------------------------------------------------
    async def claim_kv(self, request_id: str, wait_s: float) -> None:
        """Every stage takes request_id's KV of its layers (waiting up to wait_s for it to arrive).
        Raises StageKVMissing when a stage has none in time, RuntimeError when the unit is down or
        a stage cannot be asked."""
        if self.pipeline.failure is not None:  # a claim now could be wiped by the coming Reset
            raise RuntimeError(f"decode unit is down: {self.pipeline.failure}")
        request = decode_stage_pb2.ClaimStageKVRequest(request_id=request_id, wait_s=wait_s)

        async def claim(k: int, stub) -> None:
            try:
                await stub.ClaimKV(request, timeout=wait_s + self.timeout_s)
            except grpc.aio.AioRpcError as e:
                where = f"decode stage {k} ({self.addresses[k - 1]})"
                if e.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise StageKVMissing(f"{where} has no complete KV for {request_id!r}: {e.details()}") from None
                raise RuntimeError(f"{where} failed ClaimKV: {e.code().name}: {e.details()}") from None

        await asyncio.gather(*(claim(k, stub) for k, stub in enumerate(self._stubs, start=1)))

    # ---- health ----------------------------------------------------------------------------
    async def _probe(self, k: int) -> bool:
        try:
            self.described[k - 1] = await self._stubs[k - 1].Describe(decode_stage_pb2.DescribeStageRequest(),
                                                                      timeout=self.timeout_s)
            return True
        except grpc.aio.AioRpcError:
            return False

    async def _probe_all(self) -> list[bool]:
        self.answering = list(await asyncio.gather(*(self._probe(k) for k in range(1, len(self._stubs) + 1))))
        return self.answering

    async def _reset_all(self) -> None:
        await asyncio.gather(*(stub.Reset(decode_stage_pb2.ResetStageRequest(), timeout=self.timeout_s)
                               for stub in self._stubs))

    async def readiness(self, engine_has_work: Callable[[], bool]) -> AsyncIterator[bool]:
        """Whether the unit can take requests, each time that changes (for `serve`)."""
        serving = True
        yield True
        while True:
            await asyncio.sleep(self.probe_interval_s)
            answering = await self._probe_all()
            for k, ok in enumerate(answering, start=1):
                if not ok:
                    self.pipeline.fail(f"decode stage {k} ({self.addresses[k - 1]}) does not answer")
            if self.pipeline.failure is None:
                continue
            if serving:
                serving = False
                yield False
            if all(answering) and not engine_has_work():
                try:
                    await self._reset_all()
                except grpc.aio.AioRpcError as e:
                    log.warning("decode_stage_reset_failed", error=str(e))
                    continue
                self.pipeline.recover()
                serving = True
                yield True

    def stages(self, own: common_pb2.DecodeStage) -> list[common_pb2.DecodeStage]:
        """Load.stages: stage 0 (`own`) first, then every other stage as last described."""
        out = [own]
        for k, (address, stage) in enumerate(zip(self.addresses, self.described), start=1):
            start, end = self.layer_ranges[k]
            out.append(common_pb2.DecodeStage(address=address, layer_start=start, layer_end=end,
                                              weight_bytes=stage.weight_bytes, device=stage.device,
                                              healthy=self.answering[k - 1] and self.pipeline.failure is None))
        return out
