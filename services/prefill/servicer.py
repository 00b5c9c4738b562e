"""Prefill servicer.

Prefill(request): the prompt runs through the engine; each finished layer's K/V goes to
the decode service named in the request over a PushKV stream opened before the forward
pass starts. Returns the first token once decode has acknowledged the complete KV.

A takeover (the request's decode service failed) is the same call with the tokens already
streamed appended to the prompt and num_generated set: the KV of all of them goes to the
new decode service and the token sampled is the next one. When this service prefilled the
request, its kept prompt K/V (backup.py) is reused: only the streamed tokens are computed.

GenerateLocal(request): degraded mode, used by the gateway when no decode service is
healthy: this service prefills and then decodes the request itself. A takeover of a request
this service prefilled reuses the prompt's K/V it kept (backup.py, --kv-backup-mb): only the
tokens already streamed are computed again.
"""

from __future__ import annotations

import asyncio
import math
from typing import AsyncIterator, Callable

import grpc
import structlog
import torch

from edgellm import metrics
from edgellm.config import TransferConfig
from edgellm.engine.errors import EngineError
from edgellm.engine.loop import EngineLoop
from edgellm.engine.sampling_params import SamplingParams
from edgellm.engine.weights import TORCH_DTYPES
from edgellm.logs import bind_request
from edgellm.rpc.channels import ChannelPool
from edgellm.rpc.load import engine_load
from edgellm.rpc.convert import FAILED_SERVICE_KEY, FINISH_TO_WIRE, check_spec, engine_error_status
from edgellm.rpc.local import generate_local
from edgellm.transfer import codec, faults
from edgellm.transfer.fanout import KVFanout, unit_targets
from edgellm.v1 import common_pb2, decode_pb2_grpc, prefill_pb2, prefill_pb2_grpc
from services.prefill.backup import PromptKVBackup

log = structlog.get_logger(__name__)


