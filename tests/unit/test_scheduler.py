"""The scheduler over plain integers: a real Scheduler and BlockManager with a few small KV
blocks, hand-made sequences and hand-made runner outputs fed through the loop's own
postprocess, and assertions on the next schedule(). No torch, no model."""

import itertools
import subprocess
import sys

from edgellm.engine.block_manager import BlockManager
from edgellm.engine.postprocess import RunnerOutput, TokenOutput, postprocess
from edgellm.engine.sampling_params import SamplingParams
from edgellm.engine.scheduler import Scheduler, SchedulerOutput
from edgellm.engine.sequence import Kind, Sequence, Status

BLOCK_SIZE = 4
EOS = 2
TOKEN = 7  # what the fake runner samples
_seq_ids = itertools.count()


def make_scheduler(num_blocks=32, max_batch_tokens=32, max_running=8, max_consecutive_prefills=4) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, BLOCK_SIZE), max_batch_tokens, max_running, max_consecutive_prefills)


def make_seq(num_prompt: int, kind=Kind.LOCAL, max_new=100, name="") -> Sequence:
    seq_id = next(_seq_ids)
    return Sequence(seq_id, name or f"r{seq_id}", kind, list(range(10, 10 + num_prompt)), num_prompt,
                    SamplingParams(), max_new)


def make_staged(num_prompt: int, max_new=100) -> Sequence:
    """A decode service's sequence: the prompt's KV arrived from prefill, with the first token."""
    seq = make_seq(num_prompt, Kind.FROM_KV, max_new)
    seq.token_ids.append(TOKEN)
    seq.num_generated = 1
    seq.has_staged_kv = True
    return seq


def run(sched: Scheduler, out: SchedulerOutput, token=TOKEN) -> list[TokenOutput]:
    """What the runner answers (a token for each prefill and each decode), then the loop's postprocess."""
    sampled = [token] * len(out.prefills or out.decodes)
    return postprocess(sched, out, RunnerOutput(sampled), frozenset({EOS}), max_context=1000)


def step(sched: Scheduler) -> SchedulerOutput:
    out = sched.schedule()
    run(sched, out)
    return out


def test_prefills_pack_up_to_max_batch_tokens_and_a_longer_prompt_runs_alone():
    sched = make_scheduler(max_batch_tokens=25)
    a, b, c = make_seq(10), make_seq(10), make_seq(10)
    for s in (a, b, c):
        sched.add(s)
    assert step(sched).prefills == [a, b]  # 20 tokens; c would make 30
    assert step(sched).prefills == [c]

    sched = make_scheduler(max_batch_tokens=25)
    long, short = make_seq(40), make_seq(5)
    sched.add(long)
    sched.add(short)
    assert step(sched).prefills == [long]  # over the budget, so alone
    assert step(sched).prefills == [short]


def test_a_decode_step_runs_after_max_consecutive_prefills():
    sched = make_scheduler(max_batch_tokens=8, max_consecutive_prefills=2)
    a, b, c, d = (make_seq(8) for _ in range(4))
    for s in (a, b, c, d):
        sched.add(s)
    kinds = []
    for _ in range(5):
        out = step(sched)
        kinds.append(("prefill", out.prefills) if out.prefills else ("decode", out.decodes))
    assert kinds == [
        ("prefill", [a]),
        ("prefill", [b]),
        ("decode", [a, b]),  # prompts still wait, but running sequences get their step
        ("prefill", [c]),
        ("prefill", [d]),
    ]
    assert step(sched).decodes == [a, b, c, d]


def test_prefills_while_nothing_runs_do_not_count_towards_the_decode_turn():
    """A prefill service runs prompt after prompt with nothing decoding (PREFILL_ONLY). When
    streams move to it after a decode failure, the first takeover's prefill must not be
    followed at once by a decode step that holds back the takeovers arriving just after it."""
    sched = make_scheduler(max_batch_tokens=8, max_consecutive_prefills=2)
    for _ in range(3):
        sched.add(make_seq(8, Kind.PREFILL_ONLY))
        assert len(step(sched).prefills) == 1
    first, second = make_seq(8, name="takeover-1"), make_seq(8, name="takeover-2")
    sched.add(first)
    assert step(sched).prefills == [first]
    sched.add(second)
    assert step(sched).prefills == [second]  # before `first`'s next decode step
    assert step(sched).decodes == [first, second]


