"""Stage 0 of a pipeline-parallel decode unit: carry each engine step through the other stages.

StagePipeline is the engine's `forward` (runner.py) on stage 0. One call is one engine step:
  split      a decode step's sequences into as many micro-batches as there are stages (a prefill
             batch, or a step that loads newly admitted FROM_KV requests, goes whole)
  stage 0    the embedding and its layers, one micro-batch after the other, on the engine thread
  stages 1+  each micro-batch's hidden states go stage to stage (Step, a unary call per stage,
             from a worker thread), so stage 1 computes micro-batch 0 while stage 0 computes
             micro-batch 1: no stage idles while another holds the step's last micro-batch
  logits     the last stage returns its hidden states; stage 0 applies the final norm and the LM
             head (it holds them: with the default model's tied embedding, the LM head is the
             embedding's table, one copy for both) and the runner samples as always
Stage 0 drives every stage itself (a star, not a chain): for two stages that is the same traffic,
and one place sees every failure. A stage that fails a call, or does not answer within
decode_stage_timeout_s (keepalive pings find a dead peer sooner), fails the step with StageFailed
naming it, and the pipeline stays down (every later step fails at once, so every sequence whose
KV lived on that stage leaves the engine) until StageControl (control.py) sees every stage
answer, resets them and calls recover().
"""

from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import structlog
import torch

from edgellm.engine.kv_cache import ForwardBatch, PagedKVCache
from edgellm.engine.model import LlamaModel
from edgellm.parallel import wire
from edgellm.parallel.layout import split_evenly
from edgellm.rpc.channels import CHANNEL_OPTIONS, liveness_options
from edgellm.rpc.security import ClusterSecurity
from edgellm.v1 import decode_stage_pb2, decode_stage_pb2_grpc

log = structlog.get_logger(__name__)


class StageFailed(RuntimeError):
    """A decode stage failed or did not answer a step: the whole decode unit is down."""


def split_rows(batch: ForwardBatch, num_parts: int) -> list[ForwardBatch]:
    """A decode batch as up to num_parts micro-batches of consecutive sequences (views, no copies)."""
    num_rows = len(batch.cu_seqlens) - 1
    if batch.is_prefill or min(num_parts, num_rows) <= 1:
        return [batch]
    return [
        ForwardBatch(
            token_ids=batch.token_ids[a:b], positions=batch.positions[a:b], is_prefill=False,
            cu_seqlens=list(range(b - a + 1)), slot_mapping=batch.slot_mapping[a:b],
            block_tables=batch.block_tables[a:b], context_lens=batch.context_lens[a:b],
            max_context_len=batch.max_context_len,
        )
        for a, b in split_evenly(num_rows, min(num_parts, num_rows))
    ]


class StagePipeline:
    def __init__(self, model: LlamaModel, addresses: tuple[str, ...], timeout_s: float,
                 security: ClusterSecurity, ping_after_ms: int = 100, ping_timeout_ms: int = 300,
                 stubs: list | None = None) -> None:
        """model: stage 0's (embedding, its layers, final norm and LM head); addresses: stages 1 .. N-1.
        stubs: in-process stand-ins for the stages' PipelineStage stubs (tests)."""
        self.model, self.addresses, self.timeout_s = model, addresses, timeout_s
        self.device = model.norm.weight.device
        self._security = security
        self._options = CHANNEL_OPTIONS + liveness_options(ping_after_ms, ping_timeout_ms)
        self._channels: list[grpc.Channel] = []
        self._stubs = stubs if stubs is not None else self._connect()
        self.num_micro_batches = len(addresses) + 1
        self._pool = ThreadPoolExecutor(self.num_micro_batches, thread_name_prefix="stage-step")
        self._loads: list[decode_stage_pb2.StageKVLoad] = []  # engine thread only
        self._step_ids = itertools.count()
        self._lock = threading.Lock()
        self.failure: str | None = None  # why the unit is down; None: up

    # ---- state (any thread) ----------------------------------------------------------------
    def fail(self, reason: str) -> None:
        """Mark the unit down (the first reason stays)."""
        with self._lock:
            if self.failure is None:
                self.failure = reason
                log.warning("decode_unit_down", reason=reason)

    def _connect(self) -> list:
        """New channels to the stages (and their stubs). A channel that saw its stage die sits in
        reconnect backoff, where a call fails at once; a new one connects on its first call."""
        old, self._channels = self._channels, [self._security.sync_channel(a, options=self._options)
                                               for a in self.addresses]
        for channel in old:
            channel.close()
        return [decode_stage_pb2_grpc.PipelineStageStub(c) for c in self._channels]

    def recover(self) -> None:
        """Every stage answers again and was reset: steps run again, on fresh channels (no step
        runs while the unit is down, so none uses the old ones)."""
        with self._lock:
            if self._channels:
                self._stubs = self._connect()
            self.failure = None
            self._loads.clear()
        log.info("decode_unit_up")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for channel in self._channels:
            channel.close()

    # ---- the engine's forward (engine thread) ----------------------------------------------
    def admit(self, request_id: str, slots: list[int]) -> None:
        """A FROM_KV sequence's KV went into these slots on stage 0: the next step tells the other
        stages to copy theirs (claimed beforehand, StageControl.claim_kv) into the same slots."""
        self._loads.append(decode_stage_pb2.StageKVLoad(request_id=request_id, slots=slots))

    def __call__(self, batch: ForwardBatch, cache: PagedKVCache, on_layer_kv=None) -> torch.Tensor:
        """fp32 logits [B, V] of the batch, as the whole model would give them."""
        loads, self._loads = self._loads, []
        if self.failure is not None:
            raise StageFailed(f"decode unit is down: {self.failure}")
        step_id = next(self._step_ids)
        # Loads go with a step that stays whole: a micro-batch never runs before its rows' KV is in.
        parts = [batch] if loads else split_rows(batch, self.num_micro_batches)
        futures = []
        for part in parts:
            hidden = self.model(part, cache, on_layer_kv=on_layer_kv, head=False)  # [T, hidden]
            futures.append(self._pool.submit(self._through_stages, wire.step_message(part, hidden, step_id, loads)))
        # the LM head runs here, on the engine thread, while the later stages compute the next micro-batch
        logits = [self.model.logits(f.result(), part) for f, part in zip(futures, parts)]
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    def _through_stages(self, step: decode_stage_pb2.StageStep) -> torch.Tensor:
        """The hidden states after the last stage's layers."""
        for k, (stub, address) in enumerate(zip(self._stubs, self.addresses), start=1):
            try:
                result = stub.Step(step, timeout=self.timeout_s)
            except grpc.RpcError as e:
                reason = f"decode stage {k} ({address}) failed step {step.step_id}: {e.code().name}: {e.details()}"
                self.fail(reason)
                raise StageFailed(reason) from None
            step.hidden.CopyFrom(result.hidden)
        return wire.tensor_from_proto(step.hidden, self.device).to(self.model.norm.weight.dtype)
