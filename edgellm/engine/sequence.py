"""One request inside an engine: its tokens, its KV blocks and where its output goes.

Kinds of work, all scheduled the same way:
  PREFILL_ONLY  prefill service, normal mode: run the prompt, stream its KV out, sample the
                first token, done (its KV is not kept here).
  LOCAL         degraded / colocated mode: prefill here, then decode here.
  FROM_KV       decode service: the prompt's KV arrived from prefill (staged), decode here.
A running sequence preempted for lack of blocks loses its KV and is re-queued; it then
needs a recompute prefill of prompt + generated tokens before decoding resumes.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Callable

import torch

from edgellm.engine.model import LayerKVHook
from edgellm.engine.sampling import SamplingParams


class Kind(enum.Enum):
    PREFILL_ONLY = "prefill_only"
    LOCAL = "local"
    FROM_KV = "from_kv"


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# (token, finish_reason) for each sampled token; (None, "error") if the engine failed.
Emit = Callable[[int | None, str | None], None]


@dataclass
class Sequence:
    request_id: str
    kind: Kind
    token_ids: list[int]  # prompt (+ tokens generated so far)
    num_prompt_tokens: int
    sampling: SamplingParams
    max_new_tokens: int  # counting every generated token, those before a resume included
    emit: Emit
    num_generated: int = 0  # generated tokens so far (they are the tail of token_ids)
    on_layer_kv: LayerKVHook | None = None  # PREFILL_ONLY: where this prompt's K/V goes
    staged_kv: tuple[torch.Tensor, torch.Tensor] | None = None  # FROM_KV: [L, Hkv, T, D] each
    # LOCAL: K/V of the first tokens, kept from an earlier prefill ([L, Hkv, C, D] each): the
    # prefill copies it into the cache and computes only the tokens after it
    prefix_kv: tuple[torch.Tensor, torch.Tensor] | None = None
    block_table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0  # tokens whose K/V is in the paged cache
    status: Status = Status.WAITING
    cancelled: bool = False
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
        return self.status is Status.WAITING and self.staged_kv is None

    @property
    def prefill_token_ids(self) -> list[int]:
        # After a preemption the last sampled token has no KV yet and is fed by the next decode step.
        # A PREFILL_ONLY takeover (num_generated > 0) runs every token: its KV goes to decode whole.
        return self.token_ids if self.samples_after_prefill else self.token_ids[:-1]

    @property
    def samples_after_prefill(self) -> bool:
        """Whether the prefill forward pass samples a token (False: a recompute, its next input is known)."""
        return self.num_generated == 0 or self.kind is Kind.PREFILL_ONLY

    @property
    def num_staged_tokens(self) -> int:
        # Staged KV covers every token but the last, which the prefill service sampled.
        return self.num_tokens - 1
