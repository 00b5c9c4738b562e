"""Our Llama implementation against transformers' own, on the tiny random checkpoint (fp32)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from edgellm.engine.weights import load_model


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    ours = load_model(tiny_model_dir, "fp32")
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return ours.model, reference


def test_prefill_logits_match_transformers(models):
    ours, reference = models
    ids = torch.randint(0, ours.arch.vocab_size, (37,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids[None]).logits[0]
    actual = ours(ids, ours.new_kv(), all_logits=True)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def test_incremental_decode_matches_full_forward(models):
    ours, _ = models
    ids = torch.randint(0, ours.arch.vocab_size, (20,), generator=torch.Generator().manual_seed(2))
    full = ours(ids, ours.new_kv(), all_logits=True)
    kv = ours.new_kv(capacity=1)  # forces the cache to grow while decoding
    ours(ids[:12], kv)
    steps = [ours(ids[i : i + 1], kv) for i in range(12, 20)]
    torch.testing.assert_close(torch.stack(steps), full[12:], rtol=1e-4, atol=1e-4)


def test_greedy_tokens_match_transformers_generate(models):
    ours, reference = models
    for seed in range(3):
        ids = torch.randint(0, ours.arch.vocab_size, (9,), generator=torch.Generator().manual_seed(seed))
        expected = reference.generate(ids[None], max_new_tokens=16, do_sample=False, eos_token_id=None)[0, 9:].tolist()
        kv, actual = ours.new_kv(), []
        logits = ours(ids, kv)
        for _ in range(16):
            actual.append(int(logits.argmax()))
            logits = ours(torch.tensor(actual[-1:]), kv)
        assert actual == expected


def test_layer_hook_sees_every_layer_in_order(models):
    ours, _ = models
    seen = []
    ours(torch.arange(5), ours.new_kv(), on_layer_kv=lambda i, k, v: seen.append((i, tuple(k.shape), tuple(v.shape))))
    a = ours.arch
    assert seen == [(i, (a.num_kv_heads, 5, a.head_dim), (a.num_kv_heads, 5, a.head_dim)) for i in range(a.num_layers)]
