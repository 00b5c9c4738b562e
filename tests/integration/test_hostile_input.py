"""Hostile input through a real stack (tiny model): every bad request gets a clear status within
seconds, good requests running at the same time are undisturbed, and the internal doors
(Prefill, PushKV, Decode, GenerateLocal) check what they are sent before doing any work."""

import concurrent.futures
import math
import time

import grpc
import pytest
import torch

from edgellm.transfer import codec
from tests.conftest import scrape
from edgellm.v1 import (common_pb2, decode_pb2, decode_pb2_grpc, gateway_pb2, gateway_pb2_grpc, prefill_pb2,
                        prefill_pb2_grpc)

MB = 1 << 20
GOOD_PROMPTS = ["The sea is", "Once upon a time", "In the morning the", "A list of fruits:"]
UNCLEAR = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
# tiny model (tests/conftest.py build_tiny_model), fp32 KV at decode in the plumbing stack
LAYERS, KV_HEADS, HEAD_DIM = 4, 2, 16


@pytest.fixture(scope="module")
def gateway(tiny_stack):
    channel = tiny_stack.channel("gateway", options=[("grpc.max_send_message_length", 8 * MB)])
    yield gateway_pb2_grpc.GatewayStub(channel)
    channel.close()


def generate(gateway, timeout=60, **fields) -> tuple[list[int], str]:
    """(token ids, request_id echoed back) of one request."""
    tokens, echoed = [], None
    for r in gateway.Generate(gateway_pb2.GenerateRequest(**fields), timeout=timeout):
        tokens += r.token_ids
        echoed = r.request_id
    return tokens, echoed


def refused(gateway, **fields) -> tuple[grpc.StatusCode, str, float]:
    start = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        generate(gateway, timeout=20, **fields)
    return e.value.code(), e.value.details(), time.monotonic() - start


