"""`python -m bench.gateway` (`make bench-gateway`): does the gateway keep up?

One stack of the four services on the tests' tiny random-weight model (tests/conftest.py: 4
layers, hidden 64; fp32 in both phases), so that the engines are not what is measured:

  admitted/s     --concurrency clients in a closed loop send short requests (a 1-token
                 prompt, max_tokens 1, greedy) for --seconds: over HTTP (POST /v1/completions,
                 aiohttp client, keep-alive) and over gRPC (edgellm.client.AsyncClient).
                 Reported: completed requests/s, errors, and the gateway process's CPU time
                 per request (from /proc: what the gateway's loop spends, whatever else runs
                 on the machine).
  per token      one greedy stream of --stream-tokens tokens, --streams times over each path:
                 straight from the engine (Decode/GenerateLocal on the decode service, with
                 the cluster credential), through the gateway's gRPC, and through its HTTP
                 (server-sent events). Reported: p50/p99 of the gap between tokens, and what
                 the gateway adds per token: the gap's p50/p99 minus the engine's, and the
                 whole stream's time after the first token minus the engine's, over tokens;
                 and the gateway process's CPU time per streamed token.

The client runs in this process on one uvloop event loop and shares the machine's CPUs with
the services; on a 2-core VM it takes a large share of them, so admitted/s is a floor for what
the gateway can admit. Writes bench/results/gateway.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import sys
import time
from typing import Any, Awaitable, Callable

import aiohttp
import numpy as np
import uvloop

from bench.stacks import tiny_model_stack
from edgellm.client import AsyncClient
from edgellm.v1 import common_pb2, decode_pb2_grpc

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PROMPT = "Hi"
STREAM_PROMPT = "Once upon a time"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def closed_loop(send: Callable[[], Awaitable[None]], concurrency: int, seconds: float) -> tuple[int, int, float]:
    """(num_ok, num_errors, wall_s) of `concurrency` workers sending until `seconds` have passed."""
    num_ok = num_errors = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal num_ok, num_errors
        while time.perf_counter() < end:
            try:
                await send()
                num_ok += 1
            except Exception:  # counted: a refused or failed request is not admitted
                num_errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return num_ok, num_errors, time.perf_counter() - start


async def admitted(stack: Any, transport: str, concurrency: int, seconds: float) -> dict[str, Any]:
    gateway_pid = stack.procs["gateway"].pid
    url = f"http://127.0.0.1:{stack.config.network.gateway_http_port}/v1/completions"
    body = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session, \
            AsyncClient(stack.address("gateway"), timeout_s=60) as client:

        async def http() -> None:
            async with session.post(url, json=body) as r:
                if r.status != 200:
                    raise RuntimeError(f"HTTP {r.status}")
                await r.read()

        async def grpc() -> None:
            async for _ in client.generate(prompt=PROMPT, max_tokens=1, temperature=0):
                pass

        send = http if transport == "http" else grpc
        await closed_loop(send, concurrency, 1.0)  # warm-up: connections, first batches
        cpu_before = cpu_seconds(gateway_pid)
        num_ok, num_errors, wall_s = await closed_loop(send, concurrency, seconds)
        cpu_s = cpu_seconds(gateway_pid) - cpu_before
    return {"transport": transport, "concurrency": concurrency, "requests": num_ok, "errors": num_errors,
            "wall_s": wall_s, "requests_per_s": num_ok / wall_s,
            "gateway_cpu_ms_per_request": cpu_s * 1e3 / num_ok if num_ok else None}


# ---- one stream, three paths -----------------------------------------------------------------


async def engine_stream(stack: Any, prompt_ids: list[int], num_tokens: int, i: int) -> list[tuple[float, int]]:
    """(arrival, number of tokens) of each message of Decode/GenerateLocal, straight from the engine."""
    channel = stack.security.channel(stack.address("decode"))
    spec = common_pb2.RequestSpec(request_id=f"bench-gateway-{i}", prompt_token_ids=prompt_ids,
                                  sampling=common_pb2.SamplingParams(temperature=0.0), max_new_tokens=num_tokens)
    arrivals = []
    try:
        async for delta in decode_pb2_grpc.DecodeStub(channel).GenerateLocal(
                common_pb2.GenerateLocalRequest(spec=spec), timeout=120):
            arrivals.append((time.perf_counter(), len(delta.token_ids)))
    finally:
        await channel.close()
    return arrivals


async def grpc_stream(stack: Any, num_tokens: int) -> list[tuple[float, int]]:
    arrivals = []
    async with AsyncClient(stack.address("gateway"), timeout_s=120) as client:
        async for delta in client.generate(prompt=STREAM_PROMPT, max_tokens=num_tokens, temperature=0):
            if delta.token_ids:
                arrivals.append((time.perf_counter(), len(delta.token_ids)))
    return arrivals


async def http_stream(stack: Any, num_tokens: int) -> list[tuple[float, int]]:
    """One SSE event per token with text; tokens without text (a partial character) come with the next."""
    url = f"http://127.0.0.1:{stack.config.network.gateway_http_port}/v1/completions"
    body = {"prompt": STREAM_PROMPT, "max_tokens": num_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    arrivals: list[tuple[float, int]] = []
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as r:
        async for line in r.content:
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                if event["choices"] and event["choices"][0]["text"]:
                    arrivals.append((time.perf_counter(), 1))
    return arrivals


def gaps_ms(arrivals: list[tuple[float, int]]) -> list[float]:
    """Per-token gaps: a message of k tokens counts as k gaps of 1/k of its wait."""
    out = []
    for (before, _), (at, n) in zip(arrivals, arrivals[1:]):
        out += [(at - before) * 1e3 / n] * n
    return out


async def per_token(stack: Any, num_tokens: int, num_streams: int, prompt_ids: list[int]) -> dict[str, Any]:
    paths = {
        "engine": lambda i: engine_stream(stack, prompt_ids, num_tokens, i),
        "gateway gRPC": lambda i: grpc_stream(stack, num_tokens),
        "gateway HTTP": lambda i: http_stream(stack, num_tokens),
    }
    gaps: dict[str, list[float]] = {name: [] for name in paths}
    after_first_ms: dict[str, list[float]] = {name: [] for name in paths}
    gateway_cpu_s = dict.fromkeys(paths, 0.0)
    num_tokens_seen = dict.fromkeys(paths, 0)
    gateway_pid = stack.procs["gateway"].pid
    for i in range(num_streams + 1):  # the first round warms up
        for name, stream in paths.items():
            cpu_before = cpu_seconds(gateway_pid)
            arrivals = await stream(i)
            if i and len(arrivals) > 1:
                gateway_cpu_s[name] += cpu_seconds(gateway_pid) - cpu_before
                num_tokens_seen[name] += sum(n for _, n in arrivals)
                gaps[name] += gaps_ms(arrivals)
                num_after_first = sum(n for _, n in arrivals[1:])
                after_first_ms[name].append((arrivals[-1][0] - arrivals[0][0]) * 1e3 / num_after_first)
    rows = {}
    for name in paths:
        p50, p99 = (float(np.percentile(gaps[name], q)) for q in (50, 99))
        rows[name] = {"num_gaps": len(gaps[name]), "gap_ms_p50": p50, "gap_ms_p99": p99,
                      "ms_per_token_mean": float(np.mean(after_first_ms[name])),
                      "gateway_cpu_ms_per_token": gateway_cpu_s[name] * 1e3 / max(1, num_tokens_seen[name])}
    for name in ("gateway gRPC", "gateway HTTP"):
        for key in ("gap_ms_p50", "gap_ms_p99", "ms_per_token_mean"):
            rows[name][f"added_{key}"] = rows[name][key] - rows["engine"][key]
    return rows


def table(admits: list[dict[str, Any]], tokens: dict[str, Any]) -> str:
    lines = ["| transport | clients | requests | errors | requests/s | gateway CPU ms/request |",
             "|---|---|---|---|---|---|"]
    for r in admits:
        cpu = r["gateway_cpu_ms_per_request"]
        lines.append(f"| {r['transport']} | {r['concurrency']} | {r['requests']} | {r['errors']} | "
                     f"{r['requests_per_s']:.0f} | {'-' if cpu is None else f'{cpu:.2f}'} |")
    lines += ["", "| path | token gap p50 ms | p99 ms | ms/token after the first | added p50 ms | added p99 ms | "
              "added ms/token | gateway CPU ms/token |", "|---|---|---|---|---|---|---|---|"]
    for name, r in tokens.items():
        added = [r.get(f"added_{k}") for k in ("gap_ms_p50", "gap_ms_p99", "ms_per_token_mean")]
        cells = " | ".join("-" if a is None else f"{a:+.2f}" for a in added)
        cpu = "-" if name == "engine" else f"{r['gateway_cpu_ms_per_token']:.3f}"
        lines.append(f"| {name} | {r['gap_ms_p50']:.2f} | {r['gap_ms_p99']:.2f} | {r['ms_per_token_mean']:.2f} "
                     f"| {cells} | {cpu} |")
    return "\n".join(lines)


async def measure(stack: Any, args: argparse.Namespace, prompt_ids: list[int]) -> dict[str, Any]:
    admits = []
    for concurrency in args.concurrency:
        for transport in ("http", "grpc"):
            row = await admitted(stack, transport, concurrency, args.seconds)
            admits.append(row)
            print(f"[gateway] {row}", file=sys.stderr, flush=True)
    tokens = await per_token(stack, args.stream_tokens, args.streams, prompt_ids)
    return {"admitted": admits, "per_token": tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per transport and level")
    parser.add_argument("--stream-tokens", type=int, default=256)
    parser.add_argument("--streams", type=int, default=5, help="measured streams per path")
    parser.add_argument("--max-inflight-prefills", type=int, default=64,
                        help="the gateway's prefill pool (default 8 there): raised so the engines batch the short "
                             "requests instead of the pool spacing them")
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "bench" / "results" / "gateway.json")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    with tiny_model_stack("bench-gateway", max_inflight_prefills=args.max_inflight_prefills) as stack:
        prompt_ids = list(AutoTokenizer.from_pretrained(stack.config.model.model)(STREAM_PROMPT)["input_ids"])
        results = uvloop.run(measure(stack, args, prompt_ids))
    report = {"command": " ".join(sys.argv), "date": datetime.datetime.now().isoformat(), "cpus": os.cpu_count(),
              "load_average_1m_at_end": os.getloadavg()[0],  # other work on the machine skews every figure
              "model": "tiny random-weight Llama (tests/conftest.py), fp32", **results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(results["admitted"], results["per_token"]))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
