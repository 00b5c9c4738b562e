"""Admission control, cancellation and deadlines through real processes (tiny model)."""

import asyncio
import shutil
import time

import grpc
import pytest

from edgellm.client import AsyncClient, Client, GenerationError
from edgellm.v1 import common_pb2, decode_pb2_grpc
from tests.conftest import metric, scrape, stack_config, start_stack

LONG_PROMPT = "The quick brown fox jumps over the lazy dog. " * 150  # ~1500 tokens: a slow prefill


def decode_load(stack) -> common_pb2.Load:
    with stack.channel("decode") as channel:
        return decode_pb2_grpc.DecodeStub(channel).GetLoad(common_pb2.GetLoadRequest(), timeout=5)


def wait_blocks_free(stack, expected: int, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + timeout_s
    while (free := decode_load(stack).num_free_kv_blocks) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return free


@pytest.fixture(scope="module")
def strict_stack(tiny_model_dir):
    """One prefill at a time and no waiting room: the second concurrent request is refused."""
    s = start_stack(stack_config(tiny_model_dir, max_queued_requests=0, max_inflight_prefills=1))
    yield s
    s.stop()
    shutil.rmtree(s.log_dir, ignore_errors=True)


def test_full_prefill_queue_answers_resource_exhausted(strict_stack):
    async def one(client):
        try:
            return await client.generate_text(prompt=LONG_PROMPT, max_tokens=4)
        except GenerationError as e:
            return e

    async def burst():
        async with AsyncClient(strict_stack.address("gateway"), timeout_s=60) as client:
            return await asyncio.gather(*(one(client) for _ in range(8)))

    results = asyncio.run(burst())
    refused = [r for r in results if isinstance(r, GenerationError)]
    served = [r for r in results if not isinstance(r, GenerationError)]
    assert refused and served and len(refused) + len(served) == 8
    assert all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queued_requests=0" in e.details for e in refused)
    assert all(r.finish_reason in ("length", "stop") for r in served)


def test_cancelled_stream_frees_its_kv_blocks(tiny_stack):
    total = decode_load(tiny_stack).num_kv_blocks
    assert wait_blocks_free(tiny_stack, total) == total
    with Client(tiny_stack.address("gateway"), timeout_s=60) as client:
        stream = client.generate(prompt=LONG_PROMPT, max_tokens=500)  # what the tiny model's 2048-token context leaves
        for _ in range(3):
            next(stream)
        held = decode_load(tiny_stack)
        assert held.num_running == 1 and held.num_free_kv_blocks < total
        stream.close()  # the client cancels
        assert wait_blocks_free(tiny_stack, total) == total  # block count back to the start
        assert decode_load(tiny_stack).num_running == 0


def test_deadline_ends_the_request_and_frees_its_blocks(tiny_stack):
    total = decode_load(tiny_stack).num_kv_blocks
    with Client(tiny_stack.address("gateway"), timeout_s=0.3) as client:
        with pytest.raises(GenerationError) as e:
            client.generate_text(prompt=LONG_PROMPT, max_tokens=500)
    assert e.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_blocks_free(tiny_stack, total) == total


def test_every_service_serves_prometheus_metrics(tiny_stack):
    net = tiny_stack.config.network
    before = scrape(net.gateway_metrics_port)
    # Other tests push KV straight to decode on this shared stack: compare this request's bytes only.
    sent_before = metric(scrape(net.prefill_metrics_port), "edgellm_kv_bytes_sent_total")
    received_before = metric(scrape(net.decode_metrics_port), "edgellm_kv_bytes_received_total")
    with Client(tiny_stack.address("gateway"), timeout_s=60) as client:
        result = client.generate_text(prompt="Metrics please", max_tokens=6)
        with pytest.raises(GenerationError):
            client.generate_text(prompt="x", temperature=-1)
    gateway = scrape(net.gateway_metrics_port)
    assert metric(gateway, "edgellm_generated_tokens_total") - metric(before, "edgellm_generated_tokens_total") == result.completion_tokens
    assert metric(gateway, "edgellm_ttft_seconds_count") > metric(before, "edgellm_ttft_seconds_count")
    assert 'edgellm_errors_total{code="INVALID_ARGUMENT"}' in gateway
    for name in ("edgellm_prefill_pool_waiting", "edgellm_prefill_pool_inflight", "edgellm_decode_pool_streams"):
        assert name in gateway
    prefill, decode = scrape(net.prefill_metrics_port), scrape(net.decode_metrics_port)
    assert metric(prefill, "edgellm_kv_bytes_sent_total") > 0 and metric(prefill, "edgellm_kv_transfer_seconds_count") > 0
    # Counted on each side on its own: prefill what it handed to gRPC, decode what it accepted.
    sent = metric(prefill, "edgellm_kv_bytes_sent_total") - sent_before
    assert sent > 0 and metric(decode, "edgellm_kv_bytes_received_total") - received_before == sent
    assert metric(decode, "edgellm_kv_blocks_free") > 0 and "edgellm_engine_running" in decode
    assert metric(scrape(net.monitor_metrics_port), "edgellm_healthy_services") == 2
