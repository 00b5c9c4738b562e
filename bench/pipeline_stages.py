"""Decode throughput of one engine vs a two-stage pipeline (--decode-stages 2) on this machine.

`python -m bench.pipeline_stages [--model DIR] [--decode-weights fp32] [--streams 1,8,16]`
starts only the decode unit, one core standing in for one device: one engine on CPU 0, or stage 0
on CPU 0 and stage 1 on CPU 1 (one torch thread each; --one-engine-cpus 0-1 gives the single engine
both cores instead), sends N concurrent GenerateLocal streams straight to it and prints tok/s per
configuration as JSON lines, after each unit's weight memory per stage. On a 2-core machine the figures are indicative
only: they say whether the micro-batched pipeline keeps both stages busy, not what real devices do.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import threading
import time

from edgellm import config as cfg
from edgellm.launch import Stack, free_port, free_port_argv
from edgellm.model_store import prepare_default_model
from edgellm.v1 import common_pb2, decode_pb2_grpc


def unit(model: str, weights: str, num_stages: int, one_engine_cpus: str) -> Stack:
    argv = ["--model", model, *free_port_argv(), "--decode-weights", weights, "--kv-cache-mb", "256",
            "--decode-stages", str(num_stages), "--prefill-dtype", "fp32"]
    if num_stages > 1:
        argv += ["--decode-stage-addrs", f"127.0.0.1:{free_port()}"]
    num_cpus = len(cfg.parse_cpu_list(one_engine_cpus))
    one = {"decode": ["--decode-cpus", one_engine_cpus, "--decode-threads", str(num_cpus)]}
    two = {"decode": ["--decode-cpus", "0", "--decode-threads", "1"],
           "decode-stage1": ["--decode-cpus", "1", "--decode-threads", "1"]}
    stack = Stack(cfg.parse(argv, env={}), log_dir=tempfile.mkdtemp(prefix="edgellm-pp-bench-"),
                  process_args=two if num_stages > 1 else one)
    names = (*stack.decode_stages, "decode")
    for name in names:
        stack.start(name)
    stack.wait_serving(names, timeout_s=600)
    return stack


def run_streams(stack: Stack, num_streams: int, max_new: int) -> dict:
    counts = [0] * num_streams

    def stream(i: int) -> None:
        prompt = [(7 * i + j) % 1000 + 10 for j in range(32)]
        spec = common_pb2.RequestSpec(request_id=f"b{num_streams}-{i}", prompt_token_ids=prompt, max_new_tokens=max_new)
        with stack.channel("decode") as channel:
            for d in decode_pb2_grpc.DecodeStub(channel).GenerateLocal(common_pb2.GenerateLocalRequest(spec=spec)):
                counts[i] += len(d.token_ids)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(num_streams)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    return {"streams": num_streams, "tokens": sum(counts), "wall_s": round(wall, 2),
            "tok_per_s": round(sum(counts) / wall, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="")
    parser.add_argument("--decode-weights", default="fp32")
    parser.add_argument("--streams", default="1,8,16")
    parser.add_argument("--max-new", type=int, default=48)
    parser.add_argument("--stages", default="1,2", help="stage counts to compare")
    parser.add_argument("--one-engine-cpus", default="0", help="CPUs of the single engine (1 stage)")
    args = parser.parse_args()
    model = args.model or str(prepare_default_model())
    for num_stages in map(int, args.stages.split(",")):
        stack = unit(model, args.decode_weights, num_stages, args.one_engine_cpus)
        try:
            with stack.channel("decode") as channel:
                load = decode_pb2_grpc.DecodeStub(channel).GetLoad(common_pb2.GetLoadRequest(), timeout=10)
            stages = [{"layers": [s.layer_start, s.layer_end], "weight_bytes": s.weight_bytes} for s in load.stages]
            print(json.dumps({"decode_stages": num_stages, "weights": args.decode_weights,
                              "weight_bytes": load.weight_bytes, "stages": stages}), flush=True)
            run_streams(stack, 2, 4)  # warm the path
            for n in map(int, args.streams.split(",")):
                print(json.dumps({"decode_stages": num_stages, "weights": args.decode_weights,
                                  **run_streams(stack, n, args.max_new)}), flush=True)
        finally:
            stack.stop()
            shutil.rmtree(stack.log_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
