"""Hostile input against a real stack (issue 13): generated GenerateRequests at the gateway and
KVChunk streams at decode's PushKV each end OK or with a clear status (never UNKNOWN/INTERNAL,
never a hang), no service dies, and well-formed greedy requests running meanwhile get exactly
their solo answers.

A bounded, derandomized number of examples here (the file takes well under a minute on two
cores); `make fuzz` (bench/fuzz.py) runs the same strategies and checks over >= 10,000 inputs.
Strategies: bench/fuzz_inputs.py; sending and judging: bench/fuzz_harness.py.
"""

import shutil

import pytest
from hypothesis import HealthCheck, given, settings

from bench.fuzz import STACK_OVERRIDES
from bench.fuzz_harness import FuzzTarget, GoodTraffic, describe_request, wait_healthy
from bench.fuzz_inputs import generate_requests, kv_cases
from tests.conftest import stack_config, start_stack

# Derandomized (the same examples on every run); a third of the generated requests reach the engines.
GENERATE_SETTINGS = settings(max_examples=40, derandomize=True, deadline=None, database=None,
                             suppress_health_check=list(HealthCheck))
KV_SETTINGS = settings(GENERATE_SETTINGS, max_examples=150)


@pytest.fixture(scope="module")
def fuzz_stack(tiny_model_dir):
    stack = start_stack(stack_config(tiny_model_dir, **STACK_OVERRIDES))
    yield stack
    stack.stop()
    shutil.rmtree(stack.log_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def target(fuzz_stack):
    target = FuzzTarget(fuzz_stack)
    yield target
    target.close()


@pytest.fixture(scope="module")
def good_traffic(fuzz_stack):
    """Started before the first fuzz test; stopped and judged by the last one."""
    good = GoodTraffic(fuzz_stack).start()
    yield good
    good.stop()


@GENERATE_SETTINGS
@given(request=generate_requests())
def test_every_generate_request_ends_with_a_clear_status(target, good_traffic, request):
    outcome = target.generate(request)
    assert not outcome.problem, f"{outcome}\ninput: {describe_request(request)}"


@KV_SETTINGS
@given(case=kv_cases())
def test_every_kv_stream_ends_with_a_clear_status(target, good_traffic, case):
    for outcome in target.push_kv(case):
        assert not outcome.problem, f"{outcome}\ninput: {case.describe()}"


def test_no_service_died_and_good_requests_were_undisturbed(fuzz_stack, good_traffic):
    good_traffic.stop()
    assert good_traffic.num_runs > 0
    assert good_traffic.disturbed == []
    assert wait_healthy(fuzz_stack) == []
