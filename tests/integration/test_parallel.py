"""One phase across several devices (issue 15), through real processes: a tensor-parallel
prefill group (rank 0 = the prefill service, rank 1 a worker process), each rank streaming its
own KV heads to the decode service.

The group must give the single-device tokens; `kill -9` of a worker must cost no request (the
group breaks, prefill reports itself down, the decode service prefills meanwhile) and the
group must re-form when the worker is back.
"""

import shutil
import time

from bench.streams import run_with_fault_sync
from edgellm.v1 import monitor_pb2
from tests.conftest import count_in_log, metric, scrape, stack_config, start_stack

PROMPTS = [f"Story {i}: the river ran past the mill and" for i in range(8)]
MAX_TOKENS = 40



def test_tp_prefill_matches_one_device_and_survives_a_dead_rank(tiny_model_dir, tiny_stack):
    expected = run_with_fault_sync(tiny_stack.address("gateway"), PROMPTS, MAX_TOKENS, timeout_s=120)
    assert all(r.completed for r in expected.streams)
    stack = start_stack(stack_config(tiny_model_dir, prefill_tp=2, prefill_tp_timeout_s=2))
    try:
        run = run_with_fault_sync(stack.address("gateway"), PROMPTS, MAX_TOKENS, timeout_s=120)
        assert [r.token_ids for r in run.streams] == [r.token_ids for r in expected.streams]
        # each prompt's KV came as two streams: rank 0's heads and rank 1's
        assert count_in_log(stack, "decode", "kv_received") == 2 * len(PROMPTS)

        # kill -9 of rank 1 while requests arrive: the group breaks, nothing is lost
        run = run_with_fault_sync(stack.address("gateway"), PROMPTS, MAX_TOKENS, timeout_s=120,
                                  fault=lambda: stack.kill("prefill-rank1"), fault_after_s=0.05)
        failed = [(r.prompt, r.error, r.details) for r in run.streams if not r.completed]
        assert not failed, failed
        assert [r.token_ids for r in run.streams] == [r.token_ids for r in expected.streams]
        stack.wait_mode(monitor_pb2.ROUTE_MODE_NO_PREFILL, timeout_s=15)  # prefill reports itself down
        assert count_in_log(stack, "prefill", "tp_group_broken") >= 1
        run = run_with_fault_sync(stack.address("gateway"), PROMPTS[:2], MAX_TOKENS, timeout_s=120)
        assert [r.token_ids for r in run.streams] == [r.token_ids for r in expected.streams[:2]]
        assert metric(scrape(stack.config.network.gateway_metrics_port), "edgellm_degraded_requests_total",
                      'engine="decode"') >= 2

        # the worker is back: the group re-forms under a new generation and prefill serves again
        stack.start("prefill-rank1")
        stack.wait_mode(monitor_pb2.ROUTE_MODE_NORMAL, timeout_s=60)
        assert count_in_log(stack, "prefill", "tp_group_formed") >= 2
        received = count_in_log(stack, "decode", "kv_received")
        run = run_with_fault_sync(stack.address("gateway"), PROMPTS[:2], MAX_TOKENS, timeout_s=120)
        assert [r.token_ids for r in run.streams] == [r.token_ids for r in expected.streams[:2]]
        deadline = time.monotonic() + 5
        while count_in_log(stack, "decode", "kv_received") < received + 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert count_in_log(stack, "decode", "kv_received") == received + 4
    finally:
        stack.stop()
        shutil.rmtree(stack.log_dir, ignore_errors=True)
