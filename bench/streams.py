"""Concurrent streams with a fault injected mid-way: what the failover tests and `make bench-faults` share.

Every stream records each token's arrival time and how it ended: a finish_reason, or the
gRPC status it ended with. `fault()` (kill a process, cut a link) runs once every stream
has received `after_tokens` tokens, so it always lands mid-stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from edgellm.client import AsyncClient, GenerationError


@dataclass
class StreamRecord:
    prompt: str
    request_id: str = ""  # the gateway's id, as its logs name the request
    token_ids: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each token
    finish_reason: str = ""
    error: grpc.StatusCode | None = None
    details: str = ""

    @property
    def completed(self) -> bool:
        return bool(self.finish_reason) and self.error is None

    def recovery_s(self, fault_at: float) -> float | None:
        """The longest wait for a token from the fault on (the fault itself counts as the last
        token before): the stall the fault caused, even when a token already on its way slipped
        through just after it. None if the stream had ended before the fault or got nothing after."""
        after = [t for t in self.arrivals if t > fault_at]
        if not after:
            return None
        return max(b - a for a, b in zip([fault_at, *after[:-1]], after))


@dataclass
class FaultRun:
    streams: list[StreamRecord]
    fault_at: float | None  # time.monotonic() when fault() was called
    started_at: float
    ended_at: float


async def _stream(client: AsyncClient, record: StreamRecord, max_tokens: int, progress: asyncio.Event,
                  after_tokens: int) -> None:
    try:
        async for delta in client.generate(prompt=record.prompt, max_tokens=max_tokens, temperature=0.0):
            now = time.monotonic()
            record.request_id = record.request_id or delta.request_id
            for token in delta.token_ids:
                record.token_ids.append(token)
                record.arrivals.append(now)
            if len(record.token_ids) >= after_tokens:
                progress.set()
            if delta.finish_reason:
                record.finish_reason = delta.finish_reason
    except GenerationError as e:
        record.error, record.details = e.code, e.details
    finally:
        progress.set()  # an ended stream does not hold the fault back


async def run_with_fault(
    gateway: str,
    prompts: list[str],
    max_tokens: int,
    fault: Callable[[], None] | None = None,
    after_tokens: int = 5,
    timeout_s: float = 300.0,
    fault_after_s: float | None = None,
) -> FaultRun:
    """fault_after_s: call fault() this long after the requests went out instead of once every
    stream has after_tokens tokens (a fault that must land while prompts are still prefilling)."""
    records = [StreamRecord(p) for p in prompts]
    ready = [asyncio.Event() for _ in prompts]
    started = time.monotonic()
    async with AsyncClient(gateway, timeout_s=timeout_s) as client:
        tasks = [asyncio.create_task(_stream(client, r, max_tokens, e, after_tokens)) for r, e in zip(records, ready)]
        fault_at = None
        if fault is not None:
            if fault_after_s is not None:
                await asyncio.sleep(fault_after_s)
            else:
                await asyncio.gather(*(e.wait() for e in ready))
            fault_at = time.monotonic()
            await asyncio.to_thread(fault)
        await asyncio.gather(*tasks)
    return FaultRun(records, fault_at, started, time.monotonic())


def run_with_fault_sync(*args, **kwargs) -> FaultRun:
    return asyncio.run(run_with_fault(*args, **kwargs))
