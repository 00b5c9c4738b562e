"""What goes into the request pipeline and what comes out, independent of any front end.

A front end (servicer.py for gRPC, http.py for the OpenAI-compatible HTTP API) turns its
request into a GenerateInput and says who sent it (a Caller), iterates the pipeline's events
(TextDelta ... TextDelta, then one Finished) and turns each into its own reply. `Request` is
the pipeline's record of an accepted request: everything needed to run it, or to resume it on
another service.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from edgellm.rpc.security import key_fingerprint


@dataclass(frozen=True)
class Caller:
    """Who sent a request, as the rate limits and per-key metrics see it: the API key when the
    gateway has keys, else the client's address."""

    id: str  # "key:<fingerprint>" or "addr:<host>": one budget each
    key_label: str  # metric label: the key's fingerprint, or "-" without keys (bounded label values)

    @classmethod
    def of(cls, api_key: str, address: str) -> "Caller":
        if api_key:
            fingerprint = key_fingerprint(api_key)
            return cls(f"key:{fingerprint}", fingerprint)
        return cls(f"addr:{address}", "-")


ANONYMOUS = Caller("addr:", "-")  # in-process callers (tests, benchmarks)


@dataclass(frozen=True)
class ChatMessage:
    role: str  # "system", "user" or "assistant"
    content: str


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.0  # 0 or 1 = off
    top_k: int = 0  # 0 = off


@dataclass(frozen=True)
class GenerateInput:
    """One generation request: exactly one of prompt (tokenized as is) or messages (through
    the model's chat template, with the generation prompt)."""

    prompt: str = ""
    messages: tuple[ChatMessage, ...] = ()
    sampling: Sampling = Sampling()
    max_tokens: int = 0  # 0 = the gateway's default
    stop: tuple[str, ...] = ()  # generation ends before the first match; the match is not returned
    seed: int | None = None  # None = a random seed
    request_id: str = ""  # the client's label, echoed back ("" = the pipeline makes one)


@dataclass(frozen=True)
class TextDelta:
    """Text that is now final, and the token ids it came from (text may be "" while a
    multi-byte character or a possible stop string is incomplete)."""

    request_id: str
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Timings:
    ttft_ms: float  # request received -> first token
    tpot_ms: float  # mean time per output token after the first


@dataclass(frozen=True)
class Finished:
    """The last event of a request that ended with text: "stop" (EOS or a stop string) or "length"."""

    request_id: str
    finish_reason: str
    usage: Usage
    timings: Timings


Event = TextDelta | Finished


@dataclass
class Request:
    """One accepted request as the gateway tracks it: enough to resume it elsewhere."""

    request_id: str  # the client's label (or one made here): echoed back and logged, never used upstream
    upstream_id: str  # uuid4 hex made here: internal ids are "<upstream_id>", then "<upstream_id>/<attempt>"
    prompt_token_ids: list[int]
    sampling: Sampling
    seed: int
    max_new_tokens: int
    deadline: float | None  # time.monotonic() value, or None
    generated: list[int] = field(default_factory=list)  # tokens already sent to the client
    decode_pool: str | None = None  # the service streaming its tokens, once past the prefill pool

    def timeout(self) -> float | None:
        """Seconds left before the deadline (None: no deadline)."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())