class PrefillServicer(prefill_pb2_grpc.PrefillServicer):
    def __init__(self, engine: EngineLoop, channels: ChannelPool, transfer: TransferConfig,
                 stages_of: Callable[[str], tuple] = lambda address: (), tp_heads: tuple[int, int] | None = None,
                 tensor_parallel: int = 1) -> None:
        """stages_of: a decode unit's pipeline stages (Load.stages) by its address. tp_heads: rank
        0's KV heads when the prefill is tensor-parallel (the other ranks stream theirs)."""
        self.engine = engine
        self.channels = channels
        self.transfer = transfer
        self.stages_of = stages_of
        self.tp_heads, self.tensor_parallel = tp_heads, tensor_parallel
        self.vocab_size, self.num_layers = engine.info.vocab_size, engine.info.num_layers
        # The kept prompt K/V would hold rank 0's heads only: with TP a takeover recomputes.
        backup_bytes = 0 if tp_heads is not None else int(transfer.kv_backup_mb * 2**20)
        self.backup = PromptKVBackup(backup_bytes, transfer.kv_backup_ttl_s)

    async def Prefill(
        self, request: prefill_pb2.PrefillRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.PrefillResponse:
        spec = request.spec
        bind_request(spec.request_id)
        sampling = await check_spec(context, spec, self.engine)
        if not request.decode_address:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "decode_address is required")
        if not await self.channels.admits(request.decode_address):  # never dial an address a caller made up
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"decode_address {request.decode_address!r} is "
                                "not a decode service of the monitor's route table")
        try:
            sender = self._fanout(spec, request.decode_address)
        except ValueError as e:  # the unit's advertised stages do not add up
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        kept = None if spec.num_generated else self._keeper(len(spec.prompt_token_ids))
        # A takeover moving to another decode service reuses the prompt K/V kept here: only the
        # tokens already streamed are computed, and the stream carries the kept K/V with theirs.
        prefix = self.backup.get(spec.request_id, list(spec.prompt_token_ids)) if spec.num_generated else None

        def on_layer_kv(layer: int, k, v) -> None:  # engine thread
            if kept is not None:
                kept[0][layer].copy_(k)
                kept[1][layer].copy_(v)
            if prefix is not None and k.shape[1] < len(spec.prompt_token_ids):  # the engine used the prefix
                k, v = torch.cat((prefix[0][layer], k), dim=1), torch.cat((prefix[1][layer], v), dim=1)
            sender.on_layer_kv(layer, k, v)
        on_layer_kv.route = self._route(spec, sender) if self.tp_heads is not None else None  # the other ranks' part

        try:
            result = await self.engine.prefill(
                spec.request_id,
                list(spec.prompt_token_ids),
                sampling,
                spec.max_new_tokens,
                on_layer_kv,
                num_generated=spec.num_generated,
                prefix_kv=prefix,
            )
            if sender.gave_up:  # decode took nothing for kv_wait_timeout_s while the forward pass ran
                raise TimeoutError
            sender.finish(result.first_token_id)
            # The deadline starts when the forward pass ends: a long prompt's compute (22 s for 4k
            # tokens in bf16 on one core here) is not the link's fault.
            ack = await asyncio.wait_for(sender.ack, self.transfer.kv_wait_timeout_s)
        except TimeoutError:
            sender.abort()
            log.warning("kv_push_timed_out", decode=request.decode_address, timeout_s=self.transfer.kv_wait_timeout_s)
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                f"KV transfer to {request.decode_address} stalled: nothing taken for "
                f"{self.transfer.kv_wait_timeout_s:g} s during the forward pass, or no acknowledgement within that "
                "time after it",
                trailing_metadata=((FAILED_SERVICE_KEY, request.decode_address),),
            )
        except grpc.aio.AioRpcError as e:
            stage = sender.failed_address(e)
            log.warning("kv_push_failed", decode=request.decode_address, stage=stage, code=e.code().name,
                        details=e.details())
            # DATA_LOSS (decode rejected a damaged stream) is passed on: the gateway then sends the
            # KV again to the same decode service instead of treating that service as failed.
            code = grpc.StatusCode.DATA_LOSS if e.code() == grpc.StatusCode.DATA_LOSS else grpc.StatusCode.UNAVAILABLE
            where = request.decode_address if stage == request.decode_address else f"{request.decode_address} (stage {stage})"
            await context.abort(code, f"KV transfer to {where} failed: {e.details()}",
                                trailing_metadata=((FAILED_SERVICE_KEY, request.decode_address),))
        except EngineError as e:  # this request failed in the engine (the rest of its batch went on)
            sender.abort()
            log.warning("prefill_failed", error=str(e))
            await context.abort(engine_error_status(e), str(e))
        except BaseException:  # cancelled by the gateway: close the KV stream too
            sender.abort()
            raise
        if kept is not None:
            self.backup.put(spec.request_id, list(spec.prompt_token_ids), *kept)
        metrics.KV_BYTES_SENT.inc(sender.num_bytes_sent)  # counted here: decode's ack is checked against it
        metrics.KV_TRANSFER.observe((ack.last_chunk_received_unix_ns - result.forward_start_unix_ns) / 1e9)
        log.info(
            "prefilled",
            num_prompt_tokens=result.num_prompt_tokens,
            forward_ms=(result.forward_end_unix_ns - result.forward_start_unix_ns) / 1e6,
            kv_chunks=ack.num_chunks,
            kv_bytes=ack.num_bytes,
        )
        return prefill_pb2.PrefillResponse(
            request_id=spec.request_id,
            first_token_id=result.first_token_id,
            num_prompt_tokens=result.num_prompt_tokens,
            forward_start_unix_ns=result.forward_start_unix_ns,
            forward_end_unix_ns=result.forward_end_unix_ns,
            finish_reason=FINISH_TO_WIRE.get(result.finish_reason, 0),
            kv=ack,
        )

    def _fanout(self, spec: common_pb2.RequestSpec, decode_address: str) -> KVFanout:
        """This request's KV streams: one per stage of the decode unit (its Load.stages, from the
        monitor's table), opened now so they are set up before the first layer is done."""
        t = self.transfer
        targets = unit_targets(decode_address, self.stages_of(decode_address), self.num_layers)
        return KVFanout(
            targets,
            lambda address: decode_pb2_grpc.DecodeStub(self.channels.get(address)),
            spec.request_id,
            len(spec.prompt_token_ids),
            self.num_layers,
            **self._stream_options(),
            wire_dtype=codec.TRANSFER_DTYPES.get(t.kv_transfer_dtype),
            fault=faults.fault_for(spec.request_id) if t.kv_fault_injection else None,
            prompt_digest=codec.prompt_digest(spec.prompt_token_ids),
            heads=self.tp_heads,
        )

    def _stream_options(self) -> dict:
        """How every KV stream of this service is cut and paced (KVStreamSender's options), the
        same on each rank of a tensor-parallel group: JSON-able, it travels in each step."""
        t = self.transfer
        return {"layers_per_chunk": t.kv_layers_per_chunk, "max_chunk_bytes": t.kv_max_chunk_bytes,
                "max_inflight_bytes": int(t.kv_max_inflight_mb * 2**20), "window_timeout_s": t.kv_wait_timeout_s,
                "link_mbps": t.kv_link_mbps, "after_prefill": t.kv_send_after_prefill}

    def _route(self, spec: common_pb2.RequestSpec, fanout: KVFanout) -> dict:
        """Where the other ranks of the tensor-parallel group send their heads of this prompt's KV
        (JSON-able: it travels in the step rank 0 publishes)."""
        return {
            "request_id": spec.request_id,
            "num_prompt_tokens": len(spec.prompt_token_ids),
            "digest": codec.prompt_digest(spec.prompt_token_ids).hex(),
            "targets": [[x.address, x.layer_start, x.layer_end] for x in fanout.targets],
            "sender": self._stream_options(),
            "wire_dtype": self.transfer.kv_transfer_dtype,
        }

    def _keeper(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Room for one prompt's K/V, [L, Hkv, P, D] each, filled layer by layer as the forward pass
        runs; None when the backup is off or could not hold it."""
        info = self.engine.info
        shape = (info.num_layers, info.num_kv_heads, num_tokens, info.head_dim)
        dtype = TORCH_DTYPES[info.dtype]
        if 2 * math.prod(shape) * dtype.itemsize > self.backup.max_bytes:
            return None
        return torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)

    async def ExtendBackup(
        self, request: prefill_pb2.ExtendBackupRequest, context: grpc.aio.ServicerContext
    ) -> prefill_pb2.ExtendBackupResponse:
        """Compute the K/V of the tokens a request streamed since its kept K/V and keep them too."""
        spec = request.spec
        bind_request(spec.request_id)
        token_ids = list(spec.prompt_token_ids)
        kept = self.backup.get(spec.request_id, token_ids, count_hit=False)
        if kept is None:  # nothing kept here (expired, evicted, or prefilled elsewhere): nothing to extend
            return prefill_pb2.ExtendBackupResponse(num_kept_tokens=0)
        num_kept = kept[0].shape[2]
        if len(token_ids) - num_kept < 2:  # the last token stays to be computed by a takeover anyway
            return prefill_pb2.ExtendBackupResponse(num_kept_tokens=num_kept)
        token_ids = token_ids[:-1]  # its K/V is what a takeover computes to sample the next token
        new: list[tuple[torch.Tensor, torch.Tensor]] = []
        try:
            await self.engine.prefill(f"{spec.request_id}+backup", token_ids, SamplingParams(), 2,
                                      lambda layer, k, v: new.append((k, v)), prefix_kv=kept)
        except EngineError as e:
            await context.abort(engine_error_status(e), str(e))
        k = torch.cat((kept[0], torch.stack([k for k, _ in new])), dim=2)
        v = torch.cat((kept[1], torch.stack([v for _, v in new])), dim=2)
        self.backup.put(spec.request_id, token_ids, k, v)
        self.backup.extensions += 1
        return prefill_pb2.ExtendBackupResponse(num_kept_tokens=len(token_ids))

    async def GenerateLocal(
        self, request: common_pb2.GenerateLocalRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.TokenDelta]:
        spec = request.spec
        # A takeover (num_generated > 0) of a request prefilled here reuses its prompt's K/V.
        kept = self.backup.get(spec.request_id, list(spec.prompt_token_ids)) if spec.num_generated else None
        if spec.num_generated:
            log.info("takeover", num_tokens=len(spec.prompt_token_ids), num_kept_tokens=0 if kept is None else kept[0].shape[2])
        async for delta in generate_local(self.engine, request, context, prefix_kv=kept):
            yield delta

    async def GetLoad(self, request: common_pb2.GetLoadRequest, context: grpc.aio.ServicerContext) -> common_pb2.Load:
        load = engine_load(self.engine)
        load.tensor_parallel = self.tensor_parallel
        return load
