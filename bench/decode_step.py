"""`python bench/decode_step.py`: one engine decode step of the decode service's model, in ms.

The model is built as the decode service builds it (default: int4-awq on our C kernel). For
each torch thread count and batch size it runs the engine's decode steps on a fresh thread
with that many torch threads (as the engine thread runs) and prints the median step time,
tokens/s and the achieved weight bandwidth (gpt-fast's metric: the bytes of weights one step
reads / step time).

This machine is shared and its timings move by tens of percent between runs, so compare code
side by side in one run: `--against DIR` runs this script alternately over this tree and over
another checkout DIR (each in its own process, with PYTHONPATH pointing at its tree), --repeats
times, and reports each tree's median. Example, the branch against its base:
    git archive main | tar -x -C /tmp/base
    PYTHONPATH=. python bench/decode_step.py --against /tmp/base --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import torch

BLOCK_SIZE = 16
WARMUP_STEPS = 3


def build_model(weights: str) -> Any:
    from edgellm import config as cfg
    from edgellm.perplexity import decode_model

    return decode_model(cfg.parse(["--decode-weights", weights], env={}).model)


def step_times_ms(model: Any, batch: int, prompt_tokens: int, num_steps: int) -> list[float]:
    """Wall time of each of num_steps engine decode steps with `batch` running sequences."""
    from edgellm.engine.info import EngineLimits
    from edgellm.engine.loop import EngineLoop
    from edgellm.engine.sampling import SamplingParams
    from edgellm.engine.sequence import Kind

    tokens = prompt_tokens + WARMUP_STEPS + num_steps + 1
    blocks = batch * -(-(tokens + 1) // BLOCK_SIZE) + 1
    engine = EngineLoop(model, frozenset(), EngineLimits(num_blocks=blocks, block_size=BLOCK_SIZE,
                                                        max_running=max(64, batch)))
    for i in range(batch):
        prompt = [100 + (i + j) % 1000 for j in range(prompt_tokens)]
        engine.submit(engine.new_sequence(str(i), Kind.LOCAL, prompt, SamplingParams(), 10_000), lambda *_: None)
    while engine.stats().num_waiting:
        engine.step()
    for _ in range(WARMUP_STEPS):
        engine.step()
    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        out = engine.step()
        times.append((time.perf_counter() - start) * 1000)
        assert len(out.decodes) == batch and not out.preempted, "a timed step was not a full decode step"
    return times


def on_thread(num_threads: int, work: Any, *args: Any) -> Any:
    """work(*args) on a new thread with num_threads torch threads (the engine thread's setting)."""
    result: list[Any] = []

    def run() -> None:
        torch.set_num_threads(num_threads)
        result.append(work(*args))

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if not result:
        raise RuntimeError("the measuring thread failed (see its traceback above)")
    return result[0]


def measure(args: argparse.Namespace) -> dict[str, float]:
    """{"threads/batch": median ms} over this process's tree."""
    torch.set_num_threads(1)  # the loading thread stays out of the measured threads' way
    model = build_model(args.weights)
    out = {"weight_bytes": float(model.weight_bytes())}
    for _ in range(args.repeats):
        for threads in args.threads:
            for batch in args.batches:
                ms = statistics.median(on_thread(threads, step_times_ms, model, batch, args.prompt_tokens, args.steps))
                out.setdefault(f"{threads}/{batch}", []).append(ms)
    return {key: statistics.median(v) if isinstance(v, list) else v for key, v in out.items()}


def child(tree: pathlib.Path, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, str(pathlib.Path(__file__).resolve()), "--json", "--repeats", "1",
               "--weights", args.weights, "--steps", str(args.steps), "--prompt-tokens", str(args.prompt_tokens),
               "--threads", *map(str, args.threads), "--batches", *map(str, args.batches)]
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run(command, env=env, cwd=tree, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(results: dict[str, dict[str, float]], args: argparse.Namespace) -> str:
    lines = ["| tree | threads | batch | ms/step | tok/s | weight GB/s |", "|---|---|---|---|---|---|"]
    for threads in args.threads:
        for batch in args.batches:
            for name, r in results.items():
                ms = r[f"{threads}/{batch}"]
                lines.append(f"| {name} | {threads} | {batch} | {ms:.2f} | {batch * 1000 / ms:.0f} | "
                             f"{r['weight_bytes'] / ms / 1e6:.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", default="int4-awq", help="--decode-weights of the model (default int4-awq)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement (median taken)")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="context of each sequence before the steps")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per setting (median taken)")
    parser.add_argument("--against", type=pathlib.Path, help="another checkout, measured alternately with this one")
    parser.add_argument("--json", action="store_true", help="print one JSON line (used for --against)")
    args = parser.parse_args()
    from edgellm import logs  # (this script's tree, as the imports in build_model)

    logs.configure("bench")  # info: the engine's per-step debug line is not printed (nor paid for)
    if args.json:
        print(json.dumps(measure(args)))
        return 0
    if args.against is None:
        print(table({"this": measure(args)}, args))
        return 0
    trees = {"this": pathlib.Path(__file__).resolve().parent.parent, "against": args.against.resolve()}
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for _ in range(args.repeats):
        for name, tree in trees.items():
            runs[name].append(child(tree, args))
    results = {name: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for name, rs in runs.items()}
    print(table(results, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
