"""OpenAI's chat and completion bodies <-> the pipeline's GenerateInput and events; no transport.

`parse_chat` and `parse_completion` check a request body field by field and return an
OpenAIRequest (the GenerateInput plus how to answer: stream or not, usage in the stream),
or raise FieldError naming the field. What is accepted:
  model, messages / prompt, max_tokens and max_completion_tokens, temperature, top_p, seed,
  stop, stream, stream_options.include_usage, user (and top_k, as vLLM does); n must be 1.
  A field we do not implement is refused, unless its value is null or the value at which it
  asks for nothing (NEUTRAL: presence_penalty 0, logprobs false, ...), which many clients send.
Omitted sampling values take OpenAI's defaults (temperature 1, top_p 1), not the gRPC API's
(greedy): the same body means the same thing here as at OpenAI.

`Reply` builds the response objects of one request: chunks of a stream, the usage chunk,
or the whole non-streamed object, with `usage` and `finish_reason` ("stop", "length") as
OpenAI defines them.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from services.gateway.errors import InvalidRequest
from services.gateway.request import ChatMessage, GenerateInput, Sampling, Usage

COMMON_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                           "stream_options", "user", "n"})
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt"}
# Fields we do not implement, accepted at the value that asks for nothing.
NEUTRAL: dict[str, Any] = {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": False, "echo": False,
                           "best_of": 1, "logit_bias": {}, "tools": [], "suffix": ""}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MESSAGE_FIELDS = frozenset({"role", "content", "name"})


class FieldError(InvalidRequest):
    """A body field the gateway cannot take; `param` names it (OpenAI's error.param)."""

    def __init__(self, param: str | None, message: str) -> None:
        super().__init__(message)
        self.param = param


class ModelNotFound(InvalidRequest):
    """A `model` this gateway does not serve (HTTP 404, as at OpenAI)."""

    def __init__(self, model: Any) -> None:
        super().__init__(f"the model {model!r} does not exist here: see GET /v1/models")
        self.param = "model"


@dataclass(frozen=True)
class OpenAIRequest:
    kind: str  # "chat" or "completion"
    inp: GenerateInput
    stream: bool
    include_usage: bool  # a last chunk with usage (stream_options.include_usage)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise FieldError(name, f"{name} must be a finite number")
    return float(v)


def _int(body: dict, name: str, minimum: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or v < minimum:
        raise FieldError(name, f"{name} must be an integer >= {minimum}")
    return v


def _check_fields(body: Any, allowed: frozenset[str]) -> dict:
    if not isinstance(body, dict):
        raise FieldError(None, "the request body must be a JSON object")
    unsupported = sorted(k for k, v in body.items()
                         if k not in allowed and v is not None and (k not in NEUTRAL or v != NEUTRAL[k]))
    if unsupported:
        raise FieldError(unsupported[0], f"unsupported field(s): {', '.join(unsupported)}")
    return body


def _common(body: dict, model: str, max_tokens: int | None, **text: Any) -> tuple[GenerateInput, bool, bool]:
    """The GenerateInput, stream and include_usage of a body; `text`: prompt= or messages=."""
    requested = body.get("model")
    if requested is not None and requested != model:
        raise ModelNotFound(requested)
    n = _int(body, "n", 1)
    if n is not None and n != 1:
        raise FieldError("n", "n > 1 is not supported: send one request per completion")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise FieldError("stop", "stop must be a string or a list of strings")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise FieldError("stream", "stream must be true or false")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise FieldError("stream_options", "stream_options takes only include_usage (true/false), with stream true")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise FieldError("user", "user must be a string")
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise FieldError("seed", "seed must be an integer")
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= 2:
        raise FieldError("temperature", "temperature must be between 0 and 2")
    inp = GenerateInput(
        sampling=Sampling(temperature=temperature, top_p=_number(body, "top_p", 1.0),
                          top_k=_int(body, "top_k", 0) or 0),
        max_tokens=max_tokens or 0,
        stop=tuple(stop or ()),
        seed=seed,
        **text,
    )
    return inp, stream, bool(options and options.get("include_usage"))


def _content(i: int, content: Any) -> str:
    """A message's content: a string, or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise FieldError(f"messages[{i}].content", "message content must be a string or a list of text parts")


def parse_chat(body: Any, model: str) -> OpenAIRequest:
    body = _check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise FieldError("messages", "messages must be a non-empty list")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise FieldError(f"messages[{i}]", "each message must be an object with role and content")
        extra = sorted(set(m) - MESSAGE_FIELDS)
        if extra:
            raise FieldError(f"messages[{i}].{extra[0]}", f"unsupported message field(s): {', '.join(extra)}")
        role = m.get("role")
        if role not in ROLES:
            raise FieldError(f"messages[{i}].role", f"role must be one of {', '.join(ROLES)}")
        parsed.append(ChatMessage(ROLES[role], _content(i, m.get("content"))))
    max_tokens = _int(body, "max_completion_tokens", 1) or _int(body, "max_tokens", 1)
    inp, stream, include_usage = _common(body, model, max_tokens, messages=tuple(parsed))
    return OpenAIRequest("chat", inp, stream, include_usage)


def parse_completion(body: Any, model: str) -> OpenAIRequest:
    body = _check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise FieldError("prompt", "prompt must be a non-empty string (one prompt per request)")
    max_tokens = _int(body, "max_tokens", 1) or 16  # OpenAI's completions default
    inp, stream, include_usage = _common(body, model, max_tokens, prompt=prompt)
    return OpenAIRequest("completion", inp, stream, include_usage)


def usage_json(usage: Usage) -> dict[str, int]:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens}


class Reply:
    """The response objects of one request (created when its first event arrives)."""

    def __init__(self, kind: str, request_id: str, model: str) -> None:
        self.kind, self.model = kind, model
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.created = int(time.time())

    def _envelope(self, object_: str, choices: list[dict]) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model, "choices": choices}

    def chunk(self, text: str, finish_reason: str | None = None, first: bool = False) -> dict[str, Any]:
        """One streamed chunk: text (chat: the first also carries the assistant role)."""
        if self.kind == "chat":
            delta: dict[str, str] = {"role": "assistant", "content": text} if first else {"content": text}
            if finish_reason is not None and not text:
                delta = {}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, usage: Usage) -> dict[str, Any]:
        """The last chunk with stream_options.include_usage: no choices, the request's usage."""
        body = self._envelope("chat.completion.chunk" if self.kind == "chat" else "text_completion", [])
        body["usage"] = usage_json(usage)
        return body

    def whole(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        """The non-streamed response."""
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
            body = self._envelope("chat.completion", [choice])
        else:
            body = self._envelope("text_completion", [{"index": 0, "text": text, "logprobs": None,
                                                       "finish_reason": finish_reason}])
        body["usage"] = usage_json(usage)
        return body
