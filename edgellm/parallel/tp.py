"""Tensor-parallel prefill: the ranks' process group, the sharded model, and the step protocol.

One process per device. Rank 0 is the prefill service (gRPC, scheduler, sampling); ranks 1..N-1
are workers it drives. Every rank holds a shard of each layer (layout.tp_shards: q/k/v and
gate/up split by output, o_proj and down_proj by input) plus the whole embedding, norms and LM
head, so after the two all-reduces of a layer every rank has the same hidden state.

Steps: before each forward pass rank 0 publishes the step (tokens, positions, cache slots,
and where each prompt's KV goes) under a numbered key of its TCPStore; a worker waits for that
key, runs the same forward on its shard and streams its own KV heads to the decode side. The
store carries only step descriptions (JSON, never pickles); the all-reduces go through gloo
(CPU) or NCCL (CUDA; that path has not run on a GPU yet).

Faults: every collective is bounded by prefill_tp_timeout_s and each worker writes a heartbeat
to the store, so a dead or hung rank is found within about that time (a killed one at once,
when its sockets close). Rank 0 then aborts the group, fails the steps that need it (their
requests go elsewhere), reports itself down, and re-forms the group under a new generation
number as soon as every rank is back. Workers follow the generation: on any failure they
drop their group and join the next one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import json
import socket
import threading
import time
from typing import Callable

import structlog
import torch
from torch import nn
from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

from edgellm.engine.kv_cache import ForwardBatch
from edgellm.engine.model import LlamaModel
from edgellm.parallel.layout import HeadShard

log = structlog.get_logger(__name__)

HEARTBEAT_S = 0.2  # how often a worker says it is alive
GENERATION_OVER = b""  # written where workers wait for a step that will not come (the group re-forms)
IDLE_WAIT = datetime.timedelta(hours=1)  # a worker's wait for the next step (each time-out logs a warning)


class GroupDown(RuntimeError):
    """The tensor-parallel group is broken (a rank died or hung) or not formed yet."""


# ---- the sharded model -----------------------------------------------------------------------
def _slice_linear(linear: nn.Linear, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None) -> nn.Linear:
    weight = linear.weight.data
    if rows is not None:
        weight = weight[rows[0]:rows[1]]
    if cols is not None:
        weight = weight[:, cols[0]:cols[1]]
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype)
    out.weight.data = weight.contiguous()
    return out


class RowParallel(nn.Module):
    """A linear layer split by its input: each rank's partial product, summed over the ranks."""

    def __init__(self, linear: nn.Linear, all_reduce: Callable[[torch.Tensor], None]) -> None:
        super().__init__()
        self.linear = linear
        self.all_reduce = all_reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(x)
        self.all_reduce(out)
        return out


def shard_model(model: LlamaModel, shard: HeadShard, all_reduce: Callable[[torch.Tensor], None]) -> None:
    """Keep only this rank's heads and MLP channels of every layer (in place). model.arch then
    describes the shard (its head counts), so the engine sizes its KV cache for its own heads."""
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        d = attn.head_dim
        q, kv = (shard.q_heads[0] * d, shard.q_heads[1] * d), (shard.kv_heads[0] * d, shard.kv_heads[1] * d)
        attn.q_proj = _slice_linear(attn.q_proj, rows=q)
        attn.k_proj = _slice_linear(attn.k_proj, rows=kv)
        attn.v_proj = _slice_linear(attn.v_proj, rows=kv)
        attn.o_proj = RowParallel(_slice_linear(attn.o_proj, cols=q), all_reduce)
        attn.num_heads, attn.num_kv_heads = shard.num_q_heads, shard.num_kv_heads
        mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=shard.mlp)
        mlp.up_proj = _slice_linear(mlp.up_proj, rows=shard.mlp)
        mlp.down_proj = RowParallel(_slice_linear(mlp.down_proj, cols=shard.mlp), all_reduce)
    model.arch = dataclasses.replace(model.arch, num_heads=shard.num_q_heads, num_kv_heads=shard.num_kv_heads,
                                     intermediate_size=shard.mlp[1] - shard.mlp[0])


# ---- step descriptions -------------------------------------------------------------------------
def _list(t: torch.Tensor | None) -> list | None:
    return None if t is None else t.tolist()


def encode_step(batch: ForwardBatch, routes: list[dict]) -> bytes:
    """A forward pass as the workers need it: the batch's tensors as lists, and for each prompt
    whose KV leaves (routes) where it goes and which packed rows it is."""
    if batch.prefix_kv and any(p is not None for p in batch.prefix_kv):
        raise GroupDown("a kept prefix K/V cannot be sharded to the other ranks (the KV backup is off with TP)")
    return json.dumps({
        "prefill": batch.is_prefill, "tokens": _list(batch.token_ids), "positions": _list(batch.positions),
        "cu": batch.cu_seqlens, "slots": _list(batch.slot_mapping), "rows": _list(batch.store_rows),
        "tables": _list(batch.block_tables), "ctx": _list(batch.context_lens), "max_ctx": batch.max_context_len,
        "routes": routes,
    }).encode()


