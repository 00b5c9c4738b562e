"""The public API through a real four-process stack (tiny model): streaming, SDKs, errors, reflection."""

import asyncio
import subprocess
import sys

import grpc
import pytest
from grpc_requests import Client as ReflectionClient

from edgellm.client import AsyncClient, Client, GenerationError
from edgellm.launch import is_serving
from edgellm.v1 import gateway_pb2, gateway_pb2_grpc

CHAT = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture()
def client(tiny_stack):
    with Client(tiny_stack.address("gateway"), timeout_s=60) as c:
        yield c


def test_every_service_reports_serving(tiny_stack):
    for name in ("gateway", "prefill", "decode", "monitor"):
        assert is_serving(tiny_stack.address(name)), name


def test_stream_of_deltas_ends_with_usage_and_timings(client):
    deltas = list(client.generate(messages=CHAT, max_tokens=12))
    *body, last = deltas
    assert body and all(d.finish_reason == "" for d in body)
    assert last.finish_reason in ("length", "stop")
    tokens = [t for d in deltas for t in d.token_ids]
    assert last.completion_tokens == len(tokens) and 1 <= len(tokens) <= 12
    assert last.prompt_tokens > 5  # the chat template was applied
    assert last.ttft_ms > 0
    assert last.request_id and all(d.request_id == last.request_id for d in deltas)


def test_async_and_sync_sdk_agree_on_greedy_output(client, tiny_stack):
    sync = client.generate_text(prompt="The sea is", max_tokens=10)

    async def via_async():
        async with AsyncClient(tiny_stack.address("gateway")) as c:
            return await c.generate_text(prompt="The sea is", max_tokens=10)

    result = asyncio.run(via_async())
    assert result.token_ids == sync.token_ids and result.text == sync.text
    assert len(sync.token_ids) == sync.completion_tokens > 0


def test_seeded_sampling_is_reproducible(client):
    def run(seed):
        return client.generate_text(prompt="Once", max_tokens=16, temperature=1.0, seed=seed).token_ids

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_stop_string_truncates_the_text(client):
    full = client.generate_text(prompt="A long story:", max_tokens=24)
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip(), "need a non-blank stop string"
    cut = client.generate_text(prompt="A long story:", max_tokens=24, stop=[stop])
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def _raw_call(tiny_stack, request):
    with grpc.insecure_channel(tiny_stack.address("gateway")) as channel:
        return list(gateway_pb2_grpc.GatewayStub(channel).Generate(request, timeout=30))


@pytest.mark.parametrize(
    "request_kwargs, message",
    [
        ({}, "exactly one of prompt or messages"),
        ({"prompt": "x", "messages": [gateway_pb2.ChatMessage(role="user", content="y")]}, "exactly one"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"messages": [gateway_pb2.ChatMessage(role="robot", content="y")]}, "roles"),
        ({"prompt": "word " * 3000}, "context is 2048 tokens"),
    ],
    ids=["neither", "both", "temperature", "top_p", "role", "too-long"],
)
def test_bad_requests_get_invalid_argument(tiny_stack, request_kwargs, message):
    with pytest.raises(grpc.RpcError) as e:
        _raw_call(tiny_stack, gateway_pb2.GenerateRequest(**request_kwargs))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in e.value.details()


def test_sdk_raises_a_clear_error(client):
    with pytest.raises(GenerationError) as e:
        client.generate_text(prompt="x", temperature=-1)
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_cancelled_stream_leaves_the_stack_healthy(client, tiny_stack):
    stream = client.generate(prompt="Count:", max_tokens=500)
    received = [next(stream) for _ in range(3)]
    stream.close()  # cancels the call
    assert all(d.token_ids for d in received)
    after = client.generate_text(prompt="Count:", max_tokens=5)
    assert after.completion_tokens >= 1
    # the decode service saw the cancellation and dropped the sequence
    decode_log = open(f"{tiny_stack.log_dir}/decode.log").read()
    assert "engine failed" not in decode_log


def test_reflection_only_client_lists_services_and_generates(tiny_stack):
    expected = {
        "gateway": "edgellm.v1.Gateway",
        "prefill": "edgellm.v1.Prefill",
        "decode": "edgellm.v1.Decode",
        "monitor": "edgellm.v1.Monitor",
    }
    for name, service in expected.items():
        names = ReflectionClient.get_by_endpoint(tiny_stack.address(name)).service_names
        assert service in names and "grpc.health.v1.Health" in names
    reflection = ReflectionClient.get_by_endpoint(tiny_stack.address("gateway"))
    replies = list(reflection.request("edgellm.v1.Gateway", "Generate", {"prompt": "Hello", "max_tokens": 4}))
    assert replies[-1]["finish_reason"] in ("length", "stop")
    assert sum(len(r.get("token_ids", [])) for r in replies) == replies[-1]["usage"]["completion_tokens"]


def test_cli_generate_and_status(tiny_stack):
    gen = subprocess.run(
        [sys.executable, "-m", "edgellm", "generate", "Hi", "--max-tokens", "5", "--gateway", tiny_stack.address("gateway"), "--stats"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert gen.returncode == 0, gen.stderr
    assert "completion=" in gen.stderr
    status = subprocess.run(
        [sys.executable, "-m", "edgellm", "status", "--monitor", tiny_stack.address("monitor"),
         "--cluster-token-file", tiny_stack.config.security.cluster_token_file],
        capture_output=True,
        text=True,
        timeout=60,
        env={"EDGELLM_GATEWAY": tiny_stack.address("gateway"), "PATH": ""},
    )
    assert status.returncode == 0, status.stderr
    assert "mode: normal" in status.stdout
    assert status.stdout.count("healthy") == 4 and "DOWN" not in status.stdout
