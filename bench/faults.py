"""`python -m bench.faults` (`make bench-faults`): what a decode failure costs the streams in flight.

Scenarios, each on its own stack of the embedded model with every setting at its default
(health checks every 0.2 s, 0.3 s deadline, down after 2 misses; the gateway probes a service
whose streams have been quiet for 50 ms, 200 ms deadline) but for the precision, placed as `edgellm up` places them on this
2-core machine: prefill on CPU 0, decode on CPU 1, one torch thread each, standing in for two
devices (unpinned, the engines' OpenMP teams fight over the cores, and a cut-off decode service
that still computes would slow the takeover on the other "device"):

  kill9         kill -9 of the only decode service: streams go on in degraded mode (prefill decodes),
                reusing the prompt KV the prefill service kept (hot backup, --kv-backup-mb)
  kill9-no-backup  the same with the hot backup off (--kv-backup-mb 0): the prompts are recomputed
  sigstop       SIGSTOP of the only decode service: hung, its TCP open; found by the gateway's
                probe (or the monitor, whichever is first)
  cut-link      the only decode service reached through a TCP proxy that stops moving bytes (a
                pulled cable: no reset, no close)
  kill9-of-two  two decode services, one killed: its streams move to the other, whose KV comes
                from the prefill service's kept prompt KV plus the streamed tokens only

Both phases run fp32 (`--prefill-dtype fp32 --decode-weights fp32`, as issue 6's acceptance
asks) so that a migrated stream can be compared token for token with a run without a fault.
Per scenario, --streams concurrent greedy streams of --max-tokens tokens; the fault comes once
every stream has --after-tokens tokens. Reported:

  completed / lost        streams that ended with their text / with an error status
  identical               streams whose tokens equal the no-fault run's (no duplicate, no gap)
  recovery p50/p99        per affected stream (its service failed: the gateway logged path_failed
                          for it): the longest wait for a token from the fault on; streams on a
                          surviving service are reported apart
  tok/s before/during/after  aggregate tokens per second in the 3 s before the fault, from the fault
                          until the slowest stream recovered, and from then to the end
  phases p50/p99          per affected stream, from the gateway's log: detection (the fault to the
                          gateway's path_failed), route wait (to the takeover's routed), takeover
                          (to the takeover's first token at the gateway: queueing, re-prefill of
                          the streamed tokens, KV transfer, the first new token)

Writes bench/results/faults.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import shutil
import signal
import sys
import time
from typing import Any

from bench.stacks import started_stack
from bench.streams import FaultRun, run_with_fault_sync
from edgellm.launch import free_port
from edgellm.linkproxy import LinkProxy

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
PRECISION = ("--prefill-dtype", "fp32", "--decode-weights", "fp32")
PLACEMENT = ("--prefill-cpus", "0", "--decode-cpus", "1", "--prefill-threads", "1", "--decode-threads", "1")
PROMPT_TOPICS = ("the river", "a lighthouse", "bread", "the moon", "trains", "a garden", "winter", "the sea")


def prompts(n: int) -> list[str]:
    # Open-ended text to continue: an instruction ending in "." gets EOS at once from this model.
    return [f"Chapter {i + 1}. A long story about {PROMPT_TOPICS[i % len(PROMPT_TOPICS)]}. Once upon a time,"
            for i in range(n)]


def scenarios() -> dict[str, tuple[tuple[str, ...], str, int]]:
    """name -> (extra stack flags, process to hit, signal)."""
    # kill9-of-two: three engines stand in for three devices, prefill on CPU 0 and both decode
    # services on CPU 1 (PLACEMENT). Unpinned, their OpenMP teams fought over the cores: 8 tok/s
    # before the fault instead of 90, and a 9 s re-prefill of 8 short prompts.
    two = ("--decode-addrs", f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}")
    return {
        "kill9": ((), "decode", signal.SIGKILL),
        "kill9-no-backup": (("--kv-backup-mb", "0"), "decode", signal.SIGKILL),
        "sigstop": ((), "decode", signal.SIGSTOP),
        "cut-link": ((), "link", 0),
        "kill9-of-two": (two, "decode2", signal.SIGKILL),
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def tokens_per_s(run: FaultRun, start: float, end: float) -> float:
    if end <= start:
        return float("nan")
    count = sum(1 for r in run.streams for t in r.arrivals if start < t <= end)
    return count / (end - start)


def phases(log_dir: str, fault_unix: float) -> dict[str, dict[str, float]]:
    """Per request whose path failed at or after fault_unix: its first failure's detection time
    (s after the fault) and its first takeover's route wait and takeover time (the gateway's
    `path_failed` and `resumed` events)."""
    out: dict[str, dict[str, float]] = {}
    with open(pathlib.Path(log_dir) / "gateway.log") as f:
        for line in f:
            if '"path_failed"' not in line and '"resumed"' not in line:
                continue
            event = json.loads(line)
            at = datetime.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()
            if at < fault_unix:
                continue
            row = out.setdefault(event["request_id"], {})
            if event["event"] == "path_failed":
                row.setdefault("detect_s", at - fault_unix)
            elif "takeover_s" not in row:
                row["route_wait_s"], row["takeover_s"] = event["route_wait_s"], event["takeover_s"]
    return out


def summarize(name: str, run: FaultRun, expected: list[list[int]], by_request: dict[str, dict[str, float]]
              ) -> dict[str, Any]:
    assert run.fault_at is not None
    affected = set(by_request)
    recoveries = [s for s in (r.recovery_s(run.fault_at) for r in run.streams if r.request_id in affected)
                  if s is not None]
    others = [s for s in (r.recovery_s(run.fault_at) for r in run.streams if r.request_id not in affected)
              if s is not None]
    recovered_at = run.fault_at + max(recoveries, default=0.0)
    identical = sum(r.token_ids == e for r, e in zip(run.streams, expected))
    return {
        "scenario": name,
        "streams": len(run.streams),
        "completed": sum(r.completed for r in run.streams),
        "lost": sum(not r.completed for r in run.streams),
        "errors": sorted({f"{r.error.name}: {r.details}" for r in run.streams if r.error is not None}),
        "identical": identical,
        "tokens_differing": sum(
            sum(a != b for a, b in zip(r.token_ids, e)) + abs(len(r.token_ids) - len(e))
            for r, e in zip(run.streams, expected)
        ),
        "affected": len(recoveries),
        "recovery_p50_s": percentile(recoveries, 0.5),
        "recovery_p99_s": percentile(recoveries, 0.99),
        "recovery_max_s": max(recoveries, default=float("nan")),
        "unaffected_longest_wait_p99_s": percentile(others, 0.99),
        "tok_s_before": tokens_per_s(run, run.fault_at - 3.0, run.fault_at),
        "tok_s_during": tokens_per_s(run, run.fault_at, recovered_at),
        "tok_s_after": tokens_per_s(run, recovered_at, run.ended_at),
        **{f"{phase}_{q}": percentile([r[f"{phase}_s"] for r in by_request.values() if f"{phase}_s" in r], p)
           for phase in ("detect", "route_wait", "takeover") for q, p in (("p50_s", 0.5), ("p99_s", 0.99))},
    }


def run_scenario(name: str, flags: tuple[str, ...], target: str, sig: int, args: argparse.Namespace) -> dict[str, Any]:
    texts = prompts(args.streams)
    proxy, stack_options = None, {}
    if target == "link":  # decode behind a proxy the fault cuts
        decode_port = free_port()
        proxy = LinkProxy(f"127.0.0.1:{decode_port}").start_in_thread()
        flags = (*flags, "--decode-addrs", proxy.address)
        stack_options = {"process_args": {"decode": ["--decode-port", str(decode_port)]}}
    fault_unix = 0.0

    def fault(stack) -> None:
        nonlocal fault_unix
        fault_unix = time.time()
        proxy.cut() if proxy is not None else stack.kill(target, sig)

    try:
        with started_stack("default", (*PRECISION, *PLACEMENT, *flags), **stack_options) as (stack, description):
            gateway = stack.address("gateway")
            baseline = run_with_fault_sync(gateway, texts, args.max_tokens)
            expected = [r.token_ids for r in baseline.streams]
            run = run_with_fault_sync(gateway, texts, args.max_tokens, fault=lambda: fault(stack),
                                      after_tokens=args.after_tokens)
            if sig == signal.SIGSTOP:
                stack.kill(target, signal.SIGCONT)
            by_request = phases(stack.log_dir, fault_unix)
            if args.keep_logs is not None:  # every service's log, for a look at where the time went
                shutil.copytree(stack.log_dir, args.keep_logs / name, dirs_exist_ok=True)
    finally:
        if proxy is not None:
            proxy.restore()
    row = summarize(name, run, expected, by_request)
    row["stack"] = description
    print(f"{name}: {row['completed']}/{row['streams']} completed, {row['identical']} identical, recovery p50 "
          f"{row['recovery_p50_s']:.2f} s p99 {row['recovery_p99_s']:.2f} s", file=sys.stderr, flush=True)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    out = ["| scenario | completed | lost | identical to no-fault | affected | recovery p50 s | recovery p99 s | "
           "tok/s before | during | after |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['scenario']} | {r['completed']}/{r['streams']} | {r['lost']} | {r['identical']}/{r['streams']} | "
                   f"{r['affected']} | {r['recovery_p50_s']:.2f} | {r['recovery_p99_s']:.2f} | {r['tok_s_before']:.0f} | "
                   f"{r['tok_s_during']:.0f} | {r['tok_s_after']:.0f} |")
    out += ["", "| scenario | detection p50 / p99 s | route wait p50 / p99 s | takeover p50 / p99 s | recovery p99 s |",
            "|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['scenario']} | {r['detect_p50_s']:.2f} / {r['detect_p99_s']:.2f} | "
                   f"{r['route_wait_p50_s']:.2f} / {r['route_wait_p99_s']:.2f} | "
                   f"{r['takeover_p50_s']:.2f} / {r['takeover_p99_s']:.2f} | {r['recovery_p99_s']:.2f} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.faults", description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--after-tokens", type=int, default=32, help="tokens every stream has when the fault comes")
    parser.add_argument("--scenarios", nargs="+", default=list(scenarios()))
    parser.add_argument("--keep-logs", type=pathlib.Path, default=None, metavar="DIR",
                        help="copy each scenario's service logs to DIR/<scenario>/")
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "bench" / "results" / "faults.json")
    args = parser.parse_args(argv)
    available = scenarios()
    rows = [run_scenario(name, *available[name], args) for name in args.scenarios]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "date": datetime.datetime.now().isoformat(),
                                    "rows": rows}, indent=2) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
