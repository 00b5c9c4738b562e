"""`python -m bench.parallel` (`make bench-parallel`): where splitting one phase over devices pays.

Here a "device" is one CPU core: prefill rank 0 on CPU 0, prefill rank 1 (or decode stage 1) on
CPU 1, one torch thread each, the embedded model. The link between the two devices is real
where root allows (bench/shaped_link.py: the second device's process in its own network
namespace behind a veth pair shaped by `tc tbf`), at each of --links Mbit/s, plus loopback
(no shaping: two processes on one board). On this 2-core VM the figures are indicative; the
method carries to real boards (put the second rank on the other board instead of a namespace).

  tensor parallelism  prefill time of one prompt (the Prefill RPC's forward pass, and the RPC
                      as a whole: until decode acknowledged every rank's KV heads) at
                      --prompts tokens, --prefill-tp 1 vs 2. Each layer all-reduces twice:
                      2 x tokens x hidden values cross the link per layer, so on a slow link the
                      all-reduce costs more than the halved compute saves.
  pipeline stages     the decode unit alone (INT4-AWQ, requests straight to its GenerateLocal),
                      one engine on CPU 0 vs stage 0 on CPU 0 + stage 1 on CPU 1: TPOT at 1
                      stream, tok/s at 8 and 32 streams, each stage's weight memory (Load.stages).

Writes bench/results/parallel.json and prints the tables.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import pathlib
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from bench import shaped_link
from bench.kv import prefill_once
from bench.shaped_link import ShapedLink
from bench.stacks import started_stack
from edgellm import config as cfg
from edgellm.launch import Stack, free_port, free_port_argv
from edgellm.v1 import common_pb2, decode_pb2_grpc

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# Two devices: the service's own process on CPU 0, the second rank or stage on CPU 1.
PLACEMENT = ("--prefill-cpus", "0", "--gateway-cpus", "0", "--monitor-cpus", "0", "--decode-cpus", "1",
             "--prefill-threads", "1", "--decode-threads", "1")


@contextlib.contextmanager
def second_device(process: str, mbps: float | None) -> Iterator[tuple[dict[str, Any], str, str]]:
    """Stack options that put `process` (a prefill worker or a decode stage) on CPU 1 and on the
    far side of a link of `mbps` (None: loopback), the address the others reach this side at,
    and the far side's address."""
    options: dict[str, Any] = {"process_args": {process: ["--prefill-cpus", "1", "--decode-cpus", "1"]}}
    if mbps is None:
        yield options, "127.0.0.1", "127.0.0.1"
        return
    with ShapedLink(mbps) as link:
        options["process_prefix"] = {process: link.prefix}
        yield options, link.host_ip, link.decode_host


def tp_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for mbps in [None, *args.links]:
        for tp in (1, 2):
            if tp == 1 and mbps is not None:
                continue  # one rank has no link to cross
            with second_device("prefill-rank1", mbps) as (options, near_ip, _):
                # the decode service listens where the far rank reaches it (its KV heads cross the link too)
                decode = f"{near_ip}:{free_port()}"
                tp_flags = ("--prefill-tp", str(tp), "--prefill-tp-addr", f"{near_ip}:{free_port()}",
                            "--decode-addrs", decode, "--decode-weights", "bf16")
                options["process_args"]["decode"] = ["--host", near_ip]
                with started_stack("disaggregated", (*PLACEMENT, *tp_flags), **options) as (stack, _):
                    prefill_once(stack, 64, "warm-up")
                    for n in args.prompts:
                        times = []
                        for i in range(args.repeats):
                            start = time.perf_counter()
                            result = prefill_once(stack, n, f"tp{tp}-{n}-{i}")
                            times.append({**result, "rpc_ms": (time.perf_counter() - start) * 1e3})
                        best = min(times, key=lambda r: r["rpc_ms"])
                        row = {"kind": "tp", "tp": tp, "link_mbps": mbps or "loopback", "prompt_tokens": n, **best}
                        rows.append(row)
                        print(f"[parallel] {row}", file=sys.stderr, flush=True)
    return rows


def decode_unit(stages: int, options: dict[str, Any], far_ip: str) -> Stack:
    """Only the decode unit (one engine, or stage 0 and stage 1), started on free ports: requests go
    straight to its GenerateLocal, so nothing else shares the two cores. Stage 0 (or the one
    engine) on CPU 0, stage 1 on CPU 1, one torch thread each."""
    argv = [*free_port_argv(), "--decode-stages", str(stages), "--decode-cpus", "0", "--decode-threads", "1"]
    if stages > 1:
        argv += ["--decode-stage-addrs", f"{far_ip}:{free_port()}"]
    stack = Stack(cfg.parse(argv, env={}), log_dir=tempfile.mkdtemp(prefix="edgellm-bench-stages-"),
                  process_args={"decode-stage1": ["--decode-cpus", "1", "--host", far_ip]},
                  process_prefix=options.get("process_prefix", {}))
    names = (*stack.decode_stages, "decode")
    try:
        for name in names:
            stack.start(name)
        stack.wait_serving(names, timeout_s=600)
    except BaseException:
        stack.stop()
        raise
    return stack