def test_prefilled_sequences_join_the_decode_batch_and_finished_ones_free_their_blocks():
    sched = make_scheduler(num_blocks=8)
    a = make_seq(5, max_new=2)
    sched.add(a)
    out = sched.schedule()
    assert out.prefills == [a] and len(a.block_table) == 2  # room for the prompt and the next token
    assert [(o.seq, o.token_id, o.finish_reason) for o in run(sched, out)] == [(a, TOKEN, None)]
    assert sched.running == [a] and a.num_cached_tokens == 5
    out = sched.schedule()
    assert out.decodes == [a]
    assert [o.finish_reason for o in run(sched, out)] == ["length"]
    assert a.status is Status.FINISHED and sched.blocks.num_free_blocks == 8 and not sched.has_work


def test_eos_finishes_a_sequence():
    sched = make_scheduler(num_blocks=8)
    a = make_seq(3)
    sched.add(a)
    outputs = run(sched, sched.schedule(), token=EOS)
    assert [o.finish_reason for o in outputs] == ["stop"]
    assert a.status is Status.FINISHED and sched.blocks.num_free_blocks == 8


def test_prefill_only_sequences_keep_no_blocks_and_leave_after_their_first_token():
    sched = make_scheduler(num_blocks=4)
    p = make_seq(30, kind=Kind.PREFILL_ONLY)  # more tokens than the cache holds: its KV goes out
    sched.add(p)
    out = sched.schedule()
    assert out.prefills == [p] and p.block_table == []
    assert [o.token_id for o in run(sched, out)] == [TOKEN]
    assert p.status is Status.FINISHED and not sched.has_work and sched.blocks.num_free_blocks == 4


def test_staged_sequences_are_admitted_without_a_forward_pass():
    sched = make_scheduler(num_blocks=8)
    s = make_staged(8)  # its staged KV fills two blocks exactly
    sched.add(s)
    out = sched.schedule()
    assert out.admitted_from_kv == [s] and out.prefills == [] and out.decodes == [s]
    # two blocks for the staged KV, a third for the token this decode step writes at position 8
    assert len(s.block_table) == 3 and s.num_cached_tokens == 8
    run(sched, out)
    assert not s.has_staged_kv and s.num_cached_tokens == 9 and s.num_generated == 2


def test_staged_sequences_wait_for_a_running_slot_and_for_blocks():
    sched = make_scheduler(num_blocks=32, max_running=1)
    a = make_seq(3, max_new=2)
    sched.add(a)
    step(sched)  # a runs: the one slot is taken
    s = make_staged(8)
    sched.add(s)
    out = sched.schedule()
    assert out.admitted_from_kv == [] and out.decodes == [a] and list(sched.waiting) == [s]
    run(sched, out)  # a's last token: the slot comes free
    assert sched.schedule().admitted_from_kv == [s]

    sched = make_scheduler(num_blocks=3)
    b = make_seq(3)
    sched.add(b)
    step(sched)  # b holds one block
    s = make_staged(8)  # needs three: two for the KV and one for the next token
    sched.add(s)
    out = sched.schedule()
    assert out.admitted_from_kv == [] and out.decodes == [b] and list(sched.waiting) == [s]


