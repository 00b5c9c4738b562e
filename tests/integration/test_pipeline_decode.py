"""Pipeline-parallel decode (--decode-stages 2) through real processes on the tiny model: the
two-stage unit gives the one-engine tokens (through the gateway, and in GenerateLocal), lists its
stages with their layer ranges, and a stage killed (-9) with streams in flight marks the whole
unit down: every stream moves on (degraded mode on the prefill service) with the no-fault text,
the unit's own calls fail naming the stage, and the unit serves again once the stage is back.
"""

import shutil
import time

import grpc
import pytest

from bench.streams import run_with_fault_sync
from edgellm.launch import free_port, is_serving
from edgellm.v1 import common_pb2, decode_pb2_grpc, monitor_pb2, prefill_pb2_grpc
from tests.conftest import count_in_log, metric, scrape, stack_config, start_stack

PROMPTS = [f"Story {i}: the river ran past the mill and" for i in range(12)]
MAX_TOKENS = 60


@pytest.fixture(scope="module")
def expected(tiny_stack) -> list[list[int]]:
    """Every prompt's tokens from the shared one-engine stack (same model and precision)."""
    run = run_with_fault_sync(tiny_stack.address("gateway"), PROMPTS, MAX_TOKENS, timeout_s=120)
    assert all(r.completed for r in run.streams)
    return [r.token_ids for r in run.streams]


@pytest.fixture(scope="module")
def pipeline_stack(tiny_model_dir):
    stack = start_stack(stack_config(tiny_model_dir, decode_stages=2, kv_cache_mb=64,
                                     decode_stage_addrs=f"127.0.0.1:{free_port()}", decode_stage_timeout_s=2.0))
    yield stack
    stack.stop()
    shutil.rmtree(stack.log_dir, ignore_errors=True)



def generate_local(stack, service: str, request_id: str, prompt: list[int], max_new: int) -> list[int]:
    spec = common_pb2.RequestSpec(request_id=request_id, prompt_token_ids=prompt, max_new_tokens=max_new)
    stub = decode_pb2_grpc.DecodeStub if service == "decode" else prefill_pb2_grpc.PrefillStub
    with stack.channel(service) as channel:
        return [t for d in stub(channel).GenerateLocal(common_pb2.GenerateLocalRequest(spec=spec), timeout=60)
                for t in d.token_ids]


def test_stages_list_their_layers_and_split_the_weights(pipeline_stack, tiny_stack):
    with pipeline_stack.channel("decode") as channel:
        load = decode_pb2_grpc.DecodeStub(channel).GetLoad(common_pb2.GetLoadRequest(), timeout=5)
    with tiny_stack.channel("decode") as channel:
        whole = decode_pb2_grpc.DecodeStub(channel).GetLoad(common_pb2.GetLoadRequest(), timeout=5).weight_bytes
    # the tiny model is mostly its (untied) embedding and LM head, both on stage 0: it keeps one layer
    assert [(s.layer_start, s.layer_end) for s in load.stages] == [(0, 1), (1, 4)]
    assert load.stages[1].address == pipeline_stack.address("decode-stage1")
    assert all(s.healthy for s in load.stages)
    assert whole <= sum(s.weight_bytes for s in load.stages) < 1.01 * whole  # held once (but the final norm)


def test_two_stages_give_the_one_engine_tokens(pipeline_stack, expected):
    # decode prefills itself (GenerateLocal: the NO_PREFILL path) through both stages
    prompt = [5, 9, 2, 7, 11, 40, 3]
    assert generate_local(pipeline_stack, "decode", "local-1", prompt, 12) == \
        generate_local(pipeline_stack, "prefill", "local-1", prompt, 12)
    # the normal path: prefill pushes each layer's KV to its stage, decode streams through both
    run = run_with_fault_sync(pipeline_stack.address("gateway"), PROMPTS[:4], MAX_TOKENS, timeout_s=120)
    assert [r.token_ids for r in run.streams] == expected[:4]
    assert count_in_log(pipeline_stack, "decode-stage1", "kv_received") >= 4  # stage 1's layers went to stage 1
    assert metric(scrape(pipeline_stack.config.network.gateway_metrics_port), "edgellm_degraded_requests_total") == 0


def test_kill9_of_a_stage_moves_every_stream_and_the_unit_comes_back(pipeline_stack, expected):
    stack = pipeline_stack
    run = run_with_fault_sync(stack.address("gateway"), PROMPTS, MAX_TOKENS, fault=lambda: stack.kill("decode-stage1"))
    failed = [(r.prompt, r.error, r.details) for r in run.streams if not r.completed]
    assert not failed, failed
    assert [r.token_ids for r in run.streams] == expected
    assert metric(scrape(stack.config.network.gateway_metrics_port), "edgellm_migrations_total", 'to="prefill"') >= 1
    # the unit is down as a whole: stage 0 is alive but not serving, its own calls name the stage
    deadline = time.monotonic() + 10
    while is_serving(stack.address("decode"), security=stack.security):
        assert time.monotonic() < deadline, "stage 0 still serving with stage 1 dead"
        time.sleep(0.1)
    with pytest.raises(grpc.RpcError) as e:
        generate_local(stack, "decode", "while-down", [1, 2, 3], 4)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "decode stage 1" in e.value.details()

    stack.start("decode-stage1")  # back: stage 0 resets its stages and serves again
    stack.wait_serving(("decode-stage1", "decode"), timeout_s=60)
    stack.wait_mode(monitor_pb2.ROUTE_MODE_NORMAL, timeout_s=30)
    prompt = [5, 9, 2, 7, 11, 40, 3]
    assert generate_local(stack, "decode", "after", prompt, 8) == generate_local(stack, "prefill", "after", prompt, 8)