def decode_rates(stack: Stack, streams: int, max_tokens: int) -> dict[str, float]:
    """Aggregate tok/s of `streams` concurrent GenerateLocal streams, and a stream's mean time per
    output token after its first."""
    per_stream: list[tuple[int, float]] = []

    def one(i: int) -> None:
        prompt = [(7 * i + j) % 1000 + 10 for j in range(32)]
        spec = common_pb2.RequestSpec(request_id=f"s{streams}-{i}", prompt_token_ids=prompt, max_new_tokens=max_tokens)
        arrivals = []
        with stack.channel("decode") as channel:
            for delta in decode_pb2_grpc.DecodeStub(channel).GenerateLocal(common_pb2.GenerateLocalRequest(spec=spec)):
                arrivals += [time.perf_counter()] * len(delta.token_ids)
        per_stream.append((len(arrivals), (arrivals[-1] - arrivals[0]) / max(1, len(arrivals) - 1)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"tok_s": sum(n for n, _ in per_stream) / wall, "tpot_ms": 1e3 * statistics.mean(t for _, t in per_stream)}


def stage_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for mbps in [None, *args.links]:
        for stages in (1, 2):
            if stages == 1 and mbps is not None:
                continue
            with second_device("decode-stage1", mbps) as (options, _, far_ip):
                stack = decode_unit(stages, options, far_ip)
                try:
                    with stack.channel("decode") as channel:
                        load = decode_pb2_grpc.DecodeStub(channel).GetLoad(common_pb2.GetLoadRequest(), timeout=10)
                    memory = [s.weight_bytes for s in load.stages] or [load.weight_bytes]
                    decode_rates(stack, 2, 8)  # warm-up
                    for streams in args.streams:
                        row = {"kind": "stages", "stages": stages, "link_mbps": mbps or "loopback", "streams": streams,
                               **decode_rates(stack, streams, args.max_tokens),
                               "stage_weight_mib": [round(m / 2**20, 1) for m in memory]}
                        rows.append(row)
                        print(f"[parallel] {row}", file=sys.stderr, flush=True)
                finally:
                    stack.stop()
                    shutil.rmtree(stack.log_dir, ignore_errors=True)
    return rows


def tables(rows: list[dict[str, Any]]) -> str:
    out = ["Tensor-parallel prefill (bf16, one core per rank)", "",
           "| link | ranks | prompt tokens | forward ms | Prefill RPC ms | KV MiB |", "|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["kind"] == "tp"):
        link = r["link_mbps"] if r["link_mbps"] == "loopback" else f"{r['link_mbps']:g} Mbit/s"
        out.append(f"| {link} | {r['tp']} | {r['prompt_tokens']} | {r['compute_ms']:.0f} | {r['rpc_ms']:.0f} | "
                   f"{r['bytes'] / 2**20:.1f} |")
    stage = [r for r in rows if r["kind"] == "stages"]
    if stage:
        out += ["", "Pipeline-parallel decode (INT4-AWQ, one core per stage; the decode unit alone)", "",
                "| link | stages | streams | tok/s | TPOT ms | weights per stage MiB |", "|---|---|---|---|---|---|"]
        for r in stage:
            link = r["link_mbps"] if r["link_mbps"] == "loopback" else f"{r['link_mbps']:g} Mbit/s"
            out.append(f"| {link} | {r['stages']} | {r['streams']} | {r['tok_s']:.1f} | {r['tpot_ms']:.1f} | "
                       f"{' / '.join(map(str, r['stage_weight_mib']))} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.parallel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--links", type=float, nargs="*", default=[1000.0, 100.0], help="Mbit/s (needs root)")
    parser.add_argument("--prompts", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=2, help="prefills per size (the fastest is kept)")
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--only", choices=["tp", "stages"], default=None)
    parser.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "bench" / "results" / "parallel.json")
    args = parser.parse_args(argv)
    if args.links and not shaped_link.available():
        print("[parallel] no root or iproute2: loopback only", file=sys.stderr)
        args.links = []
    rows = (tp_rows(args) if args.only != "stages" else []) + (stage_rows(args) if args.only != "tp" else [])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "date": datetime.datetime.now().isoformat(),
                                    "rows": rows}, indent=2) + "\n")
    print(tables(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
