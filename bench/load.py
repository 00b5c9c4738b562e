"""How the benchmark sends its requests: three load generators over one AsyncClient.

  closed_loop        `concurrency` workers; each sends its next request as soon as its
                     previous one ends, so exactly `concurrency` are in flight until the
                     list runs out.
  open_loop          each request is sent at its arrival time (Poisson), whether or not
                     earlier ones have finished.
  prefill_heavy_mix  `num_streams` closed-loop short streams decode while long prompts
                     arrive every `long_interval_s`; the streams start MIX_LEAD_IN_S before
                     the first long prompt and stop sending once every long request has
                     finished.

Client-side timings use `time.perf_counter()`: TTFT from the call to the first delta that
carries tokens, TPOT between the first and the last such delta over (tokens - 1). A
scenario's wall time runs from its first request to the end of its last.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from bench.workload import BenchRequest, long_request
from edgellm.client import AsyncClient, Delta, GenerationError

MIX_LEAD_IN_S = 2.0  # the mix's short streams decode alone this long before the first long prompt


@dataclass(frozen=True)
class RequestResult:
    ttft_ms: float | None = None  # client side; None when no token arrived
    tpot_ms: float | None = None  # client side; None with fewer than two tokens
    prompt_tokens: int = 0
    completion_tokens: int = 0
    server_ttft_ms: float | None = None  # as reported on the last delta
    server_tpot_ms: float | None = None
    error: str = ""


@dataclass(frozen=True)
class Batch:
    """The requests of one level, rate or request class, and the wall time they took."""

    wall_s: float
    requests: list[RequestResult]


async def run_request(client: AsyncClient, request: BenchRequest) -> RequestResult:
    messages = [{"role": "user", "content": request.prompt}]
    start = time.perf_counter()
    first_token_at = last_token_at = 0.0
    num_tokens = 0
    final: Delta | None = None
    try:
        async for delta in client.generate(messages=messages, max_tokens=request.max_tokens, temperature=0.0):
            if delta.token_ids or delta.text:
                last_token_at = time.perf_counter()
                first_token_at = first_token_at or last_token_at
                num_tokens += len(delta.token_ids)
            if delta.finish_reason:
                final = delta
    except GenerationError as e:
        return RequestResult(error=str(e))
    if final is None or not first_token_at:
        return RequestResult(error="stream ended without a finish_reason or without a token")
    num_tokens = final.completion_tokens or num_tokens
    return RequestResult(
        ttft_ms=(first_token_at - start) * 1e3,
        tpot_ms=(last_token_at - first_token_at) * 1e3 / (num_tokens - 1) if num_tokens > 1 else None,
        prompt_tokens=final.prompt_tokens,
        completion_tokens=num_tokens,
        server_ttft_ms=final.ttft_ms,
        server_tpot_ms=final.tpot_ms,
    )


async def closed_loop(client: AsyncClient, requests: list[BenchRequest], concurrency: int) -> Batch:
    """Send `requests` with `concurrency` in flight; results come back in request order."""
    results: list[RequestResult | None] = [None] * len(requests)
    indices = iter(range(len(requests)))  # shared: each worker takes the next unsent request

    async def worker() -> None:
        for i in indices:
            results[i] = await run_request(client, requests[i])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return Batch(time.perf_counter() - start, [r for r in results if r is not None])


async def open_loop(client: AsyncClient, requests: list[BenchRequest], arrivals_s: list[float]) -> Batch:
    """Send requests[i] at arrivals_s[i] seconds after the start; results in request order."""
    start = time.perf_counter()

    async def send_at(request: BenchRequest, at_s: float) -> RequestResult:
        await asyncio.sleep(max(0.0, start + at_s - time.perf_counter()))
        return await run_request(client, request)

    results = await asyncio.gather(*(send_at(r, t) for r, t in zip(requests, arrivals_s)))
    return Batch(time.perf_counter() - start, list(results))


async def prefill_heavy_mix(
    client: AsyncClient, short: list[BenchRequest], num_streams: int, num_long: int, long_interval_s: float
) -> tuple[Batch, Batch]:
    """The short streams' batch and the long prompts' batch. The streams cycle through `short`."""
    short_results: list[RequestResult] = []
    long_done = asyncio.Event()

    async def stream(offset: int) -> None:
        i = offset
        while not long_done.is_set():
            short_results.append(await run_request(client, short[i % len(short)]))
            i += num_streams

    async def long_prompts() -> list[RequestResult]:
        await asyncio.sleep(MIX_LEAD_IN_S)
        arrivals = [i * long_interval_s for i in range(num_long)]
        batch = await open_loop(client, [long_request(i) for i in range(num_long)], arrivals)
        long_done.set()
        return batch.requests

    start = time.perf_counter()
    streams = asyncio.gather(*(stream(k) for k in range(num_streams)))
    long_results = await long_prompts()
    await streams
    wall_s = time.perf_counter() - start
    return Batch(wall_s, short_results), Batch(wall_s, long_results)

