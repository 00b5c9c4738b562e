"""Which sequences run in the next forward pass: plain bookkeeping over Sequences and blocks.

One step is either
  a prefill batch: waiting sequences that need a forward pass over whole prompts, packed up
      to max_batch_tokens (prefill first, for time to first token; takeovers of streams that
      moved here after a failure before new prompts), or
  a decode step: every running sequence advances one token.
After max_consecutive_prefills prefill batches in a row, a decode step runs even if more
prompts wait, so running sequences never starve. Sequences whose prompt KV arrived from a
prefill service (staged) join as soon as their blocks can be allocated, without a forward.
When a running sequence needs a block and none is free, the newest running sequence is
preempted by recompute: its blocks are freed and it waits again, at the front.
A cancelled sequence leaves at the next schedule; its id is reported in the output so the
runner and the loop drop what they keep for it.
"""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass, field

from edgellm.engine.block_manager import BlockManager
from edgellm.engine.sequence import Kind, Sequence, Status


@dataclass
class SchedulerOutput:
    prefills: list[Sequence] = field(default_factory=list)  # run as one packed prefill batch
    decodes: list[Sequence] = field(default_factory=list)  # or advance these by one token
    admitted_from_kv: list[Sequence] = field(default_factory=list)  # staged KV to copy into blocks
    preempted: list[Sequence] = field(default_factory=list)
    finished_seq_ids: list[int] = field(default_factory=list)  # cancelled, dropped by this schedule

    @property
    def is_empty(self) -> bool:
        return not (self.prefills or self.decodes or self.admitted_from_kv)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_batch_tokens: int, max_running: int, max_consecutive_prefills: int):
        self.blocks = blocks
        self.max_batch_tokens = max_batch_tokens
        self.max_running = max_running
        self.max_consecutive_prefills = max_consecutive_prefills
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._consecutive_prefills = 0
        self._arrivals = itertools.count()

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.arrival = next(self._arrivals)
        self.waiting.append(seq)

    def finish(self, seq: Sequence) -> None:
        """A sequence is done (finished, cancelled or failed): give its blocks back at once."""
        seq.status = Status.FINISHED
        self.blocks.free(seq.block_table)
        if seq in self.running:
            self.running.remove(seq)

    def start_running(self, seq: Sequence) -> None:
        """A prefilled (or recomputed) sequence joins the decode batch."""
        seq.status = Status.RUNNING
        self.running.append(seq)

    def drop_cancelled(self) -> list[int]:
        """Finish every cancelled sequence; return their seq ids."""
        dropped = [s for s in self.waiting if s.cancelled] + [s for s in self.running if s.cancelled]
        for seq in dropped:
            if seq in self.waiting:
                self.waiting.remove(seq)
            self.finish(seq)
        return [seq.seq_id for seq in dropped]

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_seq_ids=self.drop_cancelled())
        self._admit_staged(out)
        if not self.running:  # the count is of prefills that kept running sequences waiting
            self._consecutive_prefills = 0
        if not (self.running and self._consecutive_prefills >= self.max_consecutive_prefills):
            self._schedule_prefills(out)
        if out.prefills:
            self._consecutive_prefills += 1
            return out
        self._consecutive_prefills = 0
        self._schedule_decodes(out)
        return out

    def _admit_staged(self, out: SchedulerOutput) -> None:
        for seq in [s for s in self.waiting if s.has_staged_kv]:
            # +1: room for the token the next decode step feeds
            if len(self.running) >= self.max_running or not self.blocks.can_allocate(seq.num_staged_tokens + 1):
                break
            self.waiting.remove(seq)
            seq.block_table = self.blocks.allocate(seq.num_staged_tokens)
            # The runner copies the staged KV in before this step's decode, which then writes
            # position num_staged_tokens: count those tokens now, so _schedule_decodes adds a
            # block when the staged KV fills its last one exactly.
            seq.num_cached_tokens = seq.num_staged_tokens
            seq.status = Status.RUNNING
            self.running.append(seq)
            out.admitted_from_kv.append(seq)

    def _schedule_prefills(self, out: SchedulerOutput) -> None:
        num_tokens = 0
        # Takeovers first (a request that already streamed tokens and moved here after a failure:
        # its client is waiting mid-answer), then new prompts; each in arrival order.
        for seq in sorted((s for s in self.waiting if s.needs_prefill), key=lambda s: s.num_generated == 0):
            n = seq.num_tokens
            num_computed = n - seq.num_prefix_tokens  # a takeover's kept prefix K/V is copied, not computed
            if out.prefills and num_tokens + num_computed > self.max_batch_tokens:
                break  # a prompt longer than the budget still runs, alone
            if seq.kind is not Kind.PREFILL_ONLY:
                joining = sum(1 for s in out.prefills if s.kind is not Kind.PREFILL_ONLY)
                if len(self.running) + joining >= self.max_running or not self.blocks.can_allocate(n + 1):
                    break  # keep arrival order: later prompts wait behind this one
                seq.block_table = self.blocks.allocate(n)
            self.waiting.remove(seq)
            out.prefills.append(seq)
            num_tokens += num_computed

    def _schedule_decodes(self, out: SchedulerOutput) -> None:
        for seq in sorted(self.running, key=lambda s: s.arrival):
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            while not self.blocks.can_append(seq.block_table, seq.num_cached_tokens):
                victim = max((s for s in self.running if s.status is Status.RUNNING), key=lambda s: s.arrival)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.append(seq.block_table, seq.num_cached_tokens)
                out.decodes.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        seq.num_cached_tokens = 0
        seq.status = Status.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
