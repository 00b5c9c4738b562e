"""The engine on the tiny model: continuous batching, paged KV, preemption, cancellation."""

import asyncio

import pytest
import torch

from edgellm.engine.info import EngineLimits
from edgellm.engine.loop import EngineLoop
from edgellm.engine.sampling import SamplingParams
from edgellm.engine.sequence import Kind
from edgellm.engine.weights import load_model

GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return load_model(tiny_model_dir, "fp32")


def make_engine(tiny, num_blocks=256, block_size=4, **limits) -> EngineLoop:
    return EngineLoop(tiny.model, frozenset(), EngineLimits(num_blocks=num_blocks, block_size=block_size, **limits))


def prompts(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 1000, (int(torch.randint(3, 30, (1,), generator=g)),), generator=g).tolist() for _ in range(n)]


def submit_local(engine, request_id, prompt, max_new, out):
    engine.submit(engine.new_sequence(request_id, Kind.LOCAL, prompt, GREEDY, max_new),
                  lambda token, finish: out.append((token, finish)))


def assert_nothing_held(engine):
    """Every block back, and no tensors, hooks or callbacks left behind for finished sequences."""
    assert engine.stats().num_free_kv_blocks == engine.info.num_kv_blocks
    assert engine.runner.held_seq_ids == set()
    assert engine._emits == {}


async def collect(engine, prompt, max_new, sampling=GREEDY):
    return [t async for t, _ in engine.generate("r", prompt, sampling, max_new)]


def run_engine(engine, coro_factory):
    engine.start()
    try:
        return asyncio.run(coro_factory())
    finally:
        engine.stop()


def test_sequences_join_and_leave_the_running_batch_between_steps(tiny):
    engine = make_engine(tiny)
    out_a, out_b = [], []
    submit_local(engine, "a", [1, 2, 3, 4, 5], 3, out_a)
    assert [s.request_id for s in engine.step().prefills] == ["a"]  # a prefills (first token)
    assert [s.request_id for s in engine.step().decodes] == ["a"]
    submit_local(engine, "b", [6, 7, 8], 5, out_b)  # b arrives while a is decoding
    assert [s.request_id for s in engine.step().prefills] == ["b"]  # prefill first
    assert [s.request_id for s in engine.step().decodes] == ["a", "b"]  # b joined; a's 3rd token ends it
    assert out_a[-1][1] == "length" and len(out_a) == 3
    assert [s.request_id for s in engine.step().decodes] == ["b"]  # a left between steps
    while engine.has_work:
        engine.step()
    assert len(out_b) == 5 and out_b[-1][1] == "length"
    assert_nothing_held(engine)


def test_batched_greedy_equals_one_at_a_time(tiny):
    engine = make_engine(tiny)
    ps = prompts(16)

    async def scenario():
        alone = [await collect(engine, p, 24) for p in ps]
        together = await asyncio.gather(*(collect(engine, p, 24) for p in ps))
        return alone, together

    alone, together = run_engine(engine, scenario)
    assert together == alone
    assert len(set(map(tuple, alone))) > 8  # the prompts really lead to different outputs
    assert engine.stats().max_decode_batch >= 8  # and they really were decoded in one batch


def test_preempted_requests_finish_with_the_unpreempted_output(tiny):
    ps = prompts(6, seed=1)

    async def everything(engine):
        return await asyncio.gather(*(collect(engine, p, 40) for p in ps))

    roomy = make_engine(tiny, num_blocks=256)
    expected = run_engine(roomy, lambda: everything(roomy))
    assert roomy.stats().num_preemptions == 0
    # 6 sequences of up to ~70 tokens need ~105 blocks of 4; 40 blocks force preemptions.
    tight = make_engine(tiny, num_blocks=40)
    got = run_engine(tight, lambda: everything(tight))
    assert tight.stats().num_preemptions > 0
    assert got == expected
    assert_nothing_held(tight)


def test_cancelled_stream_frees_its_blocks(tiny):
    engine = make_engine(tiny)
    free_at_start = engine.stats().num_free_kv_blocks

    async def scenario():
        stream = engine.generate("c", prompts(1)[0], GREEDY, 500)
        got = [await anext(stream) for _ in range(3)]
        held = engine.stats().num_free_kv_blocks
        await stream.aclose()  # the client went away
        for _ in range(100):
            if engine.stats().num_free_kv_blocks == free_at_start:
                break
            await asyncio.sleep(0.01)
        return got, held

    got, held = run_engine(engine, scenario)
    assert len(got) == 3 and held < free_at_start
    assert engine.stats().num_running == 0
    assert_nothing_held(engine)


