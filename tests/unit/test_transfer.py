"""KV chunk codec and the receiver's integrity checks (no network: chunks fed directly)."""

import asyncio

import pytest
import torch

from edgellm.transfer import codec
from edgellm.transfer.receiver import KVStore
from edgellm.v1 import decode_pb2

LAYERS, HEADS, TOKENS, DIM = 4, 2, 50, 8


def prompt_kv(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    k = torch.randn(LAYERS, HEADS, TOKENS, DIM, generator=g).to(dtype)
    v = torch.randn(LAYERS, HEADS, TOKENS, DIM, generator=g).to(dtype)
    return k, v


def stream(k, v, max_bytes=1 << 20, layers_per_chunk=1, wire_dtype=None):
    chunks = []
    for start in range(0, LAYERS, layers_per_chunk):
        sl = slice(start, start + layers_per_chunk)
        chunks += list(codec.encode("r1", start, k[sl], v[sl], max_bytes, len(chunks), wire_dtype))
    for c in chunks:
        c.num_prompt_tokens = TOKENS
    last = decode_pb2.KVChunk(
        request_id="r1", seq_no=len(chunks), is_last=True, num_chunks=len(chunks), num_prompt_tokens=TOKENS, first_token_id=7
    )
    return chunks + [last]


async def feed(chunks):
    for c in chunks:
        yield c


VOCAB, CONTEXT = 100, 1024


def new_store(**limits):
    return KVStore(LAYERS, HEADS, DIM, torch.float32, ttl_s=60, vocab_size=VOCAB, max_context=CONTEXT, **limits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_assembles_the_exact_kv(dtype):
    k, v = prompt_kv(dtype)
    got = asyncio.run(new_store().receive(feed(stream(k, v, max_bytes=2048, layers_per_chunk=2))))
    assert got.num_prompt_tokens == TOKENS and got.first_token_id == 7
    assert torch.equal(got.k, k.float()) and torch.equal(got.v, v.float())


def test_long_layers_are_split_by_tokens_under_the_size_limit():
    k, v = prompt_kv()
    chunks = stream(k, v, max_bytes=2048)[:-1]
    assert all(len(c.k) + len(c.v) <= 2048 for c in chunks)
    assert len(chunks) > LAYERS  # several token slices per layer
    assert [c.seq_no for c in chunks] == list(range(len(chunks)))


def corrupt(chunks):
    chunks[1].k = bytes([chunks[1].k[0] ^ 0xFF]) + chunks[1].k[1:]
    return chunks


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda c: c[:1] + c[2:], "expected"),  # dropped
        (lambda c: c[:2] + c[1:], "expected"),  # duplicated
        (lambda c: [c[0], c[2], c[1]] + c[3:], "expected"),  # reordered
        (corrupt, "checksum"),
        (lambda c: c[:-1], "without its closing message"),  # stream cut
    ],
    ids=["dropped", "duplicated", "reordered", "corrupted", "cut"],
)
def test_damaged_streams_are_rejected(damage, message):
    k, v = prompt_kv()
    store = new_store()
    with pytest.raises(codec.ChunkError, match=message):
        asyncio.run(store.receive(feed(damage(stream(k, v)))))
    assert len(store) == 0  # nothing half-received can be claimed


def test_claim_waits_for_arrival_and_times_out_otherwise():
    async def scenario():
        store = new_store()
        k, v = prompt_kv()
        waiter = asyncio.create_task(store.claim("r1", timeout_s=5))
        await asyncio.sleep(0.01)
        await store.receive(feed(stream(k, v)))
        got = await waiter
        with pytest.raises(asyncio.TimeoutError):
            await store.claim("never-sent", timeout_s=0.05)
        return got, len(store)

    got, remaining = asyncio.run(scenario())
    assert got.request_id == "r1" and remaining == 0


