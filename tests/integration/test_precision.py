"""Per-phase precision through real processes: bf16 prefill streaming KV to an fp32 decode
service; the shipped default (bf16 prefill, INT4-AWQ decode); a bad INT4 checkpoint refused."""

import shutil
import subprocess
import sys

import pytest

from edgellm.client import Client
from edgellm.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from tests.conftest import stack_config, start_stack


@pytest.fixture(scope="module")
def mixed_stack(tiny_model_dir):
    s = start_stack(stack_config(tiny_model_dir, prefill_dtype="bf16", decode_weights="fp32"))
    yield s
    s.stop()
    shutil.rmtree(s.log_dir, ignore_errors=True)


def status_lines(stack) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "edgellm", "status", "--monitor", stack.address("monitor"),
         "--cluster-token-file", stack.config.security.cluster_token_file],
        capture_output=True, text=True, timeout=60, env={"EDGELLM_GATEWAY": stack.address("gateway")},
    )
    assert out.returncode == 0, out.stderr
    return {line.split()[0]: line for line in out.stdout.splitlines()[1:]}


def test_bf16_prefill_feeds_fp32_decode(mixed_stack, tiny_model_dir):
    with Client(mixed_stack.address("gateway"), timeout_s=60) as client:
        result = client.generate_text(prompt="Precision matters", max_tokens=12)
    assert result.completion_tokens == len(result.token_ids) >= 1

    prompt = list(range(100, 140))
    with mixed_stack.channel("prefill") as channel:
        reply = prefill_pb2_grpc.PrefillStub(channel).Prefill(
            prefill_pb2.PrefillRequest(spec=common_pb2.RequestSpec(request_id="p1", prompt_token_ids=prompt, max_new_tokens=2),
                                       decode_address=mixed_stack.address("decode")),
            timeout=30,
        )
    layers, kv_heads, head_dim = 4, 2, 16  # the tiny model
    assert reply.kv.num_bytes == 2 * layers * kv_heads * len(prompt) * head_dim * 2  # K and V, 2 bytes each: bf16


def test_status_shows_each_engines_precision(mixed_stack):
    lines = status_lines(mixed_stack)
    assert " bf16 " in lines["prefill"] and " fp32 " in lines["decode"], lines


def test_the_default_stack_is_bf16_prefill_and_int4_awq_decode(tiny_model_dir):
    s = start_stack(stack_config(tiny_model_dir, shipped_precision=True))
    try:
        with Client(s.address("gateway"), timeout_s=60) as client:
            result = client.generate_text(prompt="Four bits", max_tokens=10)
        assert result.completion_tokens == len(result.token_ids) >= 1
        with open(f"{s.log_dir}/decode.log") as f:
            assert "kv_received" in f.read()  # decoded by the INT4 decode service, not in degraded mode
        lines = status_lines(s)
        assert " bf16 " in lines["prefill"], lines
        assert "int4-awq g32+8 outliers" in lines["decode"], lines
    finally:
        s.stop()
        shutil.rmtree(s.log_dir, ignore_errors=True)


def test_a_corrupted_int4_checkpoint_stops_the_decode_service_with_a_clear_error(tiny_model_dir, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises((RuntimeError, TimeoutError), match="unreadable"):
        start_stack(stack_config(tiny_model_dir, decode_weights="int4-awq", int4_checkpoint=str(bad)))
