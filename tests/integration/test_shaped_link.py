"""The benchmarks' real link emulation: the decode service in its own network namespace behind a
veth pair shaped by `tc tbf`. Needs root and iproute2; skipped (with the reason) elsewhere,
where `make bench-kv` falls back to the KV sender's token bucket."""

import shutil
import subprocess

import pytest

from bench import shaped_link
from bench.shaped_link import ShapedLink
from edgellm.launch import free_port
from edgellm.v1 import common_pb2, prefill_pb2, prefill_pb2_grpc
from tests.conftest import stack_config, start_stack

pytestmark = pytest.mark.skipif(not shaped_link.available(), reason="needs root and iproute2 (ip netns, tc)")
RATE_MBPS = 10.0


def host_routes() -> str:
    return subprocess.run(["ip", "route"], capture_output=True, text=True, check=True).stdout


def test_the_test_subnet_is_unreachable_from_the_host_while_the_link_exists():
    with ShapedLink(RATE_MBPS) as link:
        assert f"unreachable {link.subnet}" in host_routes()
        stray = link.subnet.replace(".0/24", ".77")  # in the test subnet, not on the veth
        out = subprocess.run(["ip", "route", "get", stray], capture_output=True, text=True)
        assert out.returncode != 0 or "unreachable" in out.stdout + out.stderr
    assert link.subnet not in host_routes()
    assert link.netns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout


def test_kv_crosses_the_shaped_link_no_faster_than_its_rate(tiny_model_dir):
    with ShapedLink(RATE_MBPS) as link:
        decode = f"{link.decode_host}:{free_port()}"
        config = stack_config(tiny_model_dir, decode_addrs=decode, kv_max_chunk_bytes=65536)
        stack = start_stack(config, process_prefix={"decode": link.prefix},
                            process_args={"decode": ["--host", link.decode_host]})
        try:
            prompt = [100 + i % 5000 for i in range(1900)]
            with stack.channel("prefill") as channel:
                reply = prefill_pb2_grpc.PrefillStub(channel).Prefill(
                    prefill_pb2.PrefillRequest(
                        spec=common_pb2.RequestSpec(request_id="shaped", prompt_token_ids=prompt, max_new_tokens=2),
                        decode_address=decode),
                    timeout=120,
                )
        finally:
            stack.stop()
            shutil.rmtree(stack.log_dir, ignore_errors=True)
    transfer_s = (reply.kv.last_chunk_received_unix_ns - reply.kv.first_chunk_received_unix_ns) / 1e9
    at_link_rate_s = reply.kv.num_bytes * 8 / (RATE_MBPS * 1e6)
    assert reply.kv.num_bytes > 512 << 10
    # The first chunk rides the token bucket's burst; the rest is held to the rate by the kernel.
    assert transfer_s >= 0.7 * at_link_rate_s, (transfer_s, at_link_rate_s)