HOSTILE = {
    "temperature NaN": dict(prompt="hi", temperature=math.nan),
    "temperature inf": dict(prompt="hi", temperature=math.inf),
    "temperature subnormal": dict(prompt="hi", temperature=1e-39),
    "top_p NaN": dict(prompt="hi", top_p=math.nan),
    "top_p inf": dict(prompt="hi", top_p=math.inf),
    "20k stop strings": dict(prompt="hi", stop=["x"] * 20_000),
    "1 MB stop string": dict(prompt="hi", stop=["x" * MB]),
    "1 MB request_id": dict(prompt="hi", request_id="r" * MB),
    "1 MB prompt": dict(prompt="word " * (MB // 5)),
    "max_tokens 2e9": dict(prompt="hi", max_tokens=2_000_000_000),
}


def test_hostile_requests_get_clear_statuses_and_good_streams_are_undisturbed(gateway, tiny_stack):
    good = dict(max_tokens=24, temperature=0.0)
    solo = [generate(gateway, prompt=p, **good)[0] for p in GOOD_PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(len(GOOD_PROMPTS) + len(HOSTILE)) as pool:
        good_runs = [pool.submit(generate, gateway, prompt=p, **good) for p in GOOD_PROMPTS]
        bad_runs = {name: pool.submit(refused, gateway, **fields) for name, fields in HOSTILE.items()}
        outcomes = {name: f.result() for name, f in bad_runs.items()}
        got = [f.result()[0] for f in good_runs]
    for name, (code, details, seconds) in outcomes.items():
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
        assert seconds < 10, (name, seconds)
    assert "max_tokens is 2000000000" in outcomes["max_tokens 2e9"][1]
    assert "max_stop_strings" in outcomes["20k stop strings"][1]
    assert "max_request_id_bytes" in outcomes["1 MB request_id"][1]
    assert "max_prompt_bytes" in outcomes["1 MB prompt"][1]
    assert got == solo
    hits = scrape(tiny_stack.config.network.gateway_metrics_port)
    for limit in ("max_stop_strings", "max_stop_bytes", "max_request_id_bytes", "max_prompt_bytes"):
        assert f'edgellm_limit_hits_total{{limit="{limit}"}}' in hits, limit


def test_requests_sharing_a_request_id_each_get_their_own_answer(gateway):
    # Equal-length prompts: before, the second stream's KV replaced the first's at decode.
    prompts = ["The sea is blue", "The cat is grey", "The sky is green"]
    solo = [generate(gateway, prompt=p, max_tokens=20)[0] for p in prompts]
    for request_id in ("same", "same/2"):  # "/" used to clash with the internal attempt ids
        with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
            runs = [pool.submit(generate, gateway, prompt=p, max_tokens=20, request_id=request_id) for p in prompts]
            results = [f.result() for f in runs]
        assert [tokens for tokens, _ in results] == solo
        assert all(echoed == request_id for _, echoed in results)  # the label is echoed back as sent


# ---- internal doors, with raw stubs -----------------------------------------------------------


@pytest.fixture(scope="module")
def decode(tiny_stack):
    channel = tiny_stack.channel("decode")
    yield decode_pb2_grpc.DecodeStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def prefill(tiny_stack):
    channel = tiny_stack.channel("prefill")
    yield prefill_pb2_grpc.PrefillStub(channel)
    channel.close()


@pytest.fixture(scope="module")
def vocab_size(tiny_model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_model_dir).vocab_size


def kv_stream(request_id, prompt_ids, first_token_id):
    """A complete, intact PushKV stream for prompt_ids (random K/V: only its shape matters here)."""
    k = torch.randn(LAYERS, KV_HEADS, len(prompt_ids), HEAD_DIM)
    chunks = list(codec.encode(request_id, 0, k, k.clone(), 1 << 20, 0))
    for c in chunks:
        c.num_prompt_tokens = len(prompt_ids)
    chunks.append(decode_pb2.KVChunk(
        request_id=request_id, seq_no=len(chunks), is_last=True, num_chunks=len(chunks),
        num_prompt_tokens=len(prompt_ids), first_token_id=first_token_id,
        prompt_digest=codec.prompt_digest(prompt_ids)))
    return chunks


def push_status(decode, chunks) -> grpc.StatusCode:
    try:
        decode.PushKV(iter(chunks), timeout=10)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def spec(request_id, prompt_ids, max_new_tokens=8, **sampling):
    return common_pb2.RequestSpec(request_id=request_id, prompt_token_ids=prompt_ids, max_new_tokens=max_new_tokens,
                                  sampling=common_pb2.SamplingParams(**sampling))


def status_of(call) -> grpc.StatusCode:
    try:
        result = call()
        if not isinstance(result, prefill_pb2.PrefillResponse):
            list(result)
    except grpc.RpcError as e:
        assert e.code() not in UNCLEAR, e.details()
        return e.code()
    return grpc.StatusCode.OK


def test_push_kv_checks_what_it_is_told_before_sizing_anything(decode, vocab_size, gateway):
    header = dict(request_id="hostile-1", seq_no=0, layer_start=0, layer_end=1, token_start=0, token_end=1)
    huge = decode_pb2.KVChunk(num_prompt_tokens=4_000_000_000, **header)
    assert push_status(decode, [huge]) == grpc.StatusCode.INVALID_ARGUMENT
    empty = decode_pb2.KVChunk(num_prompt_tokens=8, **(header | {"token_end": 0}))  # a zero-token chunk
    assert push_status(decode, [empty]) == grpc.StatusCode.INVALID_ARGUMENT
    prompt = [5, 6, 7, 8]
    assert push_status(decode, kv_stream("hostile-2", prompt, vocab_size + 3)) == grpc.StatusCode.INVALID_ARGUMENT
    assert push_status(decode, kv_stream("hostile-3", prompt, 1)) == grpc.StatusCode.OK
    assert push_status(decode, kv_stream("hostile-3", prompt, 1)) == grpc.StatusCode.ALREADY_EXISTS
    # KV held for one prompt is never decoded for another of the same length
    other = decode_pb2.DecodeRequest(spec=spec("hostile-3", [5, 6, 7, 9]))
    assert status_of(lambda: decode.Decode(other, timeout=10)) == grpc.StatusCode.INVALID_ARGUMENT
    assert generate(gateway, prompt="still serving", max_tokens=4)[0]


def test_internal_calls_check_sampling_ids_and_sizes(decode, prefill, tiny_stack, vocab_size, gateway):
    decode_address = tiny_stack.address("decode")
    cases = {
        "prefill NaN temperature": (lambda: prefill.Prefill(prefill_pb2.PrefillRequest(
            spec=spec("i-1", [1, 2, 3], temperature=math.nan), decode_address=decode_address), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT),
        "prefill subnormal temperature": (lambda: prefill.Prefill(prefill_pb2.PrefillRequest(
            spec=spec("i-2", [1, 2, 3], temperature=1e-39), decode_address=decode_address), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT),
        "prefill out-of-vocab prompt": (lambda: prefill.Prefill(prefill_pb2.PrefillRequest(
            spec=spec("i-3", [1, vocab_size + 7]), decode_address=decode_address), timeout=10),
            grpc.StatusCode.INVALID_ARGUMENT),
        "local NaN top_p": (lambda: decode.GenerateLocal(common_pb2.GenerateLocalRequest(
            spec=spec("i-4", [1, 2, 3], top_p=math.nan)), timeout=10), grpc.StatusCode.INVALID_ARGUMENT),
        "decode NaN temperature": (lambda: decode.Decode(decode_pb2.DecodeRequest(
            spec=spec("i-5", [1, 2, 3], temperature=math.nan)), timeout=10), grpc.StatusCode.INVALID_ARGUMENT),
        "beyond the context": (lambda: decode.GenerateLocal(common_pb2.GenerateLocalRequest(
            spec=spec("i-6", [1, 2, 3], max_new_tokens=1_000_000_000)), timeout=10), grpc.StatusCode.OUT_OF_RANGE),
        "decode past the context": (lambda: decode.Decode(decode_pb2.DecodeRequest(
            spec=spec("i-7", [1, 2, 3], max_new_tokens=2049)), timeout=10), grpc.StatusCode.OUT_OF_RANGE),
    }
    for name, (call, expected) in cases.items():
        assert status_of(call) == expected, name
    assert generate(gateway, prompt="still serving", max_tokens=4)[0]
