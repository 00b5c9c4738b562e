"""`python -m bench.decode_step`: time one engine decode step at batch 1 and 32, fp32 vs INT4 weights.

In-process, on the engine's own thread, one torch thread (as the pinned decode service runs):
32 sequences of 60-token prompts are prefilled, then ten decode steps are timed per setting.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from edgellm.engine.loop import EngineLimits, EngineLoop
from edgellm.engine.sampling import SamplingParams
from edgellm.engine.sequence import Kind, Sequence
from edgellm.engine.weights import load_model
from edgellm.quant.int4 import quantize_model


def step_ms(weights: str, batch: int, group_size: int, num_steps: int = 10) -> float:
    loaded = load_model("", "fp32")
    if weights == "int4":
        quantize_model(loaded.model, group_size)
    engine = EngineLoop(loaded.model, frozenset(), EngineLimits(num_blocks=2048))
    for i in range(batch):
        prompt = list(range(100 + i, 160 + i))
        engine.scheduler.add(Sequence(str(i), Kind.LOCAL, prompt, len(prompt), SamplingParams(), 10_000, lambda *_: None))
    while any(s.needs_prefill for s in engine.scheduler.waiting):
        engine.step()
    for _ in range(3):
        engine.step()
    start = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    return (time.perf_counter() - start) / num_steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.decode_step")
    parser.add_argument("--group-size", type=int, default=32)
    args = parser.parse_args()
    rows = []

    def run() -> None:  # on a fresh thread with one torch thread, like the engine thread
        torch.set_num_threads(1)
        rows.extend((w, b, step_ms(w, b, args.group_size)) for w in ("fp32", "int4") for b in (1, 32))

    torch.set_num_threads(1)
    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    print("| weights | batch | decode step ms |\n|---|---|---|")
    for weights, batch, ms in rows:
        print(f"| {weights} | {batch} | {ms:.1f} |")


if __name__ == "__main__":
    main()