def test_request_larger_than_the_cache_is_refused(tiny):
    from edgellm.engine.errors import NeverFits

    engine = make_engine(tiny, num_blocks=4)
    with pytest.raises(NeverFits, match="KV blocks"):
        run_engine(engine, lambda: collect(engine, [1] * 10, 20))


@pytest.mark.parametrize("prompt_len", [4, 7, 8, 16])  # block size 4: full last blocks, and one not
def test_decoding_from_staged_kv_equals_local_generation(tiny, prompt_len):
    """The decode service's path: the prompt's KV arrives from a prefill engine (staged), the
    first token too; decoding on from it gives what one engine generating alone gives."""
    prompt = prompts(1, seed=prompt_len)[0][:1] * prompt_len
    prompt = [(t + i) % 1000 for i, t in enumerate(prompt)]
    local = make_engine(tiny)
    expected = run_engine(local, lambda: collect(local, prompt, 12))

    a = tiny.model.arch
    k = torch.zeros(a.num_layers, a.num_kv_heads, prompt_len, a.head_dim)
    v = torch.zeros_like(k)

    def keep(layer, lk, lv):  # [Hkv, T, D] per layer, what the KV sender receives
        k[layer], v[layer] = lk, lv

    prefill = make_engine(tiny)
    first = run_engine(prefill, lambda: prefill.prefill("p", prompt, GREEDY, 12, keep)).first_token_id
    decode = make_engine(tiny)

    async def decode_rest():
        stream = decode.generate("d", prompt + [first], GREEDY, 12, num_generated=1, staged_kv=(k, v))
        return [t async for t, _ in stream]

    assert [first, *run_engine(decode, decode_rest)] == expected
    assert_nothing_held(decode)
    assert_nothing_held(prefill)  # the layer hook too


@pytest.mark.parametrize("num_sent", [1, 5, 8])
def test_a_takeover_after_sent_tokens_continues_the_same_generation(tiny, num_sent):
    """Migration: a request's decode service failed after num_sent tokens. A prefill engine runs
    prompt + those tokens (their KV goes to the new decode service) and samples token num_sent;
    decoding on from there gives what one engine generating alone gives, seeded sampling included."""
    prompt = prompts(1, seed=num_sent)[0]
    sampling = SamplingParams(temperature=0.8, top_k=50, seed=1234)
    local = make_engine(tiny)
    expected = run_engine(local, lambda: collect(local, prompt, 14, sampling))
    sent = expected[:num_sent]

    a = tiny.model.arch
    n = len(prompt) + num_sent
    k = torch.zeros(a.num_layers, a.num_kv_heads, n, a.head_dim)
    v = torch.zeros_like(k)

    def keep(layer, lk, lv):
        k[layer], v[layer] = lk, lv

    prefill = make_engine(tiny)
    result = run_engine(prefill, lambda: prefill.prefill("p/2", prompt + sent, sampling, 14, keep, num_generated=num_sent))
    assert result.num_prompt_tokens == n  # the KV covers the prompt and the sent tokens
    decode = make_engine(tiny)

    async def decode_rest():
        stream = decode.generate("d/2", prompt + sent + [result.first_token_id], sampling, 14,
                                 num_generated=num_sent + 1, staged_kv=(k, v))
        return [t async for t, _ in stream]

    assert [*sent, result.first_token_id, *run_engine(decode, decode_rest)] == expected
    assert_nothing_held(decode)


@pytest.mark.parametrize("num_sent", [2, 9])
def test_a_local_takeover_from_a_kept_prompt_kv_equals_recomputing_it(tiny, num_sent):
    """The prefill service's hot backup: the prompt's K/V kept from its Prefill; a degraded-mode
    takeover after num_sent tokens computes only those tokens and decodes on as if from scratch."""
    prompt = prompts(1, seed=10 + num_sent)[0]
    sampling = SamplingParams(temperature=0.8, top_k=50, seed=99)
    local = make_engine(tiny)
    expected = run_engine(local, lambda: collect(local, prompt, 16, sampling))

    a = tiny.model.arch
    k = torch.zeros(a.num_layers, a.num_kv_heads, len(prompt), a.head_dim)
    v = torch.zeros_like(k)

    def keep(layer, lk, lv):
        k[layer], v[layer] = lk, lv

    engine = make_engine(tiny)

    async def prefill_then_take_over():
        await engine.prefill("r", prompt, sampling, 16, keep)
        rest = engine.generate("r/2", prompt + expected[:num_sent], sampling, 16, num_generated=num_sent,
                               prefix_kv=(k, v))
        return [t async for t, _ in rest]

    assert run_engine(engine, prefill_then_take_over) == expected[num_sent:]
    assert_nothing_held(engine)


