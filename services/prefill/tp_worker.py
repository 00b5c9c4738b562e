"""A tensor-parallel prefill worker: `python -m services.prefill --prefill-tp N --prefill-tp-rank R`
with R >= 1 (what `edgellm up --prefill-tp N` starts for each rank but 0).

It serves no gRPC. It joins rank 0's group (edgellm/parallel/tp.py), holds its shard of the
model and a paged KV cache for its own heads (degraded-mode decoding runs on the whole group
too), and runs every forward pass rank 0 publishes. For each prompt whose KV leaves, it streams
its own KV heads, layer by layer, to the decode unit rank 0 named: the same stages, the same
request id, marked as a head shard (receiver.py puts the heads together).

Threads: the engine thread waits for steps and computes; the event loop (main thread) runs the
KV streams; a heartbeat thread tells rank 0 this rank is alive.
"""

from __future__ import annotations

import asyncio
import threading

import structlog
import torch

from edgellm import config as cfg
from edgellm.engine.kv_cache import PagedKVCache
from edgellm.engine.kv_offload import PerSequenceLayerKV
from edgellm.engine_builder import engine_limits, load_for
from edgellm.parallel.layout import tp_shards
from edgellm.parallel.tp import GroupDown, TPGroup, decode_step, shard_model
from edgellm.rpc.channels import ChannelPool
from edgellm.rpc.security import ClusterSecurity
from edgellm.transfer import codec
from edgellm.transfer.fanout import KVFanout, StageTarget
from edgellm.v1 import decode_pb2_grpc

log = structlog.get_logger(__name__)


class TPWorker:
    def __init__(self, config: cfg.Config, loop: asyncio.AbstractEventLoop) -> None:
        parallel = config.parallel
        self.loop = loop
        self.channels = ChannelPool(ClusterSecurity.for_service(config, "prefill"))
        loaded, self.device, num_threads = load_for(config, "prefill")
        self.model = model = loaded.model
        limits = engine_limits(config, model.arch, model.norm.weight.dtype)
        a = model.arch
        self.shard = tp_shards(a.num_heads, a.num_kv_heads, a.intermediate_size, parallel.prefill_tp)[parallel.prefill_tp_rank]
        self.group = TPGroup(parallel.prefill_tp_rank, parallel.prefill_tp, parallel.tp_address,
                             parallel.prefill_tp_timeout_s, self.device)
        shard_model(model, self.shard, self.group.all_reduce)
        self.cache = PagedKVCache(a.num_layers, limits.num_blocks, limits.block_size, self.shard.num_kv_heads,
                                  a.head_dim, model.norm.weight.dtype, self.device)
        self.num_threads = num_threads

    # ---- engine thread ---------------------------------------------------------------------
    def run_forever(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        joined = 0
        while True:
            try:
                generation = self.group.current_generation()
                if generation in (0, joined):  # rank 0 has not opened a newer group yet
                    threading.Event().wait(0.1)
                    continue
                joined = generation
                if not self.group.form(generation):
                    continue
                while (payload := self.group.next_step()) is not None:
                    self._run_step(payload)
            except GroupDown as e:
                log.warning("tp_step_failed", error=str(e))
            except Exception as e:  # noqa: BLE001 - rank 0's store went away: reconnect and rejoin
                log.warning("tp_rank0_unreachable", error=str(e)[:200])
                self.group.fail(f"rank 0 unreachable: {str(e)[:120]}")
                self.group.reconnect()

    def _run_step(self, payload: bytes) -> None:
        batch, routes = decode_step(payload, self.device)
        fanouts = [(asyncio.run_coroutine_threadsafe(self._open(route), self.loop).result(), *route["rows"])
                   for route in routes]

        layer_kv = PerSequenceLayerKV(self.device, [(f.on_layer_kv, start, end) for f, start, end in fanouts]) \
            if fanouts else None
        try:
            self.model(batch, self.cache, on_layer_kv=layer_kv)
            if layer_kv is not None:
                layer_kv.drain()
        except BaseException:
            for fanout, _, _ in fanouts:
                self.loop.call_soon_threadsafe(fanout.abort)
            raise
        for fanout, _, _ in fanouts:
            self.loop.call_soon_threadsafe(fanout.finish, 0)

    # ---- event loop --------------------------------------------------------------------------
    async def _open(self, route: dict) -> KVFanout:
        """This rank's KV streams of one prompt: its own heads to every stage rank 0 named."""
        fanout = KVFanout(
            tuple(StageTarget(*t) for t in route["targets"]),
            lambda address: decode_pb2_grpc.DecodeStub(self.channels.get(address)),
            route["request_id"], route["num_prompt_tokens"], self.model.arch.num_layers,
            prompt_digest=bytes.fromhex(route["digest"]), wire_dtype=codec.TRANSFER_DTYPES.get(route["wire_dtype"]),
            heads=self.shard.kv_heads, head_shard=True, **route["sender"],
        )
        fanout.ack.add_done_callback(lambda f: self._log_ack(route["request_id"], f))
        return fanout

    @staticmethod
    def _log_ack(request_id: str, ack: asyncio.Future) -> None:
        if ack.cancelled() or ack.exception() is not None:
            # the primary stream (rank 0's) learns it from the decode side: the request fails there
            log.warning("kv_shard_push_failed", request_id=request_id,
                        error="cancelled" if ack.cancelled() else str(ack.exception())[:200])


async def run(config: cfg.Config) -> None:
    worker = TPWorker(config, asyncio.get_running_loop())
    threading.Thread(target=worker.group.heartbeat_forever, name="tp-heartbeat", daemon=True).start()
    engine = threading.Thread(target=worker.run_forever, name="tp-engine", daemon=True)
    engine.start()
    log.info("tp_worker_started", rank=config.parallel.prefill_tp_rank, world=config.parallel.prefill_tp,
             heads=worker.shard.kv_heads, rendezvous=config.parallel.tp_address)
    await asyncio.Event().wait()  # until killed: the group and rank 0 decide what runs
