"""One torch system of `make bench-peers`, measured in its own process: `python -m bench.peers_torch`.

bench/peers.py starts this module once per (system, cores) under `taskset -c CPUS`, so that every
system gets the same cores and one torch thread per core (the engine takes one thread per CPU this
process may use, see placement.engine_threads; transformers gets torch.set_num_threads likewise).
It prints one JSON object on its last stdout line: the system's row (bench/gpu.py's measurements,
imported from there: TPOT and tok/s per stream level, prefill tok/s per prompt size) plus the
weight bytes a decode step reads and the achieved bandwidth at one stream (gpt-fast's figure).

  edgellm-engine   the decode engine alone, build_engine(config, "decode") (INT4-AWQ by default),
                   S concurrent engine.generate calls; prefill from the prefill engine (bf16), as
                   the prefill service runs it
  hf-fp32, hf-bf16 transformers eager `generate`, one left-padded batch of S prompts
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

import torch

from bench import gpu
from bench.run import comma_list
from edgellm import logs
from edgellm.engine_builder import build_engine
from edgellm.model_store import resolve_model_dir

SYSTEMS = ("edgellm-engine", "hf-fp32", "hf-bf16")


def model_bytes(module: torch.nn.Module) -> int:
    """Bytes of the weights one decode step reads: parameters and buffers (packed INT4 included)."""
    seen: set[int] = set()
    total = 0
    for t in [*module.parameters(), *module.buffers()]:
        if t.data_ptr() not in seen:  # tied embeddings count once
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def with_bandwidth(row: dict[str, Any]) -> dict[str, Any]:
    tpot = row.get("streams_1", {}).get("tpot_ms")
    if tpot and row.get("weight_bytes"):
        row["bandwidth_gb_s"] = row["weight_bytes"] / (tpot / 1e3) / 1e9
    return row


def run_edgellm(b: gpu.Bench, args: argparse.Namespace, model_dir: Any) -> dict[str, Any]:
    row: dict[str, Any] = {"weights": args.decode_weights}
    config = gpu.edgellm_config(args, model_dir, args.decode_weights, False)
    start = time.monotonic()
    engine, loaded = build_engine(config, "decode")
    row["load_s"] = time.monotonic() - start
    row["weight_bytes"] = model_bytes(loaded.model)
    engine.eos_token_ids = frozenset()  # fixed-length streams, as transformers' min_new_tokens

    async def streams() -> None:
        for s in b.streams:
            async def level(s: int = s) -> dict[str, Any]:
                await gpu.edgellm_streams(engine, b.prompts[:s], min(8, b.new_tokens))  # warm-up
                return await gpu.edgellm_streams(engine, b.prompts[:s], b.new_tokens)
            await gpu.measure_async(b, row, f"streams_{s}", level)
    try:
        asyncio.run(streams())
    finally:
        engine.stop()
    prefill_engine, _ = build_engine(gpu.edgellm_config(args, model_dir, "bf16", False), "prefill")

    async def prefills() -> None:
        for n, prompt in b.long_prompts.items():
            await gpu.measure_async(b, row, f"prefill_{n}", lambda: gpu.edgellm_prefill(prefill_engine, prompt))
    try:
        asyncio.run(prefills())
    finally:
        prefill_engine.stop()
    return row


def run_hf(b: gpu.Bench, model_dir: Any, dtype: torch.dtype) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    start = time.monotonic()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    row: dict[str, Any] = {"load_s": time.monotonic() - start, "weight_bytes": model_bytes(model)}
    for s in b.streams:
        def level(s: int = s) -> dict[str, Any]:
            gpu.hf_streams(b, model, b.prompts[:s], min(8, b.new_tokens), False)  # warm-up
            return gpu.hf_streams(b, model, b.prompts[:s], b.new_tokens, False)
        gpu.measure(b, row, f"streams_{s}", level)
    for n, prompt in b.long_prompts.items():
        gpu.measure(b, row, f"prefill_{n}", lambda: gpu.hf_prefill(b, model, prompt))
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers_torch", description=__doc__.splitlines()[0])
    p.add_argument("system", choices=SYSTEMS)
    p.add_argument("--model", default="")
    p.add_argument("--decode-weights", default="int4-awq")
    p.add_argument("--streams", type=comma_list(int), required=True)
    p.add_argument("--new-tokens", type=int, required=True)
    p.add_argument("--prefill", type=comma_list(int), required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=0.0, help="start no measurement after this many seconds")
    args = p.parse_args(argv)
    logs.configure("bench")  # info: the engine's per-step debug line is not printed (nor paid for)
    args.device = "cpu"  # what bench.gpu's Bench and edgellm_config read
    model_dir = resolve_model_dir(args.model)
    from transformers import AutoConfig

    b = gpu.Bench(args, AutoConfig.from_pretrained(model_dir).vocab_size)
    cpus = sorted(os.sched_getaffinity(0))
    if args.system == "edgellm-engine":
        row = run_edgellm(b, args, model_dir)
    else:
        row = run_hf(b, model_dir, torch.float32 if args.system == "hf-fp32" else torch.bfloat16)
    row.update(system=args.system, cpus=cpus, threads=len(cpus))
    print(json.dumps(with_bandwidth(row)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
