"""Our Llama implementation against transformers' own, on the tiny random checkpoint (fp32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgellm.engine.block_manager import BlockManager
from edgellm.engine.kv_cache import ForwardBatch, PagedKVCache
from edgellm.engine.weights import load_model


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    ours = load_model(tiny_model_dir, "fp32")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return ours.model, reference


def prefill_batch(ids, slots=None):
    return ForwardBatch(token_ids=ids, positions=torch.arange(len(ids)), is_prefill=True, cu_seqlens=[0, len(ids)],
                        slot_mapping=slots)


def paged(model, num_blocks=8, block_size=4):
    a = model.arch
    return PagedKVCache(a.num_layers, num_blocks, block_size, a.num_kv_heads, a.head_dim, torch.float32), BlockManager(
        num_blocks, block_size
    )


def test_prefill_logits_match_transformers(models):
    ours, reference = models
    ids = torch.randint(0, ours.arch.vocab_size, (37,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    actual = ours(prefill_batch(ids), None, all_logits=True)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_packed_prefill_equals_separate_prefills(models):
    ours, _ = models
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 1000, (9,), generator=g), torch.randint(0, 1000, (14,), generator=g)
    packed = ForwardBatch(token_ids=torch.cat([a, b]), positions=torch.cat([torch.arange(9), torch.arange(14)]),
                          is_prefill=True, cu_seqlens=[0, 9, 23])
    last = ours(packed, None)  # [2, V]: each sequence's last token
    torch.testing.assert_close(last[0], ours(prefill_batch(a), None)[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last[1], ours(prefill_batch(b), None)[0], rtol=1e-4, atol=1e-4)


def test_decode_over_paged_cache_matches_full_forward(models):
    ours, _ = models
    ids = torch.randint(0, ours.arch.vocab_size, (20,), generator=torch.Generator().manual_seed(2))
    full = ours(prefill_batch(ids), None, all_logits=True)
    cache, blocks = paged(ours)
    table = blocks.allocate(12)
    table.reverse()  # blocks need not be contiguous or ordered
    ours(prefill_batch(ids[:12], torch.tensor(blocks.slots(table, 0, 12))), cache)
    steps = []
    for pos in range(12, 20):
        blocks.append(table, pos)
        batch = ForwardBatch(token_ids=ids[pos : pos + 1], positions=torch.tensor([pos]), is_prefill=False,
                             cu_seqlens=[0, 1], slot_mapping=torch.tensor(blocks.slots(table, pos, pos + 1)),
                             block_tables=torch.tensor([table]), context_lens=torch.tensor([pos + 1]),
                             max_context_len=pos + 1)
        steps.append(ours(batch, cache)[0])
    torch.testing.assert_close(torch.stack(steps), full[12:20], rtol=1e-4, atol=1e-4)


def test_layer_hook_sees_every_layer_in_order(models):
    ours, _ = models
    seen = []
    ours(prefill_batch(torch.arange(5)), None, on_layer_kv=lambda i, k, v: seen.append((i, tuple(k.shape), tuple(v.shape))))
    a = ours.arch
    assert seen == [(i, (5, a.num_kv_heads, a.head_dim), (5, a.num_kv_heads, a.head_dim)) for i in range(a.num_layers)]
