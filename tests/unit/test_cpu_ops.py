"""The CPU decode step's fused ops (engine/cpu_ops.py) against the torch code they replace, in
both CPU activation dtypes, and a whole decode step with them against one without."""

import copy
import ctypes
import platform

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgellm import native
from edgellm.engine import cpu_ops
from edgellm.engine.block_manager import BlockManager
from edgellm.engine.kv_cache import ForwardBatch, PagedKVCache
from edgellm.engine.model import RMSNorm, apply_rope
from edgellm.engine.weights import load_model
from edgellm.parallel.stages import keep_stage_layers
from edgellm.quant.apply import apply_int4
from edgellm.quant.awq import rtn_quantize

pytestmark = pytest.mark.skipif(cpu_ops.library() is None, reason="no C compiler: the fused decode ops are unavailable")
DTYPES = [torch.float32, torch.bfloat16]
# fp32: only the order of sums differs; bf16: that can move a result by one bf16 step
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


@pytest.fixture(scope="module")
def portable_library(tmp_path_factory):
    """The library built without AVX-512: the plain-C loops a Jetson's ARM cores run."""
    path = tmp_path_factory.mktemp("portable") / "edgellm_native_portable.so"
    native.build(native.compiler(), path, ("-mno-avx512f",))
    return native.bind(ctypes.CDLL(str(path)), cpu_ops.SIGNATURES)


@pytest.fixture(params=["native", "portable"])
def build(request, monkeypatch):
    """Each op test runs on this machine's build and on the portable one (x86 only: elsewhere
    the native build is the portable one)."""
    if request.param == "portable":
        if platform.machine() != "x86_64":
            pytest.skip("the native build is the portable path here")
        lib = request.getfixturevalue("portable_library")
        monkeypatch.setattr(cpu_ops, "library", lambda: lib)
    return request.param


