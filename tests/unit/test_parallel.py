"""Tensor-parallel arithmetic and the sharded forward pass (two ranks as two threads over a real
gloo group on loopback), on SmolLM2's uneven head shape: 9 query heads, 3 KV heads."""

import copy
import threading

import pytest
import torch

from edgellm.engine.kv_cache import ForwardBatch
from edgellm.engine.model import LlamaArch, LlamaModel
from edgellm.launch import free_port
from edgellm.parallel.layout import HeadShard, stage_layers, tp_shards
from edgellm.parallel.tp import TPGroup, decode_step, encode_step, shard_model


def test_uneven_heads_keep_kv_groups_whole():
    assert tp_shards(9, 3, 1536, 2) == [HeadShard((0, 6), (0, 2), (0, 768)), HeadShard((6, 9), (2, 3), (768, 1536))]
    assert [s.kv_heads for s in tp_shards(9, 3, 1536, 3)] == [(0, 1), (1, 2), (2, 3)]
    with pytest.raises(ValueError, match="KV heads"):
        tp_shards(9, 3, 1536, 4)
    assert stage_layers(30, 2) == [(0, 15), (15, 30)] and stage_layers(30, 4)[0] == (0, 8)


def smollm_shaped(num_layers: int = 3, tied: bool = False, vocab_size: int = 300) -> LlamaModel:
    """SmolLM2's head layout (9 q / 3 KV heads) at a small width, random weights."""
    arch = LlamaArch(vocab_size=vocab_size, hidden_size=72, intermediate_size=96, num_layers=num_layers, num_heads=9,
                     num_kv_heads=3, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None,
                     max_position_embeddings=256, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = LlamaModel(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    return model.eval()


def test_two_ranks_give_the_unsharded_logits_and_each_its_own_kv_heads():
    whole = smollm_shaped()
    ids = torch.randint(0, 300, (23,), generator=torch.Generator().manual_seed(1))
    batch = ForwardBatch(token_ids=ids, positions=torch.arange(23), is_prefill=True, cu_seqlens=[0, 23])
    expected_kv = []
    expected = whole(batch, None, on_layer_kv=lambda i, k, v: expected_kv.append(k), all_logits=True)

    address = f"127.0.0.1:{free_port()}"
    groups = [TPGroup(0, 2, address, 10.0)]
    groups.append(TPGroup(1, 2, address, 10.0))
    shards = tp_shards(9, 3, 96, 2)
    models = [copy.deepcopy(whole) for _ in shards]
    for model, shard, group in zip(models, shards, groups):
        shard_model(model, shard, group.all_reduce)
    assert [m.arch.num_kv_heads for m in models] == [2, 1]

    joiner = threading.Thread(target=lambda: groups[1].form(int(groups[0]._store.get("generation"))))
    groups[0]._store.set("generation", "7")
    joiner.start()
    assert groups[0].form(7)
    joiner.join()
    # rank 1 runs the step as rank 0 would publish it (through its JSON description)
    step, routes = decode_step(encode_step(batch, []), torch.device("cpu"))
    outputs, kvs = [None, None], [[], []]

    def run(rank, b):
        outputs[rank] = models[rank](b, None, on_layer_kv=lambda i, k, v: kvs[rank].append(k), all_logits=True)

    other = threading.Thread(target=run, args=(1, step))
    other.start()
    run(0, batch)
    other.join()
    for out in outputs:
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for layer, k in enumerate(expected_kv):  # rank 0 holds KV heads 0-1, rank 1 head 2
        torch.testing.assert_close(kvs[0][layer], k[:, 0:2], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(kvs[1][layer], k[:, 2:3], rtol=1e-4, atol=1e-4)
    assert routes == []
