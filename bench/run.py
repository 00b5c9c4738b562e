"""`python -m bench.run` (`make bench`): disaggregated vs colocated serving, same machine, same run.

Starts each stack of --stacks in turn (bench/stacks.py: placement and flags) on free
loopback ports, or uses one running stack given with --gateway (reported as "external").
After two unmeasured warm-up requests (one short, one long prompt) it runs the scenarios
of --scenarios against it, with the seeded workload of bench/workload.py:

  closed   closed loop at each --concurrency level, --closed-requests requests per level
  poisson  open loop, Poisson arrivals at each of --rates (requests/s), --poisson-requests each
  mix      prefill-heavy: --mix-streams short streams (max_tokens 64) decode while --mix-long
           long prompts (~1,460 tokens, max_tokens 4) arrive every --mix-interval-s; reported
           as two rows, "short" (the streams: their TPOT shows decode stalls) and "long".
           The default interval, 10 s, keeps the one-core prefill service of the
           disaggregated stack below capacity (such a prefill takes about 9 s there); at
           1 s its queue grows without bound and the mix measures queueing instead.

Each row reports requests, errors, output tok/s, client-side TTFT and TPOT p50/p99 and
goodput under --slo-ttft-ms and --slo-tpot-ms (bench/report.py). Writes metadata and rows
as JSON (--out), prints one markdown table per scenario and summary lines, and exits 1 if
a stack did not start or any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time
from typing import Any, Callable

from bench.load import MIX_LEAD_IN_S, Batch, closed_loop, open_loop, prefill_heavy_mix, run_request
from bench.report import Slo, summarize, summary_lines, tables
from bench.stacks import STACK_FLAGS, running_stack
from bench.workload import LONG_MAX_TOKENS, LONG_REPEATS, MIX_SHORT_MAX_TOKENS, SHORT_MAX_TOKENS
from bench.workload import arrival_times, long_request, sample_requests
from edgellm.client import AsyncClient

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SCENARIOS = ("closed", "poisson", "mix")
REQUEST_TIMEOUT_S = 300.0  # a hung request fails instead of stalling the whole run
EXTERNAL = "external"


def comma_list(item: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda text: [item(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    p.add_argument("--stacks", type=comma_list(str), default=list(STACK_FLAGS), help=", ".join(STACK_FLAGS))
    p.add_argument("--gateway", help="HOST:PORT of a running stack to measure instead of starting --stacks")
    p.add_argument("--scenarios", type=comma_list(str), default=list(SCENARIOS), help=", ".join(SCENARIOS))
    p.add_argument("--concurrency", type=comma_list(int), default=[1, 8, 32], help="closed-loop levels")
    p.add_argument("--closed-requests", type=comma_list(int), default=[16, 32, 64], help="requests per level")
    p.add_argument("--rates", type=comma_list(float), default=[1.0, 2.0, 4.0], help="Poisson rates, requests/s")
    p.add_argument("--poisson-requests", type=int, default=16, help="requests per Poisson rate")
    p.add_argument("--mix-streams", type=int, default=8, help="short closed-loop streams in the mix")
    p.add_argument("--mix-long", type=int, default=3, help="long prompts in the mix")
    p.add_argument("--mix-interval-s", type=float, default=10.0, help="seconds between long prompts in the mix")
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=250.0)
    p.add_argument("--seed", type=int, default=0, help="seed of the request draw and the arrival times")
    p.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "bench" / "results" / "bench.json")
    args = p.parse_args(argv)
    unknown = (set(args.stacks) - set(STACK_FLAGS)) | (set(args.scenarios) - set(SCENARIOS))
    if unknown:
        p.error(f"unknown stack or scenario: {sorted(unknown)}")
    if len(args.concurrency) != len(args.closed_requests):
        p.error("--concurrency and --closed-requests need one value per level")
    counts = [*args.concurrency, *args.closed_requests, args.poisson_requests, args.mix_streams, args.mix_long]
    if min(counts) < 1 or min(args.rates, default=1) <= 0 or args.mix_interval_s <= 0:
        p.error("levels, request counts, rates and --mix-interval-s must be > 0")
    if args.gateway:
        args.stacks = [EXTERNAL]
    return args


async def run_scenarios(target: str, stack: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms)
    rows: list[dict[str, Any]] = []

    def add(scenario: str, level: str, params: dict[str, Any], batch: Batch) -> None:
        row = {"stack": stack, "scenario": scenario, "level": level, "params": params, **summarize(batch, slo)}
        rows.append(row)
        print(f"[{stack}] {scenario} {level}: {row['num_requests']} requests, {row['num_errors']} errors, "
              f"{batch.wall_s:.1f} s", file=sys.stderr, flush=True)

    async with AsyncClient(target, timeout_s=REQUEST_TIMEOUT_S) as client:
        for warmup in (sample_requests(args.seed, 1)[0], long_request(-1)):
            if error := (await run_request(client, warmup)).error:
                raise RuntimeError(f"warm-up request failed: {error}")
        if "closed" in args.scenarios:
            for c, n in zip(args.concurrency, args.closed_requests):
                batch = await closed_loop(client, sample_requests(args.seed, n), c)
                add("closed", f"c={c}", {"concurrency": c}, batch)
        if "poisson" in args.scenarios:
            requests = sample_requests(args.seed, args.poisson_requests)
            for rate in args.rates:
                batch = await open_loop(client, requests, arrival_times(args.seed, len(requests), rate))
                add("poisson", f"{rate:g}/s", {"rate_per_s": rate}, batch)
        if "mix" in args.scenarios:
            short = sample_requests(args.seed, 8 * args.mix_streams, MIX_SHORT_MAX_TOKENS)  # the streams cycle it
            streams, longs = await prefill_heavy_mix(
                client, short, args.mix_streams, args.mix_long, args.mix_interval_s
            )
            params = {"num_streams": args.mix_streams, "num_long": args.mix_long,
                      "long_interval_s": args.mix_interval_s}
            add("mix", "short", params, streams)
            add("mix", "long", params, longs)
    return rows


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def run_meta(args: argparse.Namespace, model: str, stacks: dict[str, Any], failures: dict[str, str]) -> dict[str, Any]:
    return {
        "model": model,
        "stacks": stacks,
        "stack_errors": failures,
        "scenarios": args.scenarios,
        "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms},
        "workload": {
            "seed": args.seed,
            "temperature": 0.0,
            "short_max_tokens": list(SHORT_MAX_TOKENS),
            "closed": {"concurrency": args.concurrency, "num_requests": args.closed_requests},
            "poisson": {"rates_per_s": args.rates, "num_requests": args.poisson_requests},
            "mix": {
                "num_streams": args.mix_streams,
                "short_max_tokens": MIX_SHORT_MAX_TOKENS,
                "num_long": args.mix_long,
                "long_interval_s": args.mix_interval_s,
                "lead_in_s": MIX_LEAD_IN_S,
                "long_prose_repeats": LONG_REPEATS,
                "long_max_tokens": LONG_MAX_TOKENS,
            },
        },
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "command": shlex.join([os.path.basename(sys.executable), "-m", "bench.run", *sys.argv[1:]]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def model_name(args: argparse.Namespace) -> str:
    """The default model's name; converting it here, once, spares the services a race to do it."""
    if args.gateway:
        return "(external)"
    from edgellm.model_store import resolve_model_dir

    return resolve_model_dir("").name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = model_name(args)
    results: list[dict[str, Any]] = []
    described: dict[str, Any] = {}
    failures: dict[str, str] = {}
    start = time.monotonic()
    for stack in args.stacks:
        target: contextlib.AbstractContextManager[tuple[str, dict[str, Any]]]
        if args.gateway:
            target = contextlib.nullcontext((args.gateway, {"gateway": args.gateway}))
        else:
            print(f"[{stack}] starting ...", file=sys.stderr, flush=True)
            target = running_stack(stack)
        try:
            with target as (address, description):
                described[stack] = description
                results += asyncio.run(run_scenarios(address, stack, args))
        except (RuntimeError, TimeoutError) as e:  # a service failed to start, or a warm-up request failed
            failures[stack] = str(e)
            print(f"[{stack}] failed: {e}", file=sys.stderr, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    meta = run_meta(args, model, described, failures)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(tables(results, args.scenarios))
    print()
    print("\n".join(summary_lines(results, args.stacks, min(args.concurrency), max(args.concurrency))))
    num_errors = sum(r["num_errors"] for r in results)
    print(f"\nwrote {args.out} after {time.monotonic() - start:.0f} s; {num_errors} failed requests, "
          f"{len(failures)} failed stacks", file=sys.stderr)
    return 1 if failures or num_errors else 0


if __name__ == "__main__":
    sys.exit(main())