def test_the_newest_running_sequence_is_preempted_requeued_first_and_recomputed():
    sched = make_scheduler(num_blocks=4)
    a, b = make_seq(7, max_new=3), make_seq(7, max_new=10)
    sched.add(a)
    sched.add(b)
    assert step(sched).prefills == [a, b]  # two blocks each: the cache is full
    assert step(sched).decodes == [a, b]  # position 7 still fits each one's second block
    c = make_seq(3)
    sched.add(c)  # arrives now and waits for blocks
    out = sched.schedule()  # a needs a block for position 8: b, the newest, gives its blocks back
    assert out.prefills == [] and out.preempted == [b] and out.decodes == [a]
    assert b.status is Status.WAITING and b.block_table == [] and b.num_cached_tokens == 0
    assert list(sched.waiting) == [b, c]  # at the front, ahead of a later arrival
    assert [o.finish_reason for o in run(sched, out)] == ["length"]  # a is done: its 3 blocks are back

    out = sched.schedule()
    assert out.prefills == [b, c]
    outputs = run(sched, out)
    # the recompute runs prompt + both generated tokens and samples the third, as a prefill does
    assert [o.seq for o in outputs] == [b, c]
    assert b.status is Status.RUNNING and b.num_cached_tokens == 9 and b.num_generated == 3
    out = sched.schedule()
    assert out.decodes == [b, c]
    run(sched, out)
    assert b.num_generated == 4 and b.num_cached_tokens == 10


def test_cancelled_sequences_free_their_blocks_and_are_reported():
    sched = make_scheduler(num_blocks=8)
    a, b = make_seq(5), make_seq(5)
    sched.add(a)
    step(sched)
    sched.add(b)
    assert sched.blocks.num_free_blocks < 8
    a.cancelled = b.cancelled = True  # one running, one waiting
    out = sched.schedule()
    assert out.is_empty and sorted(out.finished_seq_ids) == sorted([a.seq_id, b.seq_id])
    assert sched.blocks.num_free_blocks == 8 and not sched.has_work
    assert a.status is Status.FINISHED and b.status is Status.FINISHED


def test_max_running_caps_the_decode_batch():
    sched = make_scheduler(max_running=2)
    a, b, c = make_seq(3), make_seq(3), make_seq(3)
    for s in (a, b, c):
        sched.add(s)
    assert step(sched).prefills == [a, b]  # c would be a third running sequence
    out = step(sched)
    assert out.prefills == [] and out.decodes == [a, b] and list(sched.waiting) == [c]
    a.cancelled = True
    assert step(sched).prefills == [c]  # a slot came free


def test_bookkeeping_imports_no_torch():
    code = ("import sys, edgellm.engine.scheduler, edgellm.engine.block_manager, edgellm.engine.sequence, "
            "edgellm.engine.postprocess, edgellm.engine.info; assert 'torch' not in sys.modules, 'torch imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_a_takeover_is_prefilled_before_new_prompts_that_arrived_first():
    """A stream that moved here mid-answer (num_generated > 0) has a client waiting: it goes
    ahead of new prompts in the next prefill batch, even when they came first."""
    sched = make_scheduler(max_batch_tokens=25)
    new_a, new_b = make_seq(10, name="new-a"), make_seq(10, name="new-b")
    takeover = make_seq(12, name="takeover")
    takeover.token_ids += [TOKEN] * 3
    takeover.num_generated = 3
    for s in (new_a, new_b, takeover):
        sched.add(s)
    out = step(sched)
    assert [s.request_id for s in out.prefills] == ["takeover", "new-a"]  # 15 + 10 tokens fit, new-b waits
    assert [s.request_id for s in step(sched).prefills] == ["new-b"]


def test_takeovers_with_kept_prefix_kv_count_only_the_tokens_they_compute():
    """Streams taken over together after a failure share one packed pass: their kept prompt
    K/V (num_prefix_tokens) is copied in, so only the tokens after it count against the budget."""
    sched = make_scheduler(max_batch_tokens=20)
    takeovers = [make_seq(30, name=f"takeover-{i}") for i in range(3)]
    for seq in takeovers:
        seq.token_ids += [TOKEN] * 2
        seq.num_generated = 2
        seq.num_prefix_tokens = 26  # 6 of its 32 tokens to compute
        sched.add(seq)
    out = step(sched)
    assert out.prefills == takeovers  # 3 x 6 tokens computed fit in 20, though they hold 96
    assert all(s.num_generated == 3 and s.num_cached_tokens == 32 for s in takeovers)  # sampled in the pass
