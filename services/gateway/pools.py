"""The gateway's two scheduling pools.

  prefill pool  every accepted request starts here. At most max_inflight_prefills of them are
                at prefill services at once (enough for one packed prefill batch); the rest
                wait in arrival order, at most max_queued_requests of them. A request over
                that bound is refused at once (ResourceExhausted), and one whose deadline
                passes while it waits gets DeadlineExceeded: nothing waits forever.
  decode pool   at most max_decode_streams requests stream or prefill at once (checked on entry
                to the prefill pool). Once its KV is at a decode service (or, in degraded/colocated mode, its first
                token came back), a request moves to that service's decode pool until its
                stream ends. New prefills are admitted while others decode (time to first
                token first); decode is never starved because the engines bound how many
                prefill batches run in a row.
Placement: a new request goes to the decode service with the fewest running sequences
(the larger of the monitor's heartbeat report and the gateway's own count), then the most
free KV blocks.
"""

from __future__ import annotations

import asyncio
import collections

from edgellm import metrics
from edgellm.v1 import monitor_pb2
from services.gateway.errors import DeadlineExceeded, ResourceExhausted


class Pools:
    def __init__(self, max_queued: int, max_inflight_prefills: int, max_decode_streams: int = 1024) -> None:
        self.max_queued = max_queued
        self.max_decode_streams = max_decode_streams
        self.max_inflight_prefills = max_inflight_prefills
        self._slots = asyncio.Semaphore(max_inflight_prefills)
        self.num_prefill_waiting = 0
        self.num_prefilling = 0
        self.decoding: collections.Counter[str] = collections.Counter()  # address -> streams

    @property
    def num_decoding(self) -> int:
        return sum(self.decoding.values())

    async def enter_prefill(self, timeout_s: float | None) -> None:
        """Wait for a prefill slot; raises ResourceExhausted when the queue is full, DeadlineExceeded
        when the deadline passes first, or when the decode pools are full (every request that
        leaves the prefill pool enters a decode pool: those at prefill count towards the bound)."""
        if self.num_decoding + self.num_prefilling >= self.max_decode_streams:
            metrics.LIMIT_HITS.labels("max_decode_streams").inc()
            raise ResourceExhausted(
                f"{self.num_decoding} requests streaming and {self.num_prefilling} at prefill "
                f"(max_decode_streams={self.max_decode_streams})")
        if self._slots.locked() and self.num_prefill_waiting >= self.max_queued:
            metrics.LIMIT_HITS.labels("max_queued_requests").inc()
            raise ResourceExhausted(
                f"prefill queue is full: {self.num_prefill_waiting} requests waiting "
                f"(max_queued_requests={self.max_queued})",
            )
        self.num_prefill_waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout_s)
        except asyncio.TimeoutError:
            raise DeadlineExceeded("the request's deadline passed while it waited in the prefill queue") from None
        finally:
            self.num_prefill_waiting -= 1
        self.num_prefilling += 1

    def leave_prefill(self) -> None:
        self.num_prefilling -= 1
        self._slots.release()

    def enter_decode(self, address: str) -> None:
        self.decoding[address] += 1

    def leave_decode(self, address: str) -> None:
        self.decoding[address] -= 1

    def pick_decode(self, candidates: list[str], table: monitor_pb2.RouteTable) -> str:
        """The least loaded of the candidate decode services (by the table's heartbeat loads)."""
        loads = {s.address: s.load for s in table.services}

        def key(address: str) -> tuple[int, int]:
            load = loads.get(address)
            reported_running = load.num_running + load.num_waiting if load is not None else 0
            free_blocks = load.num_free_kv_blocks if load is not None else 0
            return max(reported_running, self.decoding[address]), -free_blocks

        return min(candidates, key=key)
