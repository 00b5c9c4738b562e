"""The two servers of `make bench-peers`, measured from the client side on the same requests.

  llama.cpp   `python -m llama_cpp.server` from the peers venv, under `taskset -c CPUS` with one
              thread per CPU, --interrupt_requests False (by default a waiting request cuts the
              stream in progress short). Requests go to /v1/chat/completions (streaming, SSE),
              each from its own client thread (urllib: the main venv has no HTTP client library).
              EOS and <|endoftext|> get logit_bias -100, so every answer runs to max_tokens.
  EdgeLLM     the four services (bench/stacks.py) through the gRPC client (bench/load.py's
              run_request), on the same chat messages; the API has no ignore-EOS, so the prompts
              are bench/precision.py's long-answer ones, and the mean answer length is reported.

Per stream level S: S requests at once, one per prompt (SERVICE_PROMPTS cycled), after one
unmeasured warm-up request. tok/s = completion tokens / wall time; TPOT at S=1 = (last token's
arrival - first token's) / (tokens - 1), client side. Prefill at P tokens: one raw prompt of about P
tokens ("Document i." + bench/workload.py's prose, a different i each time, so that no prefix cache
applies), max_tokens 1: prompt tokens / time to the first token; best of 3 after a warm-up.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from bench.load import run_request
from bench.precision import SERVICE_PROMPTS, decode_state
from bench.stacks import started_stack
from bench.workload import LONG_PROSE, BenchRequest
from edgellm.client import AsyncClient
from edgellm.launch import free_port

EOS_BIAS = {"0": -100.0, "2": -100.0}  # SmolLM2's <|endoftext|> and <|im_end|>
NUM_PREFILL_REPEATS = 3
PROSE_TOKENS = 102  # LONG_PROSE with SmolLM2's tokenizer (bench/workload.py)
REQUEST_TIMEOUT_S = 600.0


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": SERVICE_PROMPTS[i % len(SERVICE_PROMPTS)]}]


def long_prompt(num_tokens: int, index: int) -> str:
    return f"Document {index}. " + LONG_PROSE * max(1, round(num_tokens / PROSE_TOKENS)) + "Summarize it."


class Budget:
    """A row's time budget: a level or prefill size that would start after it (or, given how long it is
    expected to take, end after it) is recorded as skipped."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds if seconds else float("inf")

    def allows(self, row: dict[str, Any], key: str, expected_s: float = 0.0) -> bool:
        if time.monotonic() + expected_s < self.deadline:
            return True
        row.setdefault("skipped", []).append(key)
        return False


def level_result(wall_s: float, results: list[dict[str, Any]]) -> dict[str, Any]:
    tokens = [r["completion_tokens"] for r in results]
    out = {"num_streams": len(results), "num_tokens": sum(tokens), "wall_s": wall_s,
           "tokens_per_s": sum(tokens) / wall_s, "completion_tokens_mean": sum(tokens) / len(tokens)}
    if len(results) == 1 and results[0].get("tpot_ms") is not None:
        out["tpot_ms"] = results[0]["tpot_ms"]
    return out


def best_prefill(runs: list[tuple[int, float]]) -> dict[str, Any]:
    """runs: (prompt tokens, seconds to the first token); the first is the warm-up."""
    tokens, wall = min(runs[1:], key=lambda r: r[1] / r[0])
    return {"prompt_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall}


# ---- llama.cpp's server ---------------------------------------------------------------------------
def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S)


