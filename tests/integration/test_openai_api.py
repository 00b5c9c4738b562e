"""The OpenAI-compatible HTTP API on real processes: the official `openai` client, raw HTTP
(curl's view: urllib and http.client), and the per-key limits shared with gRPC.

Stacks: the session's tiny-model stack for most tests, the session's real-model stack for the
equality with the gRPC API, and one tiny-model stack of this module with API keys and a token
budget.
"""

from __future__ import annotations

import http.client
import json
import shutil
import time
import urllib.error
import urllib.request

import grpc
import openai
import pytest

from edgellm.client import Client, GenerationError
from edgellm.rpc.security import key_fingerprint
from edgellm.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import metric, scrape, stack_config, start_stack

KEYS = ("key-http", "key-other", "key-grpc")
TPM = 40  # tokens per minute per key: one ~60-token prompt puts a key over it


def base_url(stack) -> str:
    return f"http://127.0.0.1:{stack.config.network.gateway_http_port}"


def post(stack, path: str, body: dict, key: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers with lower-case names, body) of a POST, as curl would see it."""
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    request = urllib.request.Request(base_url(stack) + path, json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def get(stack, path: str, key: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(base_url(stack) + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def events(raw: bytes) -> list:
    """The data of each server-sent event ("[DONE]" kept as a string)."""
    out = []
    for line in raw.decode().split("\n\n"):
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def assert_openai_error(raw: bytes, type_: str | None = None) -> dict:
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if type_ is not None:
        assert error["type"] == type_, error
    return error


def openai_client(stack, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url(stack) + "/v1", api_key=key, max_retries=0, timeout=60)


def model_id(stack, key: str = "unused") -> str:
    with openai_client(stack, key) as client:
        return client.models.list().data[0].id


# ---- the openai client and curl, on the tiny model ------------------------------------------


def test_openai_client_lists_the_model_streams_a_chat_with_usage_and_completes(tiny_stack, tiny_model_dir):
    with openai_client(tiny_stack) as client:
        models = client.models.list().data
        assert [m.id for m in models] == [tiny_model_dir.rstrip("/").rsplit("/", 1)[-1]]
        messages = [{"role": "user", "content": "Tell me a story"}]
        chunks = list(client.chat.completions.create(model=models[0].id, messages=messages, max_tokens=8, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
        assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + 8
        whole = client.chat.completions.create(model=models[0].id, messages=messages, max_tokens=8, temperature=0)
        assert whole.choices[0].message.content == text and text  # streamed == not streamed (greedy)
        assert whole.usage == chunks[-1].usage
        plain = client.completions.create(model=models[0].id, prompt="Once upon a time", max_tokens=5, temperature=0)
        assert plain.choices[0].text and plain.choices[0].finish_reason == "length"
        assert plain.usage.completion_tokens == 5 and plain.object == "text_completion"


def test_curl_streamed_and_not(tiny_stack):
    body = {"prompt": "The sea is", "max_tokens": 6, "temperature": 0, "stop": ["zzzz"]}
    status, headers, raw = post(tiny_stack, "/v1/completions", body | {"stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    data = events(raw)
    assert data[-1] == "[DONE]" and data[-2]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(d["choices"][0]["text"] for d in data[:-1])
    status, _, raw = post(tiny_stack, "/v1/completions", body)
    whole = json.loads(raw)
    assert status == 200 and whole["choices"][0]["text"] == streamed
    assert whole["usage"]["completion_tokens"] == 6
    assert get(tiny_stack, "/health") == (200, b'{"status": "ok"}')


def test_bad_requests_get_400_with_an_openai_body(tiny_stack):
    over_context = {"prompt": " hello" * 3000, "max_tokens": 1}  # the tiny model's context is 2048 tokens
    status, _, raw = post(tiny_stack, "/v1/completions", over_context)
    assert status == 400 and "context" in assert_openai_error(raw, "invalid_request_error")["message"]
    status, _, raw = post(tiny_stack, "/v1/completions", over_context | {"stream": True})
    assert status == 400  # refused before the stream starts: a real status, not an event
    status, _, raw = post(tiny_stack, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                                 "n": 2, "logit_bias": {"5": 1}})
    error = assert_openai_error(raw, "invalid_request_error")
    assert status == 400 and error["param"] == "logit_bias" and "logit_bias" in error["message"]
    status, _, raw = post(tiny_stack, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "n": 2})
    assert status == 400 and assert_openai_error(raw)["param"] == "n"
    status, _, raw = post(tiny_stack, "/v1/chat/completions",
                          {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    assert status == 404 and assert_openai_error(raw)["code"] == "model_not_found"
    status, _, raw = post(tiny_stack, "/v1/embeddings", {"input": "x"})
    assert status == 404 and "/v1/embeddings" in assert_openai_error(raw)["message"]


def test_a_client_that_disconnects_mid_stream_frees_its_kv_blocks(tiny_stack):
    net = tiny_stack.config.network
    used_before = metric(scrape(net.decode_metrics_port), "edgellm_kv_blocks_used")
    gateway_before = scrape(net.gateway_metrics_port)
    conn = http.client.HTTPConnection("127.0.0.1", net.gateway_http_port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "Once", "max_tokens": 2000, "temperature": 0,
                                                        "stream": True}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    for _ in range(40):  # past the first KV block (16 tokens): the request holds blocks at decode now
        assert response.readline().startswith(b"data: {")
        response.readline()
    assert metric(scrape(net.decode_metrics_port), "edgellm_kv_blocks_used") > used_before
    conn.sock.close()  # the client goes away with ~1,960 tokens still to come
    conn.close()
    deadline = time.monotonic() + 10
    while metric(scrape(net.decode_metrics_port), "edgellm_kv_blocks_used") > used_before:
        assert time.monotonic() < deadline, "decode still holds the KV of a disconnected client's request"
        time.sleep(0.05)
    gateway = scrape(net.gateway_metrics_port)
    cancelled = 'code="CANCELLED"'
    errors, requests = "edgellm_errors_total", "edgellm_requests_total"
    assert metric(gateway, errors, cancelled) == metric(gateway_before, errors, cancelled) + 1
    assert metric(gateway, requests) == metric(gateway_before, requests)  # it never finished


# ---- the same answers as the gRPC API, on the real model ------------------------------------


@pytest.mark.real_model
def test_greedy_text_equals_the_grpc_api(real_stack):
    model = model_id(real_stack)
    chat_request = {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24,
                    "temperature": 0}
    text_request = {"prompt": "The three primary colors are", "max_tokens": 16, "temperature": 0}
    with Client(real_stack.address("gateway"), timeout_s=120) as grpc_client:
        expected_chat = grpc_client.generate_text(**chat_request)
        expected_text = grpc_client.generate_text(**text_request)
    with openai_client(real_stack) as client:
        chat = client.chat.completions.create(model=model, **chat_request)
        assert chat.choices[0].message.content == expected_chat.text and "Paris" in expected_chat.text
        assert chat.usage.prompt_tokens == expected_chat.prompt_tokens
        assert chat.choices[0].finish_reason == expected_chat.finish_reason
        plain = client.completions.create(model=model, **text_request)
        assert plain.choices[0].text == expected_text.text


# ---- API keys and token budgets, shared by HTTP and gRPC -------------------------------------


@pytest.fixture(scope="module")
def limited_stack(tiny_model_dir, tmp_path_factory):
    keys_file = tmp_path_factory.mktemp("openai-keys") / "api-keys"
    keys_file.write_text("\n".join(KEYS) + "\n")
    stack = start_stack(stack_config(tiny_model_dir, api_keys_file=str(keys_file), rate_limit_tpm=TPM,
                                     rate_limit_rpm=1000))
    yield stack
    stack.stop()
    shutil.rmtree(stack.log_dir, ignore_errors=True)


def grpc_generate(stack, key: str, prompt: str) -> None:
    with grpc.insecure_channel(stack.address("gateway")) as channel:
        list(gateway_pb2_grpc.GatewayStub(channel).Generate(
            gateway_pb2.GenerateRequest(prompt=prompt, max_tokens=2), timeout=30,
            metadata=(("authorization", f"Bearer {key}"),)))


LONG_PROMPT = " word" * 60  # ~60 tokens: over the 40-token budget in one request


def test_a_wrong_key_gets_401_and_unauthenticated(limited_stack):
    status, _, raw = post(limited_stack, "/v1/completions", {"prompt": "x", "max_tokens": 1}, key="key-wrong")
    assert status == 401 and assert_openai_error(raw)["code"] == "invalid_api_key"
    assert post(limited_stack, "/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 401  # no key
    with openai_client(limited_stack, "key-wrong") as client, pytest.raises(openai.AuthenticationError):
        client.models.list()
    assert get(limited_stack, "/health")[0] == 200  # probes need no key
    with Client(limited_stack.address("gateway"), timeout_s=30, api_key="key-wrong") as client:
        with pytest.raises(GenerationError) as e:
            client.generate_text(prompt="x", max_tokens=1)
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_a_key_over_its_token_budget_gets_429_on_http_and_resource_exhausted_on_grpc(limited_stack):
    status, headers, raw = post(limited_stack, "/v1/completions", {"prompt": LONG_PROMPT, "max_tokens": 2}, "key-http")
    assert status == 200, raw
    assert headers["x-ratelimit-limit-tokens"] == str(TPM) and headers["x-ratelimit-limit-requests"] == "1000"
    status, headers, raw = post(limited_stack, "/v1/completions", {"prompt": "x", "max_tokens": 1}, "key-http")
    error = assert_openai_error(raw, "tokens")
    assert status == 429 and error["code"] == "rate_limit_exceeded" and "rate_limit_tpm" in error["message"]
    assert int(headers["retry-after"]) >= 1 and headers["x-ratelimit-remaining-tokens"] == "0"
    # the budget is the key's, whichever door it comes through
    with pytest.raises(grpc.RpcError) as e:
        grpc_generate(limited_stack, "key-http", "x")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    trailing = dict(e.value.trailing_metadata())
    assert int(trailing["retry-after"]) >= 1 and trailing["x-ratelimit-limit-tokens"] == str(TPM)
    # and a key spent over gRPC is refused over HTTP
    grpc_generate(limited_stack, "key-grpc", LONG_PROMPT)
    with pytest.raises(grpc.RpcError) as e:
        grpc_generate(limited_stack, "key-grpc", "x")
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert post(limited_stack, "/v1/completions", {"prompt": "x", "max_tokens": 1}, "key-grpc")[0] == 429
    # another key is not affected
    with openai_client(limited_stack, "key-other") as client:
        chat = client.chat.completions.create(model=model_id(limited_stack, "key-other"),
                                              messages=[{"role": "user", "content": "hi"}], max_tokens=2, temperature=0)
    assert chat.usage.completion_tokens == 2
    # per-key usage in the metrics, by fingerprint, never by the key
    page = scrape(limited_stack.config.network.gateway_metrics_port)
    assert not any(key in page for key in KEYS)
    limited = f'key="{key_fingerprint("key-http")}",limit="rate_limit_tpm"'
    assert metric(page, "edgellm_rate_limited_total", limited) == 2
    assert metric(page, "edgellm_key_tokens_total", f'key="{key_fingerprint("key-http")}",kind="prompt"') >= 60
    assert metric(page, "edgellm_key_requests_total", f'key="{key_fingerprint("key-other")}"') == 1
