"""The fixed benchmark workload and the closed-loop load generator that sends it.

Every request is one user chat message drawn, with a seeded `random.Random`, from PROMPTS
and sent greedily (temperature 0) with the same max_tokens, so two runs with the same
seed do the same work. A level runs its requests through `concurrency` workers that each
send their next request as soon as their previous one ends (closed loop), so exactly
`concurrency` requests are in flight until the list runs out.

Client-side timings are taken with `time.perf_counter()` from the call to the first
delta that carries tokens (TTFT) and between the first and the last such delta (TPOT).
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass

from edgellm.client import AsyncClient, Delta, GenerationError

PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three uses for a paperclip.",
    "What is 17 times 23?",
    "Give me a short tip for learning a new language.",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish and German.",
    "Write one sentence that starts a mystery story.",
    "What does a CPU do?",
    "Suggest a name for a friendly robot.",
    "How do I boil an egg?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "What are the primary colors?",
    "Write a Python function that adds two numbers.",
)

REQUEST_TIMEOUT_S = 300.0  # a hung request fails instead of stalling the whole run


def sample_prompts(seed: int, num_requests: int) -> list[str]:
    """The prompts of one level: the same list for every level of a run with this seed."""
    return random.Random(seed).choices(PROMPTS, k=num_requests)


@dataclass(frozen=True)
class RequestResult:
    ttft_ms: float | None = None  # client side; None when no token arrived
    tpot_ms: float | None = None  # client side; None with fewer than two tokens
    completion_tokens: int = 0
    server_ttft_ms: float | None = None  # as reported on the last delta
    server_tpot_ms: float | None = None
    error: str = ""


@dataclass(frozen=True)
class LevelResult:
    concurrency: int
    wall_s: float
    requests: list[RequestResult]


async def run_request(client: AsyncClient, prompt: str, max_tokens: int) -> RequestResult:
    messages = [{"role": "user", "content": prompt}]
    start = time.perf_counter()
    first_token_at = last_token_at = 0.0
    num_tokens = 0
    final: Delta | None = None
    try:
        async for delta in client.generate(messages=messages, max_tokens=max_tokens, temperature=0.0):
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
        completion_tokens=num_tokens,
        server_ttft_ms=final.ttft_ms,
        server_tpot_ms=final.tpot_ms,
    )


async def run_level(client: AsyncClient, prompts: list[str], concurrency: int, max_tokens: int) -> LevelResult:
    """Send `prompts` with `concurrency` in flight; results come back in prompt order."""
    results: list[RequestResult | None] = [None] * len(prompts)
    indices = iter(range(len(prompts)))  # shared: each worker takes the next unsent prompt

    async def worker() -> None:
        for i in indices:
            results[i] = await run_request(client, prompts[i], max_tokens)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall_s = time.perf_counter() - start
    return LevelResult(concurrency, wall_s, [r for r in results if r is not None])

