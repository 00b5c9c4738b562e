"""Real service processes with engines on the GPU: mixed placements answer exactly as the CPU
fp32 stack does, and a GPU decode engine's death costs no stream."""

from __future__ import annotations

import shutil

import pytest

from bench.streams import run_with_fault_sync
from tests.conftest import metric, scrape, stack_config, start_stack

PROMPTS = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(6)] + [
    "The capital of France is", "Write one sentence about the sea.", "List three colours:", "Once upon a time"]
MAX_TOKENS = 40


def answers(stack) -> list[list[int]]:
    run = run_with_fault_sync(stack.address("gateway"), PROMPTS, MAX_TOKENS, timeout_s=300)
    assert all(r.completed for r in run.streams), [(r.error, r.details) for r in run.streams if not r.completed]
    return [r.token_ids for r in run.streams]


def stopped(stack) -> None:
    stack.stop()
    shutil.rmtree(stack.log_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cpu_answers(gpu_model_dir) -> list[list[int]]:
    stack = start_stack(stack_config(gpu_model_dir, prefill_device="cpu", decode_device="cpu"))
    try:
        return answers(stack)
    finally:
        stopped(stack)


@pytest.mark.parametrize("prefill_device,decode_device", [("cuda", "cpu"), ("cpu", "cuda"), ("cuda", "cuda")],
                         ids=["gpu-prefill-cpu-decode", "cpu-prefill-gpu-decode", "all-gpu"])
def test_mixed_placements_answer_like_the_cpu_fp32_stack(gpu_model_dir, cpu_answers, prefill_device, decode_device):
    stack = start_stack(stack_config(gpu_model_dir, prefill_device=prefill_device, decode_device=decode_device))
    try:
        got = answers(stack)
        devices = _devices(stack)
        assert devices["prefill"].startswith(prefill_device) and devices["decode"].startswith(decode_device), devices
    finally:
        stopped(stack)
    same = sum(g == c for g, c in zip(got, cpu_answers))
    assert same >= len(PROMPTS) - 1, (got, cpu_answers)  # fp32 on two devices: at most one near-tie flips


def test_kill9_of_a_gpu_decode_engine_loses_no_stream(gpu_model_dir):
    stack = start_stack(stack_config(gpu_model_dir, prefill_device="cuda", decode_device="cuda"))
    try:
        expected = answers(stack)
        run = run_with_fault_sync(stack.address("gateway"), PROMPTS, MAX_TOKENS, fault=lambda: stack.kill("decode"),
                                  timeout_s=300)
        assert all(r.completed for r in run.streams), [(r.error, r.details) for r in run.streams]
        assert [r.token_ids for r in run.streams] == expected  # the takeover ran on the prefill GPU
        assert metric(scrape(stack.config.network.gateway_metrics_port), "edgellm_migrations_total") >= 1
    finally:
        stopped(stack)


def _devices(stack) -> dict[str, str]:
    """What each engine service reports as its device (GetLoad, as `edgellm status` shows it)."""
    from edgellm.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc

    out = {}
    for name, stub in (("prefill", prefill_pb2_grpc.PrefillStub), ("decode", decode_pb2_grpc.DecodeStub)):
        with stack.channel(name) as channel:
            out[name] = stub(channel).GetLoad(common_pb2.GetLoadRequest(), timeout=10).device
    return out
