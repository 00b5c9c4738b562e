"""Recovery cases beyond a decode failure (issue 18), through real processes:

- the prefill service killed (-9) while its prompts are in flight, mid KV stream: every stream
  completes with the text of a run with no fault (the decode service prefills them instead);
- a prefill-heavy load with no fault (long prompts on this loaded 2-core machine, token streams
  in flight): no service is marked down and no stream is declared dead, although both the
  monitor's health checks and the gateway's stream probes run at their fast defaults;
- a flapping decode service (hung and resumed three times in two seconds) never duplicates a
  token; a gateway killed mid-stream gives its clients a clear error and leaves nothing running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import shutil
import signal
import time

import grpc

from bench.streams import run_with_fault_sync
from edgellm.client import AsyncClient, Client
from edgellm.v1 import monitor_pb2
from tests.conftest import metric, scrape, stack_config, start_stack

# ~600-token prompts: at --kv-link-mbps 4 each prompt's KV (1 KiB a token on the tiny model in
# fp32) takes about 1.2 s on the wire, so a kill 0.6 s in lands mid KV stream for every prompt
# being prefilled, while the others still wait in the gateway's prefill pool.
LONG_PROMPTS = [f"Report {i}: " + " ".join(["the mill by the river kept turning"] * 85) for i in range(12)]


def test_prefill_killed_mid_kv_stream_every_stream_completes_with_its_text(tiny_model_dir):
    stack = start_stack(stack_config(tiny_model_dir, kv_link_mbps="4"))
    try:
        gateway = stack.address("gateway")
        expected = run_with_fault_sync(gateway, LONG_PROMPTS, 24, timeout_s=120)
        assert all(r.completed for r in expected.streams)
        sent_before = metric(scrape(stack.config.network.prefill_metrics_port), "edgellm_kv_bytes_sent_total")
        run = run_with_fault_sync(gateway, LONG_PROMPTS, 24, fault=lambda: stack.kill("prefill"), fault_after_s=0.6,
                                  timeout_s=120)
        failed = [(r.error, r.details) for r in run.streams if not r.completed]
        assert not failed, failed
        assert [r.token_ids for r in run.streams] == [r.token_ids for r in expected.streams]
        # The kill did land mid-request: streams had no token yet when it came and had to move.
        assert sum(1 for r in run.streams if not r.arrivals or r.arrivals[0] > run.fault_at) >= 1
        assert metric(scrape(stack.config.network.gateway_metrics_port), "edgellm_migrations_total") >= 1
        assert sent_before > 0
        assert stack.route_table().mode == monitor_pb2.ROUTE_MODE_NO_PREFILL  # decode prefills now
    finally:
        stack.stop()
        shutil.rmtree(stack.log_dir, ignore_errors=True)


def test_a_prefill_heavy_load_marks_no_service_down(real_stack):
    gateway_metrics = real_stack.config.network.gateway_metrics_port
    failures_before = metric(scrape(gateway_metrics), "edgellm_failures_detected_total")
    migrations_before = metric(scrape(gateway_metrics), "edgellm_migrations_total")
    long_prompt = "Summarise this. " + " ".join(f"Line {i}: the river ran past the mill." for i in range(150))

    async def run() -> list[int]:
        async with AsyncClient(real_stack.address("gateway"), timeout_s=300) as client:
            # Three ~1.8k-token prompts to prefill (seconds of compute each on this machine) while
            # short requests stream tokens from decode.
            heavy = [client.generate_text(prompt=f"{i}. {long_prompt}", max_tokens=4) for i in range(3)]
            light = [client.generate_text(prompt=f"Count to ten, take {i}:", max_tokens=32) for i in range(3)]
            results = await asyncio.gather(*heavy, *light)
        return [len(r.token_ids) for r in results]

    lengths = asyncio.run(run())
    assert all(n > 0 for n in lengths)
    m = scrape(gateway_metrics)
    assert metric(m, "edgellm_failures_detected_total") == failures_before  # no monitor verdict, no dead stream
    assert metric(m, "edgellm_migrations_total") == migrations_before
    assert real_stack.route_table().mode == monitor_pb2.ROUTE_MODE_NORMAL


STORY_PROMPTS = [f"Tale {i}: the lighthouse keeper climbed the stairs and" for i in range(8)]


def test_a_flapping_decode_service_never_duplicates_a_token_and_a_gateway_restart_leaves_nothing_upstream(
        tiny_model_dir):
    """One stack, two faults in turn.
    Flapping: the only decode service is hung and resumed three times in a few seconds; each time
    it is back, new streams start on it before it hangs again. Every stream, old and new, ends
    with exactly the no-fault tokens: a token sent by an attempt the gateway gave up on never
    reaches the client, and nothing is sent twice.
    Gateway restart: kill -9 of the gateway mid-stream ends every client stream with UNAVAILABLE
    (a clear error to retry on), the engines drop the orphaned sequences, and a restarted gateway
    answers the retry.
    Placed as `edgellm up` places the engines on one machine (prefill on CPU 0, decode on CPU 1,
    one thread each): while a takeover decodes on the prefill engine the resumed decode engine
    decodes too, and two unpinned OpenMP teams on two cores slow each other down tens of times."""
    stack = start_stack(stack_config(tiny_model_dir, prefill_cpus="0", decode_cpus="1", prefill_threads="1",
                                     decode_threads="1"))
    try:
        gateway = stack.address("gateway")
        expected = [r.token_ids for r in run_with_fault_sync(gateway, STORY_PROMPTS, 240, timeout_s=120).streams]
        late: list[concurrent.futures.Future] = []

        def flap(pool: concurrent.futures.ThreadPoolExecutor) -> None:
            for cycle in range(3):
                stack.kill("decode", signal.SIGSTOP)
                time.sleep(0.6)
                stack.kill("decode", signal.SIGCONT)
                stack.wait_mode(monitor_pb2.ROUTE_MODE_NORMAL, timeout_s=30)
                late.extend(pool.submit(_tokens, gateway, STORY_PROMPTS[i], 240) for i in (2 * cycle, 2 * cycle + 1))
                time.sleep(0.3)  # they are streaming from decode when it hangs again

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            run = run_with_fault_sync(gateway, STORY_PROMPTS, 240, fault=lambda: flap(pool), after_tokens=8,
                                      timeout_s=120)
            late_tokens = [f.result(timeout=120) for f in late]
        assert [(r.error, r.details) for r in run.streams if not r.completed] == []
        assert [r.token_ids for r in run.streams] == expected
        assert late_tokens == [expected[i] for i in range(6)]
        assert metric(scrape(stack.config.network.gateway_metrics_port), "edgellm_migrations_total") >= 3
        stack.wait_mode(monitor_pb2.ROUTE_MODE_NORMAL, timeout_s=30)

        run = run_with_fault_sync(gateway, STORY_PROMPTS, 400, fault=lambda: stack.kill("gateway"), after_tokens=8,
                                  timeout_s=60)
        assert all(r.error == grpc.StatusCode.UNAVAILABLE for r in run.streams), [(r.error, r.details) for r in run.streams]
        deadline = time.monotonic() + 10  # the engines saw their callers go and freed the sequences
        while time.monotonic() < deadline and any(_num_running(stack, name) for name in ("prefill", "decode")):
            time.sleep(0.1)
        assert [_num_running(stack, name) for name in ("prefill", "decode")] == [0, 0]
        stack.start("gateway")
        stack.wait_serving(("gateway",), timeout_s=60)
        retry = run_with_fault_sync(gateway, STORY_PROMPTS[:2], 240, timeout_s=60)
        assert [r.token_ids for r in retry.streams] == expected[:2]
    finally:
        stack.stop()
        shutil.rmtree(stack.log_dir, ignore_errors=True)


def _tokens(gateway: str, prompt: str, max_tokens: int) -> list[int]:
    with Client(gateway, timeout_s=60) as client:
        return client.generate_text(prompt=prompt, max_tokens=max_tokens, temperature=0.0).token_ids


def _num_running(stack, name: str) -> int:
    from edgellm.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc

    stub = prefill_pb2_grpc.PrefillStub if name == "prefill" else decode_pb2_grpc.DecodeStub
    with stack.channel(name) as channel:
        load = stub(channel).GetLoad(common_pb2.GetLoadRequest(), timeout=10)
    return load.num_running + load.num_waiting
