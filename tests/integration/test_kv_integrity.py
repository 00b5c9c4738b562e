"""A damaged KV stream between real prefill and decode processes is never decoded: the decode
service rejects it, the gateway finishes the request on the prefill service, and the client
gets the same greedy text as an undisturbed run, with no error and nothing repeated."""

import shutil

import pytest

from edgellm.client import Client
from edgellm.transfer.faults import FAULTS
from tests.conftest import stack_config, start_stack

PROMPT = "The committee met on a grey Tuesday to settle the question of the bridge"


@pytest.fixture(scope="module")
def faulty_stack(tiny_model_dir):
    s = start_stack(stack_config(tiny_model_dir, kv_fault_injection="true"))
    yield s
    s.stop()
    shutil.rmtree(s.log_dir, ignore_errors=True)


def generate(stack, request_id: str):
    with Client(stack.address("gateway"), timeout_s=60) as client:
        return client.generate_text(prompt=PROMPT, max_tokens=16, temperature=0, request_id=request_id)


@pytest.mark.parametrize("fault", FAULTS)
def test_a_damaged_kv_stream_still_gives_the_undisturbed_answer(faulty_stack, fault):
    clean = generate(faulty_stack, f"clean-{fault}")
    damaged = generate(faulty_stack, f"kv-fault-{fault}-1")
    assert damaged.token_ids == clean.token_ids and damaged.text == clean.text
    assert damaged.finish_reason == clean.finish_reason and damaged.completion_tokens == len(damaged.token_ids)
    with open(f"{faulty_stack.log_dir}/decode.log") as f:
        decode_log = f.read()
    # the damage really happened and was caught: decode rejected that stream, and only that one
    rejected = [line for line in decode_log.splitlines() if "kv_rejected" in line]
    assert any(f"kv-fault-{fault}-1" in line for line in rejected), rejected
    assert not any(f"clean-{fault}" in line for line in rejected)