@pytest.mark.parametrize("num_sent", [1, 6])
def test_a_takeover_to_another_decode_from_a_kept_prompt_kv_sends_the_same_kv(tiny, num_sent):
    """A move to another decode service, with the prompt's K/V kept by the prefill service: the
    prefill computes only the sent tokens (attending to the kept K/V), samples the same next
    token, and the sent tokens' K/V it hands on equals what a full recompute gives."""
    prompt = prompts(1, seed=30 + num_sent)[0]
    sampling = SamplingParams(temperature=0.8, top_k=50, seed=7)
    local = make_engine(tiny)
    sent = run_engine(local, lambda: collect(local, prompt, 12, sampling))[:num_sent]
    a = tiny.model.arch

    def recorder(n):
        k, v = torch.zeros(a.num_layers, a.num_kv_heads, n, a.head_dim), torch.zeros(a.num_layers, a.num_kv_heads, n, a.head_dim)

        def keep(layer, lk, lv):
            k[layer], v[layer] = lk, lv
        return k, v, keep

    kept_k, kept_v, keep_prompt = recorder(len(prompt))
    full_k, full_v, keep_full = recorder(len(prompt) + num_sent)
    new_k, new_v, keep_new = recorder(num_sent)
    engine = make_engine(tiny)

    async def run():
        await engine.prefill("r", prompt, sampling, 12, keep_prompt)
        full = await engine.prefill("r/2", prompt + sent, sampling, 12, keep_full, num_generated=num_sent)
        reused = await engine.prefill("r/3", prompt + sent, sampling, 12, keep_new, num_generated=num_sent,
                                      prefix_kv=(kept_k, kept_v))
        return full, reused

    full, reused = run_engine(engine, run)
    assert reused.first_token_id == full.first_token_id
    torch.testing.assert_close(new_k, full_k[:, :, len(prompt):], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_v, full_v[:, :, len(prompt):], rtol=1e-5, atol=1e-5)
    assert_nothing_held(engine)


def test_engine_info_describes_the_engine_and_its_weights(tiny):
    a = tiny.model.arch
    info = make_engine(tiny, num_blocks=32).info
    assert (info.device, info.dtype, info.weights_label) == ("cpu", "fp32", "fp32")
    assert (info.num_layers, info.num_kv_heads, info.head_dim) == (a.num_layers, a.num_kv_heads, a.head_dim)
    assert (info.vocab_size, info.max_context) == (a.vocab_size, a.max_position_embeddings)
    assert (info.num_kv_blocks, info.kv_block_size, info.max_running) == (32, 4, 64)
    assert info.weight_bytes == tiny.model.weight_bytes()
    labelled = EngineLoop(tiny.model, frozenset(), EngineLimits(num_blocks=8), weights_label="int4-awq g32")
    assert labelled.info.weights_label == "int4-awq g32"


def test_a_failed_step_reports_an_error_and_releases_everything(tiny):
    engine = make_engine(tiny)
    out, hooked = [], []
    submit_local(engine, "a", [1, 2, 3], 10, out)
    engine.submit(engine.new_sequence("p", Kind.PREFILL_ONLY, [4, 5], GREEDY, 10),
                  lambda token, finish: hooked.append((token, finish)), on_layer_kv=lambda *_: None)
    engine.step()  # both prefill; "a" starts decoding

    def broken(seqs):
        raise RuntimeError("kernel fault")

    engine.runner.decode = broken
    engine.step()
    assert out[-1] == (None, "error") and len(hooked) == 1
    assert not engine.has_work
    assert_nothing_held(engine)


def test_a_cancelled_sequence_drops_its_staged_kv(tiny):
    a = tiny.model.arch
    engine = make_engine(tiny)
    k = torch.zeros(a.num_layers, a.num_kv_heads, 5, a.head_dim)
    seq = engine.new_sequence("d", Kind.FROM_KV, [1, 2, 3, 4, 5, 6], GREEDY, 10, num_generated=1)
    engine.submit(seq, lambda *_: None, staged_kv=(k, k.clone()))
    seq.cancelled = True  # the client left before the engine took it
    assert engine.step().finished_seq_ids == [seq.seq_id]
    assert_nothing_held(engine)


def _sample_failing_for_seed(bad_seed):
    from edgellm.engine import sampling

    def sample(logits, params, index):
        if params.seed == bad_seed:  # e.g. non-finite logits for this one request
            return sampling.sample(torch.full_like(logits, float("nan")), SamplingParams(temperature=1.0), index)
        return sampling.sample(logits, params, index)

    return sample


