"""The third call of an engine step (schedule -> run -> postprocess), plain Python over ints.

The runner answers a SchedulerOutput with a RunnerOutput: the token sampled for each
sequence it ran. postprocess records what that forward pass did to the bookkeeping (KV now
cached; staged or kept-prefix K/V consumed), appends each sampled token, decides whether the
sequence is done (EOS, max_new_tokens, end of context) and moves sequences between the
scheduler's queues: a prefilled LOCAL sequence (or a recompute) joins the decode batch, a
PREFILL_ONLY one and every finished one leave. It returns the tokens to hand out; the loop
delivers them and drops what it and the runner keep for sequences that finished.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgellm.engine.scheduler import Scheduler, SchedulerOutput
from edgellm.engine.sequence import Kind, Sequence, Status

FINISH_STOP, FINISH_LENGTH, FINISH_ERROR = "stop", "length", "error"


@dataclass(frozen=True)
class RunnerOutput:
    """What one forward pass produced, as integers."""

    # One per out.prefills, else one per out.decodes (None where that sequence's sampling failed)
    sampled_token_ids: list[int | None]
    forward_start_unix_ns: int = 0
    forward_end_unix_ns: int = 0
    # seq_id -> why its sampling failed: that sequence ends with an error, the others go on
    failed: dict[int, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenOutput:
    seq: Sequence
    token_id: int | None  # None: the sequence failed (seq.error says why)
    finish_reason: str | None  # set on the sequence's last token; FINISH_ERROR when it failed


def finish_reason(seq: Sequence, token_id: int, eos_token_ids: frozenset[int], max_context: int) -> str | None:
    """Why seq stops after token_id (already appended), or None if it goes on."""
    if token_id in eos_token_ids:
        return FINISH_STOP
    if seq.num_generated >= seq.max_new_tokens or seq.num_tokens >= max_context:
        return FINISH_LENGTH
    return None


def postprocess(
    scheduler: Scheduler, out: SchedulerOutput, result: RunnerOutput, eos_token_ids: frozenset[int], max_context: int
) -> list[TokenOutput]:
    """Apply a forward pass's result to out's sequences; return the sampled tokens in order."""
    for seq in out.admitted_from_kv:
        if seq.status is Status.RUNNING:  # the runner copied its staged KV in (not preempted again)
            seq.has_staged_kv = False
    outputs: list[TokenOutput] = []

    def append(seq: Sequence, token_id: int) -> None:
        seq.token_ids.append(token_id)
        seq.num_generated += 1
        finish = finish_reason(seq, token_id, eos_token_ids, max_context)
        outputs.append(TokenOutput(seq, token_id, finish))
        if finish is not None and seq.kind is not Kind.PREFILL_ONLY:
            scheduler.finish(seq)

    def fail(seq: Sequence) -> None:
        seq.error = result.failed[seq.seq_id]
        outputs.append(TokenOutput(seq, None, FINISH_ERROR))
        scheduler.finish(seq)

    if out.prefills:
        for seq, token_id in zip(out.prefills, result.sampled_token_ids, strict=True):
            if seq.seq_id in result.failed:
                fail(seq)
                continue
            seq.forward_start_unix_ns = result.forward_start_unix_ns
            seq.forward_end_unix_ns = result.forward_end_unix_ns
            seq.num_prefix_tokens = 0  # used up: a later recompute runs every token
            seq.num_cached_tokens = seq.num_tokens if seq.kind is not Kind.PREFILL_ONLY else 0
            append(seq, token_id)
            if seq.kind is Kind.PREFILL_ONLY:
                scheduler.finish(seq)  # its KV went out through the layer hook; nothing stays here
            elif seq.status is not Status.FINISHED:
                scheduler.start_running(seq)
    elif out.decodes:
        for seq, token_id in zip(out.decodes, result.sampled_token_ids, strict=True):
            seq.num_cached_tokens += 1
            if seq.seq_id in result.failed:
                fail(seq)
                continue
            assert token_id is not None, "a decode step samples every sequence"
            append(seq, token_id)
    return outputs
