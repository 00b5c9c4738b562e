"""CUDA graph replay of the decode step equals the eager step, bucket by bucket."""

from __future__ import annotations

import torch

from edgellm.engine.block_manager import BlockManager
from edgellm.engine.cuda_graphs import DecodeGraphs
from edgellm.engine.kv_cache import PagedKVCache
from edgellm.engine.weights import load_model


def test_graph_replay_equals_eager(tiny_model_dir):
    model = load_model(tiny_model_dir, "fp32").model.cuda()
    a = model.arch
    blocks = BlockManager(64, 16)
    cache = PagedKVCache(a.num_layers, 64, 16, a.num_kv_heads, a.head_dim, torch.float32, "cuda")
    graphs = DecodeGraphs(model, cache, max_batch=16, max_blocks=8, capture=True)
    eager = DecodeGraphs(model, cache, max_batch=16, max_blocks=8, capture=False)
    g = torch.Generator().manual_seed(0)
    cache.k = [torch.randn(k.shape, generator=g).cuda() for k in cache.k]  # any finite context
    cache.v = [torch.randn(v.shape, generator=g).cuda() for v in cache.v]
    for num_seqs in (1, 3, 8, 11, 3, 3):  # 3 again: a captured graph replays with new inputs
        tables = [blocks.allocate(int(n)) for n in torch.randint(1, 60, (num_seqs,), generator=g)]
        positions = [len(t) * 16 - 1 - int(torch.randint(0, 16, (1,), generator=g)) for t in tables]
        tokens = torch.randint(0, a.vocab_size, (num_seqs,), generator=g).tolist()
        slots = [t[p // 16] * 16 + p % 16 for t, p in zip(tables, positions)]
        expected = eager.run(tokens, positions, slots, tables).clone()
        actual = graphs.run(tokens, positions, slots, tables)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
        for t in tables:
            blocks.free(t)
    assert 4 <= graphs.num_graphs <= 6  # one per (batch, context) bucket seen; never one per step