def test_one_sequence_failing_to_sample_ends_alone_in_a_prefill_batch(tiny, monkeypatch):
    """A prefill batch of three (two of them prefill-only, as on a prefill service): the one whose
    sampling raises ends with an error; the others get their tokens as if it were not there."""
    import edgellm.engine.runner as runner

    bad = SamplingParams(temperature=1.0, seed=666)
    ps = prompts(3, seed=5)
    monkeypatch.setattr(runner, "sample", _sample_failing_for_seed(666))
    engine = make_engine(tiny)
    outs = {name: [] for name in "bpl"}
    engine.submit(engine.new_sequence("bad", Kind.PREFILL_ONLY, ps[0], bad, 10),
                  lambda t, f: outs["b"].append((t, f)), on_layer_kv=lambda *_: None)
    engine.submit(engine.new_sequence("good", Kind.PREFILL_ONLY, ps[1], GREEDY, 10),
                  lambda t, f: outs["p"].append((t, f)), on_layer_kv=lambda *_: None)
    submit_local(engine, "local", ps[2], 6, outs["l"])
    out = engine.step()
    assert len(out.prefills) == 3  # one packed batch
    while engine.has_work:
        engine.step()
    assert outs["b"] == [(None, "error")]
    assert len(outs["p"]) == 1 and outs["p"][0][0] is not None
    assert len(outs["l"]) == 6 and all(t is not None for t, _ in outs["l"])
    reference = make_engine(tiny)
    ref_p, ref_l = [], []
    reference.submit(reference.new_sequence("good", Kind.PREFILL_ONLY, ps[1], GREEDY, 10),
                     lambda t, f: ref_p.append((t, f)), on_layer_kv=lambda *_: None)
    submit_local(reference, "local", ps[2], 6, ref_l)
    while reference.has_work:
        reference.step()
    assert outs["p"] == ref_p and outs["l"] == ref_l
    assert_nothing_held(engine)


def test_one_sequence_failing_to_sample_ends_alone_in_a_decode_step(tiny, monkeypatch):
    import edgellm.engine.runner as runner
    from edgellm.engine.errors import SequenceFailed

    ps = prompts(3, seed=6)
    reference = make_engine(tiny)

    async def good():
        return list(await asyncio.gather(*(collect(reference, p, 12) for p in ps[1:])))

    expected = run_engine(reference, good)

    # The bad sequence samples its first token fine (index 0), then fails in a decode step.
    def sample(logits, params, index):
        from edgellm.engine import sampling
        if params.seed == 666 and index >= 2:
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return sampling.sample(logits, params, index)

    monkeypatch.setattr(runner, "sample", sample)
    engine = make_engine(tiny)

    async def scenario():
        bad = collect(engine, ps[0], 12, SamplingParams(temperature=1.0, seed=666))
        return await asyncio.gather(bad, *(collect(engine, p, 12) for p in ps[1:]), return_exceptions=True)

    got = run_engine(engine, scenario)
    assert isinstance(got[0], SequenceFailed) and "sampling failed" in str(got[0])
    assert list(got[1:]) == expected
    assert_nothing_held(engine)


def test_the_engine_queue_is_bounded(tiny):
    from edgellm.engine.errors import EngineBusy

    engine = make_engine(tiny, max_waiting=3)
    for i in range(2):
        submit_local(engine, f"w{i}", [1, 2, 3], 2, [])
    engine.check_room()  # 2 waiting: room for one more
    submit_local(engine, "w2", [1, 2, 3], 2, [])
    with pytest.raises(EngineBusy, match="max_waiting_sequences=3"):
        engine.check_room()


def test_takeovers_arriving_together_share_one_prefill_pass(tiny):
    """Streams moved here by one failure arrive a few milliseconds apart: an idle engine waits
    for the last of them (takeover_gather_s without a new one), so a single packed prefill
    samples each one's next token, and the result equals each stream generated alone."""
    engine = make_engine(tiny, takeover_gather_s=0.3)  # wide, so a loaded test machine is no matter
    streams = prompts(3, seed=7)
    expected = [run_engine(solo := make_engine(tiny), lambda p=p, e=solo: collect(e, p, 6)) for p in streams]
    batches: list[list[str]] = []
    execute = engine.runner.execute

    def spy(out):
        if out.prefills:
            batches.append([s.request_id for s in out.prefills])
        return execute(out)

    engine.runner.execute = spy

    async def take_over():
        async def one(i, p):
            await asyncio.sleep(0.03 * i)  # the gateway's calls, one after another
            tokens = engine.generate(f"t{i}/2", p + expected[i][:3], GREEDY, 6, num_generated=3)
            return expected[i][:3] + [t async for t, _ in tokens]
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(streams)))

    assert run_engine(engine, take_over) == expected
    assert batches == [["t0/2", "t1/2", "t2/2"]]
    assert_nothing_held(engine)