def test_int8_transfer_is_about_half_of_fp16_and_close():
    g = torch.Generator().manual_seed(1)
    dim, tokens = 64, 300  # the real model's head_dim; a prompt of a few hundred tokens
    k = torch.randn(LAYERS, HEADS, tokens, dim, generator=g)
    k[:, :, :, 5] *= 20  # an outlier channel, as keys have
    v = torch.randn(LAYERS, HEADS, tokens, dim, generator=g)
    int8 = stream(k, v, max_bytes=1 << 20, wire_dtype=torch.int8)
    fp16 = stream(k, v, max_bytes=1 << 20, wire_dtype=torch.float16)
    ratio = sum(map(codec.wire_bytes, int8)) / sum(map(codec.wire_bytes, fp16))
    assert ratio <= 0.55
    for c in int8[:-1]:
        c.num_prompt_tokens = tokens
    int8[-1].num_prompt_tokens = tokens
    got = asyncio.run(KVStore(LAYERS, HEADS, dim, torch.float32, ttl_s=60, vocab_size=VOCAB, max_context=CONTEXT).receive(feed(int8)))
    # within half an int8 step of each value's group (after the channel scaling)
    for name, want, have in (("k", k, got.k), ("v", v, got.v)):
        channel = want.abs().amax(2, keepdim=True)
        step = (want / channel).unflatten(-1, (-1, 32)).abs().amax(-1, keepdim=True) / 127
        bound = (step.expand(-1, -1, -1, -1, 32).flatten(-2) * channel) * 0.51 + 1e-3
        assert bool(((have - want).abs() <= bound).all()), name


def test_int8_chunks_respect_the_size_limit():
    k, v = prompt_kv()
    chunks = stream(k, v, max_bytes=1024, wire_dtype=torch.int8)[:-1]
    assert len(chunks) > LAYERS and all(codec.wire_bytes(c) <= 1024 for c in chunks)


@pytest.mark.parametrize("field", ["v_scales", "k_channel_scales"])
def test_a_corrupted_int8_scale_is_caught_by_the_checksum(field):
    k, v = prompt_kv()
    chunks = stream(k, v, wire_dtype=torch.int8)
    damaged = getattr(chunks[1], field)
    setattr(chunks[1], field, bytes([damaged[0] ^ 0x01]) + damaged[1:])
    with pytest.raises(codec.ChunkError, match="checksum"):
        asyncio.run(new_store().receive(feed(chunks)))


# ---- the sender's bounded in-flight window -----------------------------------------------------
class SlowDecode:
    """A PushKV peer that takes one more message each time the test lets it (gRPC flow control)."""

    def __init__(self) -> None:
        self.allowed = asyncio.Semaphore(0)
        self.taken: list[decode_pb2.KVChunk] = []

    def PushKV(self, messages):
        return asyncio.ensure_future(self._consume(messages))

    async def _consume(self, messages):
        async for m in messages:
            self.taken.append(m)
            if m.is_last:
                return decode_pb2.KVAck(request_id=m.request_id, num_chunks=m.num_chunks)
            await self.allowed.acquire()


def start_engine_thread(sender, k, v):
    """The engine's side: hand every layer's K/V to the sender from another thread, as the forward pass does."""
    import threading

    done: list[int] = []

    def forward():
        for layer in range(LAYERS):
            sender.on_layer_kv(layer, k[layer], v[layer])
            done.append(layer)

    thread = threading.Thread(target=forward, daemon=True)
    thread.start()
    return thread, done


async def test_a_slow_decode_side_holds_the_forward_pass_within_the_window():
    from edgellm.transfer.sender import KVStreamSender

    k, v = prompt_kv()
    layer_bytes = k[0].nbytes + v[0].nbytes
    decode = SlowDecode()
    sender = KVStreamSender(decode, "r1", TOKENS, LAYERS, 1, 1 << 20, max_inflight_bytes=int(1.5 * layer_bytes))
    thread, done = start_engine_thread(sender, k, v)
    await asyncio.sleep(0.3)
    assert done == [0]  # layer 1's K/V does not fit while layer 0's waits for the decode side
    assert sender.inflight_bytes <= 1.5 * layer_bytes
    for _ in range(LAYERS):
        decode.allowed.release()
        await asyncio.sleep(0.05)
    await asyncio.to_thread(thread.join, 5)
    assert done == list(range(LAYERS))
    sender.finish(first_token_id=7)
    ack = await asyncio.wait_for(sender.ack, 5)
    assert ack.num_chunks == LAYERS
    assert sender.max_seen_inflight_bytes <= 1.5 * layer_bytes
    store = new_store()
    received = await store.receive(feed(decode.taken))
    assert torch.equal(received.k, k) and torch.equal(received.v, v)


