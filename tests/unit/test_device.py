"""The GPU path's parts that are not CUDA-only, checked on the CPU: device choice and its
fail-fast rule, the CUDA-graph bucket arithmetic and the padded fixed-shape decode step, the
CUDA int4 packing arithmetic. (What only CUDA can show is in tests/gpu/.)"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from edgellm import config as cfg
from edgellm.device import DeviceUnavailable, cuda_problem, resolve_device
from edgellm.engine.block_manager import BlockManager
from edgellm.engine.cuda_graphs import BATCH_BUCKETS, DecodeGraphs, batch_bucket, context_bucket
from edgellm.engine.kv_cache import PagedKVCache
from edgellm.engine.runner import ModelRunner
from edgellm.engine.sampling_params import SamplingParams
from edgellm.engine.sequence import Kind, Sequence
from edgellm.engine.weights import load_model
from edgellm.quant.int4 import quantize_groups, unpack_nibbles
from edgellm.quant.linear import pack_for_tinygemm, tinygemm_inner_k_tiles

NO_CUDA = cuda_problem(0) is not None


def test_cpu_and_auto_resolve_to_the_cpu_without_cuda():
    assert resolve_device("cpu") == torch.device("cpu")
    if NO_CUDA:
        assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_asking_for_cuda_without_it_raises_naming_cuda(spec):
    with pytest.raises(DeviceUnavailable, match="CUDA") as e:
        resolve_device(spec, "--decode-device")
    assert "--decode-device" in str(e.value)


def test_config_takes_device_specs_and_rejects_others():
    config = cfg.parse(["--prefill-device", "cuda:1", "--decode-device", "cpu"], env={})
    assert config.placement.device("prefill") == "cuda:1" and config.placement.device("decode") == "cpu"
    assert cfg.parse([], env={"EDGELLM_DECODE_DEVICE": "cuda"}).placement.device("decode") == "cuda"
    assert cfg.parse([], env={}).placement.device("decode") == "auto"
    for bad in ("gpu", "cuda:", "cuda:x", "CUDA"):
        with pytest.raises(ValueError, match="decode_device"):
            cfg.parse(["--decode-device", bad], env={})


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
def test_decode_service_asked_for_cuda_exits_at_once_naming_cuda(tiny_model_dir):
    """A real service process: it must fail before loading anything, not serve on the CPU."""
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "services.decode", "--model", tiny_model_dir, "--decode-device", "cuda",
         "--decode-weights", "fp32", "--decode-port", "0", "--decode-metrics-port", "0"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "EDGELLM_LOG_LEVEL": "info"},
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "device_unavailable" in proc.stdout + proc.stderr and "CUDA" in proc.stdout + proc.stderr
    assert time.monotonic() - start < 60


def test_batch_buckets():
    assert [batch_bucket(n, 64) for n in (1, 2, 3, 5, 9, 17, 25, 33, 49, 64)] == [1, 2, 4, 8, 16, 24, 32, 48, 64, 64]
    assert batch_bucket(65, 64) is None  # past the largest bucket: eager
    assert batch_bucket(3, 2) is None
    assert all(a < b for a, b in zip(BATCH_BUCKETS, BATCH_BUCKETS[1:]))


def test_context_buckets_are_powers_of_two_capped():
    assert [context_bucket(n, 512) for n in (1, 2, 3, 5, 100, 300, 512)] == [1, 2, 4, 8, 128, 512, 512]
    assert context_bucket(5, 6) == 6


def _sequence(seq_id: int, prompt: list[int], blocks: BlockManager) -> Sequence:
    seq = Sequence(seq_id, f"r{seq_id}", Kind.LOCAL, list(prompt), len(prompt), SamplingParams(), 8)
    seq.block_table = blocks.allocate(len(prompt) + 1)
    return seq


def test_padded_fixed_shape_decode_equals_the_plain_step(tiny_model_dir):
    """The graph path's padding (batch to a bucket, context to a power of two, padding rows
    writing to the scratch slot), run eagerly: same logits as the plain step, and the real
    sequences' cached K/V untouched by the padding."""
    model = load_model(tiny_model_dir, "fp32").model
    a = model.arch
    blocks = BlockManager(32, 4)
    cache = PagedKVCache(a.num_layers, 32, 4, a.num_kv_heads, a.head_dim, torch.float32)
    runner = ModelRunner(model, cache, blocks)
    g = torch.Generator().manual_seed(0)
    seqs = [_sequence(i, torch.randint(0, a.vocab_size, (n,), generator=g).tolist(), blocks)
            for i, n in enumerate((5, 11, 2))]
    runner.prefill(seqs)
    for seq in seqs:
        seq.num_cached_tokens = len(seq.token_ids)
        seq.token_ids.append(7)
    k_before = [k[: 32 * 4].clone() for k in cache.k]
    plain = runner.model(*_plain_decode_batch(runner, seqs))  # the eager step, as the runner builds it
    k_after_plain = [k[: 32 * 4].clone() for k in cache.k]
    graphs = DecodeGraphs(model, cache, max_batch=8, max_blocks=8, capture=False)
    positions = [s.num_cached_tokens for s in seqs]
    padded = graphs.run([s.last_token_id for s in seqs], positions,
                        [blocks.slots(s.block_table, p, p + 1)[0] for s, p in zip(seqs, positions)],
                        [s.block_table for s in seqs])
    assert padded.shape == plain.shape == (3, a.vocab_size)
    torch.testing.assert_close(padded, plain, rtol=1e-5, atol=1e-5)
    # The padded step wrote the same real K/V the plain one did, and padding only the scratch block.
    for before, after_plain, k in zip(k_before, k_after_plain, cache.k):
        torch.testing.assert_close(k[: 32 * 4], after_plain)
        assert not torch.equal(after_plain, before)  # (the step did write its new tokens)


def _plain_decode_batch(runner: ModelRunner, seqs: list[Sequence]):
    from edgellm.engine.kv_cache import ForwardBatch

    positions = [s.num_cached_tokens for s in seqs]
    width = max(len(s.block_table) for s in seqs)
    batch = ForwardBatch(
        token_ids=torch.tensor([s.last_token_id for s in seqs]),
        positions=torch.tensor(positions),
        is_prefill=False,
        cu_seqlens=list(range(len(seqs) + 1)),
        slot_mapping=torch.tensor([runner.blocks.slots(s.block_table, p, p + 1)[0] for s, p in zip(seqs, positions)]),
        block_tables=torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs]),
        context_lens=torch.tensor(positions) + 1,
        max_context_len=max(positions) + 1,
    )
    return batch, runner.cache


def test_tinygemm_packing_arithmetic():
    assert tinygemm_inner_k_tiles(576) == 4  # SmolLM2's hidden size
    assert tinygemm_inner_k_tiles(1536) == 8 and tinygemm_inner_k_tiles(960) == 4 and tinygemm_inner_k_tiles(32) == 2
    with pytest.raises(ValueError, match="multiple of 32"):
        tinygemm_inner_k_tiles(48)
    codes, _, _ = quantize_groups(torch.randn(16, 64, generator=torch.Generator().manual_seed(1)), 32)
    packed = pack_for_tinygemm(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 32)
    # even k in the high nibble, odd k in the low one: the layout _convert_weight_to_int4pack reads
    assert torch.equal(packed >> 4, codes[:, 0::2]) and torch.equal(packed & 0xF, codes[:, 1::2])
    # (the checkpoint's own nibble order is the other way round)
    assert torch.equal(unpack_nibbles((packed >> 4) | ((packed & 0xF) << 4)), codes)