def decode_step(payload: bytes, device: torch.device) -> tuple[ForwardBatch, list[dict]]:
    step = json.loads(payload)

    def tensor(values):
        return None if values is None else torch.tensor(values, dtype=torch.long, device=device)

    batch = ForwardBatch(
        token_ids=tensor(step["tokens"]), positions=tensor(step["positions"]), is_prefill=step["prefill"],
        cu_seqlens=step["cu"], slot_mapping=tensor(step["slots"]), store_rows=tensor(step["rows"]),
        block_tables=tensor(step["tables"]), context_lens=tensor(step["ctx"]), max_context_len=step["max_ctx"],
    )
    return batch, step["routes"]


# ---- the group -----------------------------------------------------------------------------------
class TPGroup:
    """This rank's membership of the prefill group: rendezvous, collectives with a deadline,
    rank 0's step publication and the workers' step reception, failure and re-forming."""

    def __init__(self, rank: int, world: int, address: str, timeout_s: float,
                 device: torch.device = torch.device("cpu")) -> None:
        """device: where this rank computes; its collectives use NCCL on CUDA, gloo otherwise."""
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self.device = device
        host, port = address.rsplit(":", 1)
        self.host, self.port = host, int(port)
        self._timeout = datetime.timedelta(seconds=timeout_s)
        self._store = self._connect(is_master=rank == 0)
        # Rank 0 numbers generations from its start time, so a restarted rank 0's first group is
        # never mistaken for the one its workers were in before.
        self.generation = int(time.time() * 1000) if rank == 0 else 0
        self._pg: ProcessGroupGloo | None = None
        self._step = 0
        self.broken = True  # until formed
        self.reason = "not formed yet"
        self._lock = threading.Lock()
        self._beats: dict[int, tuple[bytes, float]] = {}  # rank 0: worker -> (last heartbeat, when it changed)

    def _connect(self, is_master: bool = False) -> TCPStore:
        """A store client (rank 0's first one also serves the store). Workers retry until rank 0 listens."""
        while True:
            try:
                return TCPStore(self.host, self.port, None if not is_master else self.world, is_master,
                                timeout=self._timeout, wait_for_workers=False)
            except (RuntimeError, ValueError) as e:  # DistNetworkError / DistStoreError: rank 0 not up yet
                if is_master:
                    raise
                log.info("tp_waiting_for_rank0", address=f"{self.host}:{self.port}", error=str(e)[:120])
                time.sleep(0.5)

    # ---- forming ---------------------------------------------------------------------------
    def form(self, generation: int, store: TCPStore | None = None) -> bool:
        """Join generation `generation` of the group (rendezvous through `store`, default this
        rank's client); False if not every rank came in time."""
        try:
            pg = self._process_group(PrefixStore(f"g{generation}", store or self._store))
        except RuntimeError as e:
            log.info("tp_form_failed", generation=generation, error=str(e)[:200])
            return False
        with self._lock:
            self._pg, self.generation, self._step = pg, generation, 0
            self.broken, self.reason = False, ""
            self._beats.clear()  # heartbeats are judged afresh from now on
        log.info("tp_group_formed", rank=self.rank, world=self.world, generation=generation)
        return True

    def form_as_rank0(self, stop: threading.Event | None = None, store: TCPStore | None = None) -> None:
        """Rank 0: open generation after generation until every rank joins one. `store`: the
        calling thread's own client (the engine thread publishes through the first one)."""
        store = store or self._store
        # Workers of the old generation waiting for their next step learn that it will not come.
        store.set(f"g{self.generation}/s{self._step}", GENERATION_OVER)
        while stop is None or not stop.is_set():
            generation = self.generation + 1
            self.generation = generation
            store.set("generation", str(generation))
            if self.form(generation, store):
                return

    def supervise(self, stop: threading.Event) -> None:
        """Rank 0's watch thread: a worker whose heartbeat is older than timeout_s breaks the group
        (found even while no request runs); a broken group is re-formed as soon as every rank is
        back."""
        store = self.client()
        while not stop.is_set():
            if self.broken:
                self.form_as_rank0(stop, store)
            else:
                stale = self.stale_ranks(store)
                if stale:
                    self.fail(f"rank {', '.join(map(str, stale))} stopped answering (no heartbeat for "
                              f"{self.timeout_s:g} s)")
            stop.wait(0.1)

    async def readiness(self):
        """Rank 0's health for serve(): True while the group is whole, each time that changes."""
        last = None
        while True:
            if (whole := not self.broken) != last:
                last = whole
                yield whole
            await asyncio.sleep(0.05)

    def _process_group(self, store: PrefixStore):
        """NCCL between GPUs (NOT yet run on one: no GPU was lent to any session so far), gloo
        between CPUs, bound to the address this rank reaches rank 0 from."""
        nccl = getattr(torch.distributed, "ProcessGroupNCCL", None)  # absent from CPU builds of torch
        if self.device.type == "cuda" and nccl is not None:
            torch.cuda.set_device(self.device)
            options = nccl.Options()
            options._timeout = self._timeout
            return nccl(store, self.rank, self.world, options)
        options = ProcessGroupGloo._Options()
        options._timeout = self._timeout
        options._devices = [ProcessGroupGloo.create_device(hostname=self._local_ip())]
        return ProcessGroupGloo(store, self.rank, self.world, options)

    def _local_ip(self) -> str:
        """The address this rank's collectives use: the one its machine reaches rank 0 from (rank 0:
        the rendezvous address itself), so ranks on separate devices or network namespaces find
        each other without naming an interface."""
        if self.rank == 0:
            return self.host
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((self.host, self.port))  # no packet: only picks the route
            return probe.getsockname()[0]

    def fail(self, reason: str) -> None:
        """Drop the group (a collective failed, a rank stopped answering): later steps fail at once."""
        with self._lock:
            if self.broken:
                return
            self.broken, self.reason = True, reason
            pg, self._pg = self._pg, None
        log.warning("tp_group_broken", rank=self.rank, generation=self.generation, reason=reason)
        if pg is not None:
            try:
                pg.abort()
            except Exception:  # noqa: BLE001 - an abort of a dead group may itself complain
                pass

    def all_reduce(self, t: torch.Tensor) -> None:
        pg = self._pg
        if pg is None:
            raise GroupDown(f"tensor-parallel group is down: {self.reason}")
        try:
            pg.allreduce([t]).wait(self._timeout)
        except RuntimeError as e:
            self.fail(f"all-reduce failed: {str(e)[:200]}")
            raise GroupDown(f"tensor-parallel group is down: {self.reason}") from None

    # ---- rank 0: steps and liveness ---------------------------------------------------------
    def publish(self, payload: bytes) -> None:
        """Rank 0: hand the next forward pass to the workers."""
        if self.broken:
            raise GroupDown(f"tensor-parallel group is down: {self.reason}")
        n = self._step
        self._store.set(f"g{self.generation}/s{n}", payload)
        if n:  # every worker read step n-1 before its all-reduces, which finished before this step
            self._store.delete_key(f"g{self.generation}/s{n - 1}")
        self._step += 1

    def stale_ranks(self, store: TCPStore) -> list[int]:
        """Rank 0: workers whose heartbeat counter has not moved for timeout_s, by this machine's
        own clock (read through `store`, a client of this thread's own; boards' clocks may differ)."""
        now, stale = time.monotonic(), []
        for rank in range(1, self.world):
            key = f"alive/{rank}"
            beat = store.get(key) if store.check([key]) else b""
            last = self._beats.get(rank)
            if last is None or last[0] != beat:
                self._beats[rank] = (beat, now)
            elif now - last[1] > self.timeout_s:
                stale.append(rank)
        return stale

    def reconnect(self) -> None:
        """Worker: a new store client (rank 0 restarted, or its connection broke)."""
        self._store = self._connect()

    def client(self) -> TCPStore:
        return self._connect()

    # ---- workers ---------------------------------------------------------------------------
    def heartbeat_forever(self) -> None:
        """Worker thread: say this rank is alive every HEARTBEAT_S (through its own client)."""
        store, beat = None, 0
        while True:
            try:
                store = store or self._connect()
                beat += 1
                store.set(f"alive/{self.rank}", str(beat))
            except Exception:  # noqa: BLE001 - rank 0 gone: reconnect when it is back
                store = None
            time.sleep(HEARTBEAT_S)

    def current_generation(self) -> int:
        return int(self._store.get("generation")) if self._store.check(["generation"]) else 0

    def next_step(self) -> bytes | None:
        """Worker: the next step rank 0 published, or None when the generation moved on (the
        group re-forms: join the new one). Waits as long as the service stays idle: rank 0
        writes GENERATION_OVER where a worker waits when it re-forms the group, and a dead rank 0
        closes the connection (an error here)."""
        key = f"g{self.generation}/s{self._step}"
        while True:
            try:
                self._store.wait([key], IDLE_WAIT)
            except RuntimeError:  # an hour idle, or a re-form missed: check the generation
                if self.current_generation() != self.generation:
                    return None
                continue
            payload = self._store.get(key)
            if payload == GENERATION_OVER:
                return None
            self._step += 1
            return payload
