"""One request inside an engine: its tokens and its KV blocks, as plain integers.

Kinds of work, all scheduled the same way:
  PREFILL_ONLY  prefill service, normal mode: run the prompt, stream its KV out, sample the
                first token, done (its KV is not kept here).
  LOCAL         degraded / colocated mode: prefill here, then decode here.
  FROM_KV       decode service: the prompt's KV arrived from prefill (staged), decode here.
A running sequence preempted for lack of blocks loses its KV and is re-queued; it then
needs a recompute prefill of prompt + generated tokens, which samples its next token as a
first prefill does (so does a takeover: its tokens so far arrive as its prompt).

A Sequence holds no tensors and no callbacks: the runner keeps its staged or kept-prefix
K/V and its layer-KV hook, the loop its output callback, both keyed by seq_id (unique in
one engine; request ids come from clients and may repeat). Here only flags and counts say
that they exist.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from edgellm.engine.sampling_params import SamplingParams


class Kind(enum.Enum):
    PREFILL_ONLY = "prefill_only"
    LOCAL = "local"
    FROM_KV = "from_kv"


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: the scheduler's queues look sequences up with `in` and remove()
class Sequence:
    seq_id: int
    request_id: str
    kind: Kind
    token_ids: list[int]  # prompt (+ tokens generated so far)
    num_prompt_tokens: int
    sampling: SamplingParams
    max_new_tokens: int  # counting every generated token, those before a resume included
    num_generated: int = 0  # generated tokens so far (they are the tail of token_ids)
    # FROM_KV: the runner holds this prompt's K/V (every token but the last) until it is copied
    # into the sequence's blocks on admission
    has_staged_kv: bool = False
    # LOCAL: the runner holds the K/V of the first tokens, kept from an earlier prefill; the
    # prefill copies it into the cache and computes only the tokens after it (once: a later
    # recompute runs every token)
    num_prefix_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # tokens whose K/V is in the paged cache
    status: Status = Status.WAITING
    cancelled: bool = False
    error: str | None = None  # why this sequence alone failed (its sampling), set before it finishes
    arrival: int = 0  # admission order; the newest running sequence is preempted first
    forward_start_unix_ns: int = 0
    forward_end_unix_ns: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def needs_prefill(self) -> bool:
        """Waiting for a forward pass over its tokens (a first prefill or a recompute)."""
        return self.status is Status.WAITING and not self.has_staged_kv

    @property
    def is_takeover(self) -> bool:
        """Resumes a stream begun elsewhere (its path failed): a forward pass over prompt + the
        tokens already streamed samples its next one. (A FROM_KV sequence arrives with its K/V.)"""
        return self.num_generated > 0 and self.kind is not Kind.FROM_KV

    @property
    def num_staged_tokens(self) -> int:
        # Staged KV covers every token but the last, which the prefill service sampled.
        return self.num_tokens - 1
