"""Find a hung or cut-off engine service within a fraction of a second (issue 18).

A stopped process (SIGSTOP) or a dead link never closes its TCP connection: the calls on it
just go quiet. The monitor finds it after two missed health checks (0.5-0.8 s), and gRPC's
HTTP/2 keepalive cannot do better: a client transport sends at most one ping a second, and a
ping already goes out in the ordinary pause between two decode steps, so the ping that would
find the failure may wait most of a second. So the gateway probes a service itself while it
has token streams in flight there:

  every token stream from an engine service (Decode, GenerateLocal) runs inside
  watch(address): it counts the streams in flight there and reports each message it reads
  (heard_from), and while any is in flight one probe task per address runs:
    nothing heard for --stream-ping-after-ms -> a health Check on the same connection, with a
    --stream-ping-timeout-ms deadline -> answered (whatever the status: the process lives and
    the monitor judges its health) means heard; unanswered or refused sets the address's
    dead signal, which moves every call that was in flight there (migration.py), and the
    address gets a fresh signal for the calls that follow.

The engine's event loop answers the probe, not its engine thread, so a slow but live service
(a loaded 2-core machine) still answers. Not probed: the unary Prefill call, whose service may
spend seconds of a loaded machine on a long prompt (a starved event loop can miss a 200 ms
deadline there), and a probe's verdict moves a stream only where it has somewhere else to go
(migration.py): a false alarm never strands one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Iterator

import grpc
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgellm import metrics
from edgellm.rpc.channels import ChannelPool

log = structlog.get_logger(__name__)


class LivenessProber:
    def __init__(self, channels: ChannelPool, after_ms: int, timeout_ms: int) -> None:
        """after_ms: quiet time before a probe (0 = never probe); timeout_ms: the probe's deadline."""
        self.channels = channels
        self.after_s, self.timeout_s = after_ms / 1000, timeout_ms / 1000
        self._in_flight: collections.Counter[str] = collections.Counter()
        self._heard_at: dict[str, float] = {}  # address -> time.monotonic() of its last message or answer
        self._dead: dict[str, asyncio.Event] = {}
        self._probes: dict[str, asyncio.Task] = {}

    @contextlib.contextmanager
    def watch(self, address: str) -> Iterator[None]:
        """Around one call to `address` (its messages go to heard_from): probes while it runs."""
        self._in_flight[address] += 1
        self.heard_from(address)  # the call starts the quiet clock
        if self.after_s > 0 and address not in self._probes:
            self._probes[address] = asyncio.get_running_loop().create_task(self._probe_while_busy(address))
        try:
            yield
        finally:
            self._in_flight[address] -= 1

    def heard_from(self, address: str) -> None:
        self._heard_at[address] = time.monotonic()

    def dead_signal(self, address: str) -> asyncio.Event:
        """Set when a probe of `address` goes unanswered (a fresh one afterwards)."""
        return self._dead.setdefault(address, asyncio.Event())

    async def _probe_while_busy(self, address: str) -> None:
        stub = health_pb2_grpc.HealthStub(self.channels.get(address))
        try:
            while self._in_flight[address] > 0:
                quiet_s = time.monotonic() - self._heard_at[address]
                if quiet_s < self.after_s:
                    await asyncio.sleep(self.after_s - quiet_s)
                    continue
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(), timeout=self.timeout_s)
                    self.heard_from(address)
                except grpc.aio.AioRpcError as e:
                    if e.code() not in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                        self.heard_from(address)  # an answer, if not the one asked for: it lives
                        continue
                    self._declare_dead(address, e)
        finally:
            del self._probes[address]

    def _declare_dead(self, address: str, e: grpc.aio.AioRpcError) -> None:
        log.warning("probe_unanswered", address=address, quiet_ms=round(1e3 * (time.monotonic() - self._heard_at[address])),
                    code=e.code().name, in_flight=self._in_flight[address])
        metrics.FAILURES_DETECTED.labels("probe").inc()
        self._dead.pop(address).set()
        self.heard_from(address)  # the calls that follow get their own quiet time