def randn(*shape, dtype, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_add", [True, False])
def test_add_rms_norm_matches_add_then_rmsnorm(dtype, with_add, build):
    norm = RMSNorm(576, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(randn(576, dtype=dtype, seed=1))
    x, residual = randn(5, 576, dtype=dtype, seed=2), randn(5, 576, dtype=dtype, seed=3) * 4
    expected_residual = residual + x if with_add else residual.clone()
    expected = norm(expected_residual)
    out = cpu_ops.add_rms_norm(x if with_add else None, residual, norm.weight.detach(), 1e-5)
    torch.testing.assert_close(residual, expected_residual, rtol=0, atol=0)  # the add rounds like torch's
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


def rope_tables(positions, head_dim, dtype):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_store_matches_apply_rope_and_cache_store(dtype, build):
    num_heads, num_kv_heads, d, t = 9, 3, 64, 4
    qkv = randn(t, num_heads + 2 * num_kv_heads, d, dtype=dtype)
    cos, sin = rope_tables(torch.tensor([0, 7, 130, 4095]), d, dtype)
    rotated = apply_rope(qkv[:, : num_heads + num_kv_heads], cos[:, None], sin[:, None])
    cache = PagedKVCache(1, 4, 16, num_kv_heads, d, dtype)
    slots = torch.tensor([5, 17, 40, 63])
    cpu_ops.rope_store(qkv, cos, sin, num_heads, num_kv_heads, slots, cache.k[0], cache.v[0])
    torch.testing.assert_close(qkv[:, : num_heads + num_kv_heads], rotated, **TOLERANCE[dtype])
    torch.testing.assert_close(cache.k[0][slots], qkv[:, num_heads : num_heads + num_kv_heads], rtol=0, atol=0)
    torch.testing.assert_close(cache.v[0][slots], qkv[:, num_heads + num_kv_heads :], rtol=0, atol=0)
    assert cache.k[0].count_nonzero() == slots.numel() * num_kv_heads * d  # nothing else written


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_torch(dtype, build):
    gate_up = (randn(5, 2 * 200, dtype=torch.float32, seed=4) * 6).to(dtype)  # 200: a 16-lane tail too
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, float("nan")])  # e^-g overflowing, underflowing; NaN
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up
    torch.testing.assert_close(cpu_ops.silu_mul(gate_up), expected, equal_nan=True, **TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_paged_attention_matches_gather_and_sdpa(dtype, build):
    num_heads, num_kv_heads, d, block_size = 9, 3, 64, 16
    cache = PagedKVCache(1, 12, block_size, num_kv_heads, d, dtype)
    cache.k[0].copy_(randn(*cache.k[0].shape, dtype=dtype, seed=1))
    cache.v[0].copy_(randn(*cache.v[0].shape, dtype=dtype, seed=2))
    lens = torch.tensor([1, 40, 17])  # one token, several blocks, a block and one
    tables = torch.tensor([[3, 0, 0], [7, 1, 10], [11, 2, 0]])  # out of order, padded with 0
    qkv = randn(3, num_heads + 2 * num_kv_heads, d, dtype=dtype, seed=3)
    view = cache.context_view(tables, lens, int(lens.max()), dtype)
    keys, values = cache.gather(0, view.slots)
    expected = F.scaled_dot_product_attention(qkv[:, :num_heads, None], keys, values, attn_mask=view.mask,
                                              enable_gqa=True)[:, :, 0]
    for threads in (1, 2):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = cpu_ops.paged_attention(qkv, num_heads, cache.k[0], cache.v[0], tables, lens, block_size)
        finally:
            torch.set_num_threads(before)
        torch.testing.assert_close(out, expected, **TOLERANCE[dtype])


def with_fused_projections(model):
    """A copy of a dense model with q/k/v and gate/up as one linear each, as INT4 decode fuses them
    (the fused decode path needs qkv_proj)."""
    model = copy.deepcopy(model)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.qkv_proj = nn.Linear(attn.q_proj.in_features, 1, bias=False)
        attn.qkv_proj.weight = nn.Parameter(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
        mlp.gate_up_proj = nn.Linear(mlp.gate_proj.in_features, 1, bias=False)
        mlp.gate_up_proj.weight = nn.Parameter(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
    return model


def decode_steps(model, ids, num_prompt, dtype):
    """Logits of decode steps over a paged cache after a prefill of ids[:num_prompt], for two
    sequences at once (the second a shifted copy, so lengths differ): [steps, 2, V]."""
    a = model.arch
    cache, blocks = PagedKVCache(a.num_layers, 16, 4, a.num_kv_heads, a.head_dim, dtype), BlockManager(16, 4)
    seqs = [ids, ids[3:]]
    tables = []
    for seq in seqs:
        table = blocks.allocate(num_prompt)
        table.reverse()  # blocks need not be contiguous or ordered
        prompt = seq[:num_prompt]
        model(ForwardBatch(token_ids=prompt, positions=torch.arange(num_prompt), is_prefill=True,
                           cu_seqlens=[0, num_prompt], slot_mapping=torch.tensor(blocks.slots(table, 0, num_prompt))),
              cache)
        tables.append(table)
    steps = []
    for pos in range(num_prompt, len(ids) - 3):
        for table in tables:
            blocks.append(table, pos)
        width = max(map(len, tables))
        batch = ForwardBatch(
            token_ids=torch.stack([seq[pos] for seq in seqs]), positions=torch.tensor([pos, pos]), is_prefill=False,
            cu_seqlens=[0, 1, 2], slot_mapping=torch.tensor([blocks.slots(t, pos, pos + 1)[0] for t in tables]),
            block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
            context_lens=torch.tensor([pos + 1, pos + 1]), max_context_len=pos + 1,
        )
        steps.append(model(batch, cache))
    return torch.stack(steps)


def test_fused_decode_step_matches_the_torch_path(tiny_model_dir):
    model = with_fused_projections(load_model(tiny_model_dir, "fp32").model)
    ids = torch.randint(0, model.arch.vocab_size, (24,), generator=torch.Generator().manual_seed(4))
    fused = decode_steps(model, ids, 10, torch.float32)
    model.fused_cpu_decode = False
    exact = decode_steps(model, ids, 10, torch.float32)
    torch.testing.assert_close(fused, exact, rtol=1e-4, atol=1e-4)
    assert torch.equal(fused.argmax(-1), exact.argmax(-1))

    # bf16: the fused step may round differently from torch's, but must stay as close to fp32
    model = model.to(torch.bfloat16)
    reference = decode_steps(model, ids, 10, torch.bfloat16) - exact
    model.fused_cpu_decode = True
    fused = decode_steps(model, ids, 10, torch.bfloat16) - exact
    assert fused.abs().max() <= 1.1 * reference.abs().max()
    assert fused.abs().mean() <= 1.1 * reference.abs().mean()


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_whole_decode_step_in_one_c_call_matches_the_op_by_op_loop(tiny_model_dir, dtype):
    """An INT4 model on our kernel runs a decode step's layer loop in one C call
    (cpu_ops.DecodeLayers); the loop of single ops and the plain torch path are its references."""
    model = load_model(tiny_model_dir, "fp32").model
    for i, norm in enumerate(m for m in model.modules() if isinstance(m, RMSNorm)):  # not all ones: tells them apart
        norm.weight.data = 1 + 0.5 * randn(*norm.weight.shape, dtype=torch.float32, seed=10 + i)
    int4 = apply_int4(model, rtn_quantize(model, 32, True), dtype, kernel="c")
    assert cpu_ops.DecodeLayers.applies(int4)
    ids = torch.randint(0, int4.arch.vocab_size, (24,), generator=torch.Generator().manual_seed(5))
    whole = decode_steps(int4, ids, 10, dtype)
    assert isinstance(int4._c_decode_layers, cpu_ops.DecodeLayers)  # it ran
    int4._c_decode_layers = False
    op_by_op = decode_steps(int4, ids, 10, dtype)
    int4.fused_cpu_decode = False
    torch_path = decode_steps(int4, ids, 10, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(whole, op_by_op, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(whole, torch_path, rtol=1e-4, atol=1e-4)
        assert torch.equal(whole.argmax(-1), torch_path.argmax(-1))
    else:  # bf16 roundings may differ by a step here and there: no further from torch than the op loop
        assert (whole - torch_path).abs().max() <= 1.1 * (op_by_op - torch_path).abs().max() + 1e-2
        assert (whole - torch_path).abs().mean() <= 1.1 * (op_by_op - torch_path).abs().mean() + 1e-3


def test_a_pipeline_stage_runs_its_own_layers_in_the_one_c_call(tiny_model_dir):
    """A decode stage keeps some of the model's layers (parallel/stages.py): the C loop walks
    those, not arch.num_layers."""
    model = load_model(tiny_model_dir, "fp32").model
    int4 = apply_int4(model, rtn_quantize(model, 32, True), torch.float32, kernel="c")
    keep_stage_layers(int4, (0, 2))  # stage 0 of two: the embedding, two layers, no head (hidden states out)
    ids = torch.randint(0, int4.arch.vocab_size, (20,), generator=torch.Generator().manual_seed(6))
    whole = decode_steps(int4, ids, 8, torch.float32)
    assert int4._c_decode_layers.model.num_layers == 2
    int4._c_decode_layers = False
    torch.testing.assert_close(whole, decode_steps(int4, ids, 8, torch.float32), rtol=1e-4, atol=1e-4)
