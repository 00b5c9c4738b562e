"""`python -m bench.fuzz` (`make fuzz`): hostile input against a real stack, counted.

One stack of real processes on the tiny random-weight model (tests/conftest.py), fp32 on both
sides, a default max_tokens of 16. While GoodTraffic (bench/fuzz_harness.py) keeps sending well-formed greedy requests and
comparing each with its solo run, hypothesis generates --generate GenerateRequests for the
gateway's public Generate, then --kv KVChunk streams for decode's internal PushKV (some followed by
the Decode call that claims their KV); strategies in bench/fuzz_inputs.py. Every input is sent and
judged with a deadline, --workers at a time; every --check-every inputs the processes and the monitor's
table are checked. --max-minutes bounds each API's share of the run.

Properties (issue 13): no UNKNOWN/INTERNAL, no hang, no status without details; no dead service and
the monitor's table healthy at the end; no disturbed good request. Writes bench/results/fuzz.json,
prints a table, and exits 1 if any property failed (2 if the stack did not start).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import pathlib
import sys
import threading
import time
from typing import Any, Callable

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from bench.fuzz_harness import FuzzTarget, GoodTraffic, Tally, describe_request, stack_problems, wait_healthy
from bench.fuzz_inputs import generate_requests, kv_cases
from bench.stacks import tiny_model_stack

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# max_tokens 0 (the server's default) must finish as fast as the other valid requests.
STACK_OVERRIDES = {"default_max_tokens": 16}


def fuzz_settings(max_examples: int) -> settings:
    """Many examples, no shrinking (failures are recorded, not raised), no example database."""
    return settings(max_examples=max_examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=list(HealthCheck), print_blob=False)


class Run:
    """One API's share of the run: hypothesis generates inputs on this thread, `workers` threads send
    them (so a slow input does not hold up the rest), until the count is reached, time is up or a
    service died."""

    def __init__(self, target: FuzzTarget, tally: Tally, check_every: int, max_seconds: float, workers: int) -> None:
        self.target, self.tally = target, tally
        self.check_every, self.max_seconds, self.workers = check_every, max_seconds, workers
        self.stack_problems: list[str] = []
        self._lock = threading.Lock()

    def drive(self, api: str, strategy: st.SearchStrategy, send: Callable[[Any], list], describe: Callable[[Any], str],
              count: int, random_seed: int) -> None:
        start = time.monotonic()
        slots = threading.Semaphore(2 * self.workers)  # inputs generated but not yet answered

        def one_input(value: Any) -> None:
            try:
                outcomes = send(value)
                with self._lock:
                    self.tally.add(api, outcomes, describe(value))
                    n = self.tally.num_inputs[api]
                if n % self.check_every == 0:
                    self.stack_problems = stack_problems(self.target.stack)
                    print(f"  {api}: {n} inputs, {time.monotonic() - start:.0f}s, {self.tally.num_problems} problems "
                          f"so far", file=sys.stderr, flush=True)
            finally:
                slots.release()

        with concurrent.futures.ThreadPoolExecutor(self.workers) as pool:

            @seed(random_seed)
            @fuzz_settings(count)
            @given(strategy)
            def generate(value: Any) -> None:
                if self.stack_problems or time.monotonic() - start > self.max_seconds:
                    return
                slots.acquire()
                pool.submit(one_input, value)

            generate()


def print_table(report: dict[str, Any]) -> None:
    codes = sorted({code for by_code in report["outcomes"].values() for code in by_code})
    print(f"{'API':<10}{'inputs':>8}  " + "".join(f"{c:>20}" for c in codes))
    for api, by_code in report["outcomes"].items():
        print(f"{api:<10}{report['inputs'].get(api, ''):>8}  " + "".join(f"{by_code.get(c, 0):>20}" for c in codes))
    print(f"inputs sent: {report['num_inputs']}   UNKNOWN/INTERNAL: {report['num_unknown_internal']}   "
          f"hangs: {report['num_hangs']}   other unclear: {report['num_problems'] - report['num_unknown_internal'] - report['num_hangs']}")
    print(f"good requests: {report['good_requests']['runs']} runs, {report['good_requests']['num_disturbed']} disturbed")
    print("most frequent non-OK statuses:")
    for reason, n in list(report["top_reasons"].items())[:15]:
        print(f"  {n:>6}  {reason[:150]}")
    print(f"dead or unhealthy services: {report['stack_problems'] or 'none'}")
    for f in report["failures"][:20]:
        print(f"  FAIL {f['api']} {f['code']}: {f['details'][:160]!r}\n       input: {f['input'][:300]}")
    print("PASS" if report["passed"] else "FAIL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generate", type=int, default=5000, help="GenerateRequests to send")
    parser.add_argument("--kv", type=int, default=5000, help="PushKV streams to send")
    parser.add_argument("--max-minutes", type=float, default=25.0, help="time limit of each API's share")
    parser.add_argument("--workers", type=int, default=8, help="inputs in flight at once")
    parser.add_argument("--check-every", type=int, default=250, help="check the processes every N inputs")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "bench" / "results" / "fuzz.json")
    args = parser.parse_args(argv)

    with contextlib.ExitStack() as exits:
        try:
            stack = exits.enter_context(tiny_model_stack("fuzz", **STACK_OVERRIDES))
        except (RuntimeError, TimeoutError) as e:
            print(f"stack did not start: {e}", file=sys.stderr)
            return 2
        target, tally = FuzzTarget(stack), Tally()
        good = GoodTraffic(stack).start()
        run = Run(target, tally, args.check_every, args.max_minutes * 60, args.workers)
        started = time.monotonic()
        run.drive("Generate", generate_requests(), lambda r: [target.generate(r)], describe_request, args.generate, args.seed)
        run.drive("PushKV", kv_cases(), target.push_kv, lambda c: c.describe(), args.kv, args.seed)
        seconds = time.monotonic() - started
        good.stop()
        problems = run.stack_problems or wait_healthy(stack)
        target.close()

    report = {
        "command": " ".join(sys.argv), "date": datetime.datetime.now().isoformat(), "seed": args.seed,
        "seconds": round(seconds, 1),
        "inputs": dict(tally.num_inputs), "num_inputs": sum(tally.num_inputs.values()),
        "outcomes": {api: dict(by_code) for api, by_code in tally.counts.items()},
        "num_unknown_internal": tally.count("UNKNOWN", "INTERNAL"), "num_hangs": tally.count("DEADLINE_EXCEEDED"),
        "num_problems": tally.num_problems,
        "good_requests": {"runs": good.num_runs, "num_disturbed": len(good.disturbed), "disturbed": good.disturbed[:20]},
        "stack_problems": problems,
        "top_reasons": dict(tally.reasons.most_common(40)),
        "failures": tally.failures,
    }
    report["passed"] = not (tally.num_problems or good.disturbed or problems)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"wrote {args.out}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