async def test_an_aborted_stream_releases_a_waiting_forward_pass():
    from edgellm.transfer.sender import KVStreamSender

    k, v = prompt_kv()
    sender = KVStreamSender(SlowDecode(), "r1", TOKENS, LAYERS, 1, 1 << 20, max_inflight_bytes=1)
    thread, done = start_engine_thread(sender, k, v)
    await asyncio.sleep(0.3)
    assert done == [0]
    sender.abort()  # what the prefill servicer does when the gateway cancels (monitor verdict)
    await asyncio.to_thread(thread.join, 5)
    assert done == list(range(LAYERS))


async def test_a_decode_side_that_takes_nothing_loses_its_stream_after_the_timeout():
    from edgellm.transfer.sender import KVStreamSender

    k, v = prompt_kv()
    sender = KVStreamSender(SlowDecode(), "r1", TOKENS, LAYERS, 1, 1 << 20, max_inflight_bytes=1, window_timeout_s=0.3)
    thread, done = start_engine_thread(sender, k, v)
    await asyncio.to_thread(thread.join, 5)
    assert done == list(range(LAYERS)) and sender.gave_up
    with pytest.raises(asyncio.CancelledError):
        await sender.ack


# ---- hostile streams: refused before anything is sized from what they declare ---------------


def _header(**fields):
    """A first chunk that declares things (no valid tensors needed: checks come first)."""
    declared = dict(request_id="h1", seq_no=0, layer_start=0, layer_end=1, token_start=0, token_end=1,
                    num_prompt_tokens=TOKENS)
    return decode_pb2.KVChunk(**(declared | fields))


@pytest.mark.parametrize("fields, match", [
    ({"num_prompt_tokens": 4_000_000_000}, "num_prompt_tokens is 4000000000"),
    ({"num_prompt_tokens": 0}, "num_prompt_tokens is 0"),
    ({"token_end": 0}, "must be non-empty"),  # a zero-token chunk
    ({"layer_start": 3, "layer_end": 9}, "must be non-empty and inside"),
    ({"request_id": "x" * 300}, "request_id must be"),
])
def test_declared_sizes_are_checked_before_any_buffer(fields, match):
    from edgellm.transfer.receiver import InvalidKV

    store = new_store()
    with pytest.raises(InvalidKV, match=match):
        asyncio.run(store.receive(feed([_header(**fields)])))
    assert store.num_staged_bytes == 0 and store.num_streams == 0


def test_first_token_outside_the_vocabulary_is_refused():
    from edgellm.transfer.receiver import InvalidKV

    k, v = prompt_kv()
    chunks = stream(k, v)
    chunks[-1].first_token_id = VOCAB
    store = new_store()
    with pytest.raises(InvalidKV, match="outside the vocabulary"):
        asyncio.run(store.receive(feed(chunks)))
    assert len(store) == 0


def test_a_second_stream_for_an_id_already_held_is_refused():
    from edgellm.transfer.receiver import KVExists

    async def scenario():
        store = new_store()
        k, v = prompt_kv()
        first = await store.receive(feed(stream(k, v)))
        with pytest.raises(KVExists):
            await store.receive(feed(stream(k * 2, v * 2)))
        return await store.claim("r1", 1), first

    got, first = asyncio.run(scenario())
    assert got is first and torch.equal(got.k, prompt_kv()[0])  # the first stream's KV, untouched


def test_staged_kv_and_streams_are_bounded():
    from edgellm.transfer.receiver import KVStoreFull

    k, v = prompt_kv()
    one = 2 * k.nbytes

    async def scenario():
        store = new_store(max_staged_bytes=int(1.5 * one))
        await store.receive(feed(stream(k, v)))  # held, unclaimed
        with pytest.raises(KVStoreFull, match="max_staged_kv_mb"):
            await store.receive(feed([_header(request_id="r2")]))
        await store.claim("r1", 1)
        assert store.num_staged_bytes == 0

        busy = new_store(max_streams=1)
        gate = asyncio.Event()

        async def slow():
            yield stream(k, v)[0]
            await gate.wait()

        task = asyncio.create_task(busy.receive(slow()))
        await asyncio.sleep(0.01)
        with pytest.raises(KVStoreFull, match="max_kv_streams"):
            await busy.receive(feed(stream(k, v)))
        task.cancel()

    asyncio.run(scenario())