def llama_chat(base: str, i: int, max_tokens: int) -> dict[str, Any]:
    """One streamed chat completion: token arrival times from the SSE chunks that carry text."""
    body = {"messages": messages(i), "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "logit_bias": EOS_BIAS}
    times: list[float] = []
    finish = None
    with _post(f"{base}/v1/chat/completions", body) as response:
        for line in response:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice.get("delta", {}).get("content"):
                times.append(time.perf_counter())
            finish = choice.get("finish_reason") or finish
    if finish != "length":
        raise RuntimeError(f"llama.cpp server: finish_reason {finish!r}, expected 'length'")
    # a chunk may hold back a token whose text is not complete yet: count max_tokens, time the chunks
    tpot = (times[-1] - times[0]) / (len(times) - 1) * 1e3 if len(times) > 1 else None
    return {"completion_tokens": max_tokens, "tpot_ms": tpot}


def llama_prefill(base: str, num_tokens: int, index: int) -> tuple[int, float]:
    body = {"prompt": long_prompt(num_tokens, index), "max_tokens": 1, "temperature": 0.0}
    start = time.perf_counter()
    with _post(f"{base}/v1/completions", body) as response:
        usage = json.loads(response.read())["usage"]
    return usage["prompt_tokens"], time.perf_counter() - start


@contextlib.contextmanager
def llama_server(python: str, gguf: str, cpus: list[int], settings: dict[str, Any]) -> Iterator[str]:
    """A started llama_cpp.server on a free port, pinned to `cpus`; yields its base URL."""
    port = free_port()
    settings = {"n_threads": len(cpus), "n_threads_batch": len(cpus), **settings}  # settings may override
    argv = ["taskset", "-c", ",".join(map(str, cpus)), python, "-m", "llama_cpp.server", "--model", gguf,
            "--host", "127.0.0.1", "--port", str(port), "--interrupt_requests", "False"]
    for key, value in settings.items():
        argv += [f"--{key}", str(value)]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(f"{base}/v1/models", timeout=2).close()
                    break
                except (urllib.error.URLError, ConnectionError, TimeoutError):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        log.seek(0)
                        raise RuntimeError(f"llama_cpp.server did not start: {log.read()[-2000:].decode()}")
                    time.sleep(0.5)
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def run_llama_server(python: str, gguf: str, cpus: list[int], settings: dict[str, Any], streams: list[int],
                     new_tokens: int, prefill: list[int], budget: Budget) -> dict[str, Any]:
    row: dict[str, Any] = {"cpus": cpus, "threads": settings.get("n_threads", len(cpus)), "settings": settings,
                           "weight_bytes": os.path.getsize(gguf)}
    with llama_server(python, gguf, cpus, settings) as base, \
            concurrent.futures.ThreadPoolExecutor(max(streams)) as pool:
        llama_chat(base, 0, min(8, new_tokens))  # warm-up
        for s in streams:
            # it serves requests one after another: a level takes about s x new_tokens x TPOT
            tpot_ms = row.get("streams_1", {}).get("tpot_ms") or 0.0
            if not budget.allows(row, f"streams_{s}", s * new_tokens * tpot_ms / 1e3):
                continue
            start = time.perf_counter()
            results = list(pool.map(lambda i: llama_chat(base, i, new_tokens), range(s)))
            row[f"streams_{s}"] = level_result(time.perf_counter() - start, results)
            print(f"[llamacpp-server {cpus}] {s} streams: {row[f'streams_{s}']['tokens_per_s']:.1f} tok/s",
                  file=sys.stderr, flush=True)
        for n in (n for n in prefill if budget.allows(row, f"prefill_{n}")):
            row[f"prefill_{n}"] = best_prefill([llama_prefill(base, n, n * 10 + i)
                                                for i in range(1 + NUM_PREFILL_REPEATS)])
    return row


# ---- EdgeLLM through the four services ------------------------------------------------------------
async def _stack_load(address: str, streams: list[int], new_tokens: int, prefill: list[int],
                      budget: Budget) -> dict[str, Any]:
    row: dict[str, Any] = {}
    async with AsyncClient(address, timeout_s=REQUEST_TIMEOUT_S) as client:
        async def chat(i: int, max_tokens: int) -> dict[str, Any]:
            r = await run_request(client, BenchRequest(SERVICE_PROMPTS[i % len(SERVICE_PROMPTS)], max_tokens))
            if r.error:
                raise RuntimeError(f"EdgeLLM request failed: {r.error}")
            return {"completion_tokens": r.completion_tokens, "tpot_ms": r.tpot_ms}

        async def first_token(n: int, index: int) -> tuple[int, float]:
            start = time.perf_counter()
            async for delta in client.generate(prompt=long_prompt(n, index), max_tokens=1, temperature=0.0):
                if delta.finish_reason:
                    return delta.prompt_tokens, time.perf_counter() - start
            raise RuntimeError("EdgeLLM prefill: the stream ended without a finish_reason")

        await chat(0, min(8, new_tokens))  # warm-up
        for s in streams:
            if not budget.allows(row, f"streams_{s}"):
                continue
            start = time.perf_counter()
            results = await asyncio.gather(*(chat(i, new_tokens) for i in range(s)))
            row[f"streams_{s}"] = level_result(time.perf_counter() - start, list(results))
            print(f"[edgellm-services] {s} streams: {row[f'streams_{s}']['tokens_per_s']:.1f} tok/s",
                  file=sys.stderr, flush=True)
        for n in (n for n in prefill if budget.allows(row, f"prefill_{n}")):
            row[f"prefill_{n}"] = best_prefill([await first_token(n, n * 10 + i) for i in range(1 + NUM_PREFILL_REPEATS)])
    return row


def run_edgellm_stack(stack_name: str, streams: list[int], new_tokens: int, prefill: list[int], budget: Budget,
                      model_flags: tuple[str, ...] = ()) -> dict[str, Any]:
    """One stack of bench/stacks.py ("disaggregated": decode alone on CPU 1 with one thread;
    "default": as `edgellm up` places it), its decode weights at their default (INT4-AWQ)."""
    with started_stack(stack_name, model_flags) as (stack, description):
        state = decode_state(stack)
        row = {"stack": stack_name, "placement": description["placement"], "weights": state.load.weights,
               "weight_bytes": state.load.weight_bytes}
        row.update(asyncio.run(_stack_load(stack.address("gateway"), streams, new_tokens, prefill, budget)))
    return row


def peers_python() -> pathlib.Path:
    return pathlib.Path(os.environ.get("EDGELLM_PEERS_DIR", pathlib.Path.home() / ".cache/edgellm/peers")) / "venv/bin/python"
