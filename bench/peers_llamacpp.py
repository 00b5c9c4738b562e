"""llama.cpp's own generate loop, in-process, for `make bench-peers`: run under the peers venv.

    ~/.cache/edgellm/peers/venv/bin/python -m bench.peers_llamacpp GGUF WORKLOAD.json --threads N

bench/peers.py starts it under `taskset -c CPUS` with one thread per CPU. It imports neither torch
nor edgellm (the peers venv has neither): the workload (prompt token ids, sizes) comes as JSON from
bench/peers.py, the same token ids the torch systems run. Prints one JSON row on its last line.

  TPOT ms     one stream: Llama.generate greedy (top_k=1), --new-tokens tokens, EOS not checked,
              (last token - first token) / (tokens - 1); after one unmeasured warm-up stream
  prefill     Llama.eval of one prompt of P tokens from an empty cache: P / wall time, best of 3
              after a warm-up (each prompt starts with a different token: no cached prefix)
Only one stream: the high-level Llama object decodes one sequence; streams run through its server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

NUM_PREFILL_REPEATS = 3


def one_stream(llm: Any, prompt: list[int], num_tokens: int) -> list[float]:
    llm.reset()
    times = []
    for _ in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, reset=True):
        times.append(time.perf_counter())
        if len(times) == num_tokens:
            break
    return times


def prefill(llm: Any, prompt: list[int]) -> dict[str, Any]:
    walls = []
    for i in range(1 + NUM_PREFILL_REPEATS):  # the first is the warm-up
        llm.reset()
        tokens = [100 + i, *prompt[1:]]  # a different first token: nothing to reuse from the last run
        start = time.perf_counter()
        llm.eval(tokens)
        walls.append(time.perf_counter() - start)
    wall = min(walls[1:])
    return {"prompt_tokens": len(prompt), "wall_s": wall, "tokens_per_s": len(prompt) / wall}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers_llamacpp", description=__doc__.splitlines()[0])
    p.add_argument("gguf")
    p.add_argument("workload", help="JSON: prompts, long_prompts {size: ids}, new_tokens")
    p.add_argument("--threads", type=int, default=0, help="0: one per CPU this process may use")
    p.add_argument("--budget-s", type=float, default=0.0, help="start no prefill size after this many seconds")
    args = p.parse_args(argv)
    deadline = time.monotonic() + args.budget_s if args.budget_s else float("inf")
    import llama_cpp

    work = json.loads(open(args.workload).read())
    threads = args.threads or len(os.sched_getaffinity(0))
    max_prefill = max(len(v) for v in work["long_prompts"].values())
    start = time.monotonic()
    llm = llama_cpp.Llama(model_path=args.gguf, n_threads=threads, n_threads_batch=threads,
                          n_ctx=max(max_prefill, 512) + 64, n_batch=max(max_prefill, 512), verbose=False)
    row: dict[str, Any] = {"system": "llamacpp-raw", "version": llama_cpp.__version__, "load_s": time.monotonic() - start,
                           "cpus": sorted(os.sched_getaffinity(0)), "threads": threads,
                           "weight_bytes": os.path.getsize(args.gguf)}
    prompt, n = work["prompts"][0], work["new_tokens"]
    one_stream(llm, prompt, min(8, n))  # warm-up
    wall_start = time.perf_counter()
    times = one_stream(llm, prompt, n)
    wall = time.perf_counter() - wall_start
    tpot_ms = (times[-1] - times[0]) / (len(times) - 1) * 1e3
    row["streams_1"] = {"num_streams": 1, "num_tokens": len(times), "wall_s": wall,
                        "tokens_per_s": len(times) / wall, "tpot_ms": tpot_ms}
    row["bandwidth_gb_s"] = row["weight_bytes"] / (tpot_ms / 1e3) / 1e9
    for size, ids in work["long_prompts"].items():
        if time.monotonic() > deadline:
            row.setdefault("skipped", []).append(f"prefill_{size}")
            continue
        row[f"prefill_{size}"] = prefill(llm, ids)
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
