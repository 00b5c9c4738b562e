"""OpenAI bodies -> GenerateInput, and the response objects (services/gateway/openai_format.py)."""

from __future__ import annotations

import pytest

from services.gateway.openai_format import FieldError, ModelNotFound, Reply, parse_chat, parse_completion
from services.gateway.request import ChatMessage, Usage

MODEL = "SmolLM2-135M-Instruct"


def chat(**fields):
    return parse_chat({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], **fields}, MODEL)


def test_chat_fields_map_to_the_pipeline_input():
    parsed = chat(max_completion_tokens=7, temperature=0, top_p=0.5, seed=3, stop="\n", stream=True,
                  stream_options={"include_usage": True}, user="u-1")
    inp = parsed.inp
    assert (parsed.kind, parsed.stream, parsed.include_usage) == ("chat", True, True)
    assert inp.messages == (ChatMessage("user", "Hi"),)
    assert (inp.max_tokens, inp.sampling.temperature, inp.sampling.top_p) == (7, 0.0, 0.5)
    assert (inp.seed, inp.stop) == (3, ("\n",))


def test_openai_defaults_not_greedy():
    inp = chat().inp
    assert (inp.sampling.temperature, inp.sampling.top_p, inp.max_tokens) == (1.0, 1.0, 0)
    assert parse_completion({"prompt": "x"}, MODEL).inp.max_tokens == 16  # OpenAI's completions default


def test_text_parts_and_the_developer_role():
    parsed = parse_chat({"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                         {"type": "text", "text": "b"}]}]}, MODEL)
    assert parsed.inp.messages == (ChatMessage("system", "ab"),)


@pytest.mark.parametrize("fields, param", [
    ({"n": 2}, "n"),
    ({"logit_bias": {"1": 2}}, "logit_bias"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"stop": [1]}, "stop"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"seed": 1.5}, "seed"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
])
def test_unsupported_or_bad_fields_are_named(fields, param):
    with pytest.raises(FieldError) as e:
        chat(**fields)
    assert e.value.param == param
    assert param.rsplit(".", 1)[-1].split("[")[0] in e.value.message


def test_neutral_values_of_unsupported_fields_pass():
    chat(n=1, presence_penalty=0, frequency_penalty=0, logprobs=False, logit_bias={}, tools=[], stop=None)


def test_a_model_we_do_not_serve():
    with pytest.raises(ModelNotFound):
        parse_chat({"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}, MODEL)


@pytest.mark.parametrize("prompt", ["", ["a", "b"], [1, 2, 3], None])
def test_one_string_prompt(prompt):
    with pytest.raises(FieldError) as e:
        parse_completion({"prompt": prompt}, MODEL)
    assert e.value.param == "prompt"


def test_body_must_be_an_object():
    with pytest.raises(FieldError):
        parse_chat(["not", "an", "object"], MODEL)


def test_reply_objects():
    usage = Usage(5, 2)
    reply = Reply("chat", "r1", MODEL)
    first = reply.chunk("He", first=True)
    assert first["id"] == "chatcmpl-r1" and first["object"] == "chat.completion.chunk"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "He"}
    last = reply.chunk("", "stop")
    assert last["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    assert reply.usage_chunk(usage)["choices"] == []
    assert reply.usage_chunk(usage)["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    whole = reply.whole("Hello", "length", usage)
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Hello"}
    assert whole["choices"][0]["finish_reason"] == "length" and whole["usage"]["total_tokens"] == 7
    text = Reply("completion", "r2", MODEL).whole("x", "stop", usage)
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "x"
