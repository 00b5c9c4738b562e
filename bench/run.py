"""`python -m bench.run` (`make bench`): closed-loop latency and throughput of the whole stack.

Starts the four services on free loopback ports with the default model and config
(EDGELLM_* variables still apply, as everywhere), or uses a running stack given with
--gateway. After one unmeasured warm-up request it runs, for each concurrency level c,
--num-requests fixed chat requests (bench/workload.py) with c in flight, and measures:

  output tok/s   completion tokens of the level / the level's wall time
  TTFT           client side: request sent -> first delta carrying tokens
  TPOT           client side: (last token time - first token time) / (tokens - 1)
  server means   ttft_ms / tpot_ms as reported by the gateway on each last delta

Writes the results and the run's metadata as JSON (--out), prints a markdown table, and
exits 1 if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import tempfile
from typing import Any, Iterator

import numpy as np

from bench.workload import PROMPTS, REQUEST_TIMEOUT_S, LevelResult, run_level, run_request, sample_prompts
from edgellm import config as cfg
from edgellm.client import AsyncClient

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
TABLE_COLUMNS = (
    ("concurrency", "concurrency"),
    ("requests", "num_requests"),
    ("output tok/s", "output_tokens_per_s"),
    ("TTFT p50 ms", "ttft_ms_p50"),
    ("TTFT p99 ms", "ttft_ms_p99"),
    ("TPOT p50 ms", "tpot_ms_p50"),
    ("TPOT p99 ms", "tpot_ms_p99"),
    ("errors", "num_errors"),
)


def levels(text: str) -> list[int]:
    return [int(c) for c in text.split(",") if c.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--gateway", help="HOST:PORT of a running stack; default: start one on free ports")
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "bench" / "results" / "bench.json")
    parser.add_argument("--concurrency", type=levels, default="1,4", help="comma-separated concurrency levels")
    parser.add_argument("--num-requests", type=int, default=8, help="requests per concurrency level")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt draw")
    args = parser.parse_args(argv)
    if not args.concurrency or min(args.concurrency) < 1 or args.num_requests < 1 or args.max_tokens < 1:
        parser.error("--concurrency levels, --num-requests and --max-tokens must be >= 1")
    return args


@contextlib.contextmanager
def local_stack() -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield the gateway address and model facts of a fresh stack; stop it on the way out."""
    from edgellm.engine.weights import resolve_model_dir
    from edgellm.launch import Stack, free_port_argv

    config = cfg.parse(free_port_argv())
    model_dir = resolve_model_dir(config.model.model)  # convert the default model once, before three services need it
    with tempfile.TemporaryDirectory(prefix="edgellm-bench-") as log_dir:
        stack = Stack(config, log_dir=log_dir)
        stack.start_and_wait()
        try:
            yield stack.address("gateway"), {
                "model": model_dir.name,
                "dtype": config.model.dtype,
                "placement": dataclasses.asdict(config.placement),
            }
        finally:
            stack.stop()


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (numpy's default); None without values."""
    return float(np.percentile(values, q)) if values else None


def mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(level: LevelResult) -> dict[str, Any]:
    done = [r for r in level.requests if not r.error]
    ttfts = [r.ttft_ms for r in done if r.ttft_ms is not None]
    tpots = [r.tpot_ms for r in done if r.tpot_ms is not None]
    num_output_tokens = sum(r.completion_tokens for r in done)
    return {
        "concurrency": level.concurrency,
        "num_requests": len(level.requests),
        "num_errors": len(level.requests) - len(done),
        "wall_s": level.wall_s,
        "num_output_tokens": num_output_tokens,
        "output_tokens_per_s": num_output_tokens / level.wall_s,
        "ttft_ms_p50": percentile(ttfts, 50),
        "ttft_ms_p99": percentile(ttfts, 99),
        "tpot_ms_p50": percentile(tpots, 50),
        "tpot_ms_p99": percentile(tpots, 99),
        "server_ttft_ms_mean": mean([r.server_ttft_ms for r in done if r.server_ttft_ms is not None]),
        "server_tpot_ms_mean": mean([r.server_tpot_ms for r in done if r.server_tpot_ms is not None]),
        "errors": sorted({r.error for r in level.requests if r.error}),
    }


async def run_benchmark(target: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    prompts = sample_prompts(args.seed, args.num_requests)
    async with AsyncClient(target, timeout_s=REQUEST_TIMEOUT_S) as client:
        warmup = await run_request(client, PROMPTS[0], args.max_tokens)
        if warmup.error:
            raise RuntimeError(f"warm-up request failed: {warmup.error}")
        return [summarize(await run_level(client, prompts, c, args.max_tokens)) for c in args.concurrency]


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def run_meta(args: argparse.Namespace, model: dict[str, Any]) -> dict[str, Any]:
    return {
        **model,
        "gateway": args.gateway or "local stack",
        "workload": {
            "num_prompts": len(PROMPTS),
            "num_requests": args.num_requests,
            "max_tokens": args.max_tokens,
            "temperature": 0.0,
            "seed": args.seed,
        },
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "command": shlex.join([os.path.basename(sys.executable), "-m", "bench.run", *sys.argv[1:]]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def markdown_table(results: list[dict[str, Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:.1f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(title for title, _ in TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(row[key]) for _, key in TABLE_COLUMNS) + " |" for row in results]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gateway: contextlib.AbstractContextManager[tuple[str, dict[str, Any]]]
    if args.gateway:
        gateway = contextlib.nullcontext((args.gateway, {"model": None, "dtype": None, "placement": None}))
    else:
        print("starting a local stack ...", file=sys.stderr, flush=True)
        gateway = local_stack()
    try:
        with gateway as (target, model):
            results = asyncio.run(run_benchmark(target, args))
    except (RuntimeError, TimeoutError) as e:  # a service failed to start, or the warm-up failed
        print(f"bench: {e}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": run_meta(args, model), "results": results}, indent=2) + "\n")
    print(markdown_table(results))
    print(f"\nwrote {args.out}", file=sys.stderr)
    return 1 if any(r["num_errors"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