def test_the_closing_message_carries_the_prompt_digest():
    from edgellm.transfer.codec import prompt_digest

    assert prompt_digest([1, 2, 3]) != prompt_digest([1, 2, 4]) and len(prompt_digest([1])) == 32
    k, v = prompt_kv()
    chunks = stream(k, v)
    chunks[-1].prompt_digest = prompt_digest(range(TOKENS))
    got = asyncio.run(new_store().receive(feed(chunks)))
    assert got.prompt_digest == prompt_digest(list(range(TOKENS)))


# ---- several streams per request: head shards (tensor-parallel prefill), layer ranges (stages) ----


def shard_stream(k, v, heads, primary, layers=(0, LAYERS)):
    chunks = []
    for layer in range(*layers):
        for c in codec.encode("r1", layer, k[layer:layer + 1, heads[0]:heads[1]], v[layer:layer + 1, heads[0]:heads[1]],
                              1 << 20, len(chunks)):
            c.num_prompt_tokens, c.head_start, c.head_end = TOKENS, *heads
            chunks.append(c)
    last = decode_pb2.KVChunk(request_id="r1", seq_no=len(chunks), is_last=True, num_chunks=len(chunks),
                              num_prompt_tokens=TOKENS, first_token_id=7 if primary else 0, head_shard=not primary)
    return chunks + [last]


async def test_head_shards_assemble_and_the_primary_acks_only_when_all_arrived():
    k, v = prompt_kv()
    store = new_store()
    primary = asyncio.create_task(store.receive(feed(shard_stream(k, v, (0, 1), primary=True))))
    await asyncio.sleep(0.05)
    assert not primary.done()  # head 1 has not arrived: the primary's ack waits
    receipt = await store.receive(feed(shard_stream(k, v, (1, 2), primary=False)))
    got = await asyncio.wait_for(primary, 1)
    assert receipt.num_chunks == LAYERS and got.first_token_id == 7
    assert torch.equal(got.k, k) and torch.equal(got.v, v)
    assert torch.equal((await store.claim("r1", 1)).k, k)


async def test_overlapping_heads_are_refused_and_a_failed_shard_fails_the_request():
    from edgellm.transfer.receiver import KVExists

    k, v = prompt_kv()
    store = new_store()
    primary = asyncio.create_task(store.receive(feed(shard_stream(k, v, (0, 1), primary=True))))
    await asyncio.sleep(0.05)
    with pytest.raises(KVExists, match="heads"):
        await store.receive(feed(shard_stream(k, v, (0, 2), primary=False)))
    broken = shard_stream(k, v, (1, 2), primary=False)
    broken[1].crc32 ^= 1
    with pytest.raises(codec.ChunkError):
        await store.receive(feed(broken))
    with pytest.raises(codec.ChunkError, match="another stream"):
        await asyncio.wait_for(primary, 1)
    assert store.num_staged_bytes == 0 and len(store) == 0


def test_a_stage_store_holds_its_layers_only():
    from edgellm.transfer.receiver import InvalidKV

    k, v = prompt_kv()
    stage = KVStore(LAYERS, HEADS, DIM, torch.float32, ttl_s=60, vocab_size=VOCAB, max_context=CONTEXT,
                    layer_range=(2, 4))
    got = asyncio.run(stage.receive(feed(shard_stream(k, v, (0, HEADS), primary=True, layers=(2, 4)))))
    assert torch.equal(got.k, k[2:4]) and torch.equal(got.v, v[2:4])
    stage = KVStore(LAYERS, HEADS, DIM, torch.float32, ttl_s=60, vocab_size=VOCAB, max_context=CONTEXT,
                    layer_range=(2, 4))
    with pytest.raises(InvalidKV, match=r"inside layers \[2, 4\)"):
        asyncio.run(stage.receive(feed(shard_stream(k, v, (0, HEADS), primary=True))))
