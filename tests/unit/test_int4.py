"""INT4 linear layers: both kernels (ours in C, torch's) agree with the dequantized reference
(outlier channels included), rows read back from either packing are the weight's rows, group
parameters sit exactly on their 8-bit grid, and round-to-nearest error is bounded."""

import platform
import threading

import pytest
import torch

from edgellm.quant import cpu_kernel
from edgellm.quant.int4 import (
    SCALE_CODE_MAX,
    ZERO_CODE_MAX,
    QuantizedWeight,
    dequantize,
    fit_group_size,
    grid_codes,
    pack_nibbles,
    quantize_groups,
    unpack_nibbles,
)
from edgellm.quant.linear import DENSE_MIN_ROWS, Int4Embedding, Int4Linear, resolve_kernel

needs_c_kernel = pytest.mark.skipif(cpu_kernel.library() is None, reason="no C compiler: the C INT4 kernel is unavailable")
KERNELS = [pytest.param("c", marks=needs_c_kernel), "torch"]


def random_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_rtn_error_is_within_half_a_step(group_size):
    w = random_weight(96, 256)
    codes, scales, zeros = quantize_groups(w, group_size)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    err = (dequantize(codes, scales, zeros, group_size) - w).abs().view(96, -1, group_size)
    # half a step, plus the grid rounding of the group's scale (up to 8 steps away) and zero
    zero_step = torch.exp2(grid_codes(zeros, ZERO_CODE_MAX)[1].float())[:, None, None]
    assert bool((err <= scales[..., None] * 0.51 + 8 * scales[..., None] / 256 + zero_step / 2).all())


def test_group_parameters_sit_on_their_8_bit_grid():
    """scale = code * 2**e (code 1..255), zero = code * 2**e (|code| <= 127), e per row: exact in
    bf16, so torch's kernel (bf16 parameters) and ours (the codes) compute the same weight."""
    w = random_weight(64, 256) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different magnitude
    q = QuantizedWeight(*quantize_groups(w, 32))
    scale_codes, zero_codes, scale_exp, zero_exp = q.param_codes()
    assert scale_codes.dtype == torch.uint8 and int(scale_codes.min()) >= 1
    assert zero_codes.dtype == torch.int8 and int(zero_codes.abs().max()) <= ZERO_CODE_MAX
    assert int(scale_codes.max(1).values.min()) > SCALE_CODE_MAX // 2  # each row uses its range
    assert torch.equal(scale_codes.float() * torch.exp2(scale_exp.float())[:, None], q.scales)
    assert torch.equal(zero_codes.float() * torch.exp2(zero_exp.float())[:, None], q.zeros)
    assert torch.equal(q.scales.bfloat16().float(), q.scales) and torch.equal(q.zeros.bfloat16().float(), q.zeros)
    with pytest.raises(ValueError, match="off their grid"):
        QuantizedWeight(q.codes, q.scales * 1.001, q.zeros).param_codes()


def test_clipping_range_clamps_codes():
    w = random_weight(8, 64)
    lo, hi = torch.full((8, 1), -0.5), torch.full((8, 1), 0.5)
    deq = dequantize(*quantize_groups(w, 64, lo, hi), 64)
    assert float(deq.abs().max()) <= 0.55


def test_nibble_packing_round_trips():
    codes = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    assert pack_nibbles(codes).shape == (5, 32)
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)


def quantized_with_outliers(n: int, k: int, group_size: int, channels: list[int]) -> QuantizedWeight:
    w = random_weight(n, k, seed=1)
    codes, scales, zeros = quantize_groups(w, group_size)
    idx = torch.tensor(channels)
    residual = (w - dequantize(codes, scales, zeros, group_size))[:, idx]
    return QuantizedWeight(codes, scales, zeros, idx, residual)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("outliers", [[], [3, 70, 200]])
@pytest.mark.parametrize("num_rows", [1, 3, 8, 13, DENSE_MIN_ROWS + 6])
def test_kernel_matches_the_dequantized_reference(kernel, group_size, outliers, num_rows):
    """Row counts cover our kernel's register blocks (8, 4, 2, 1 rows) and its dense path."""
    q = quantized_with_outliers(128, 256, group_size, outliers) if outliers else QuantizedWeight(
        *quantize_groups(random_weight(128, 256, seed=1), group_size)
    )
    layer = Int4Linear(q, kernel)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(num_rows, 256, generator=torch.Generator().manual_seed(2)).to(dtype)
        reference = x.float() @ q.dequantize().t()
        out = layer(x)
        assert out.dtype == x.dtype and out.shape == (num_rows, 128)
        # ours sums in fp32 (with bf16 outlier residuals; a bf16 result is rounded once, 2^-9);
        # torch's computes in bf16
        tolerance = {("c", torch.float32): 1e-3, ("c", torch.bfloat16): 4e-3}.get((kernel, dtype), 1e-2)
        assert float((out.float() - reference).abs().max()) <= tolerance * float(reference.abs().max())


@needs_c_kernel
def test_our_kernel_takes_any_number_of_output_rows():
    """Torch's packing needs N % 16 == 0; ours pads to whole 32-row tiles and hides the padding."""
    q = quantized_with_outliers(200, 128, 64, [0, 127])
    layer = Int4Linear(q, "c")
    x = torch.randn(2, 128)
    reference = x @ q.dequantize().t()
    assert float((layer(x) - reference).abs().max()) <= 1e-3 * float(reference.abs().max())  # bf16 residuals
    rows = layer.rows(torch.tensor([0, 199, 100]))
    assert torch.allclose(rows.float(), q.dequantize()[[0, 199, 100]].bfloat16().float(), atol=1e-2, rtol=1e-2)


@needs_c_kernel
def test_our_kernel_holds_fewer_bytes_than_torchs():
    q = QuantizedWeight(*quantize_groups(random_weight(256, 576), 32))
    c, torch_kernel = Int4Linear(q, "c").weight_bytes(), Int4Linear(q, "torch").weight_bytes()
    assert c == 256 * 576 // 2 + 256 * (576 // 32) * 2 + 256 * 2  # codes, parameter codes, exponents
    assert torch_kernel == 256 * 576 // 2 + 256 * (576 // 32) * 4


def test_an_unknown_kernel_is_refused():
    with pytest.raises(ValueError, match="unknown INT4 kernel"):
        resolve_kernel("cuda-magic")


def test_outlier_channels_are_exact():
    """An outlier channel's weight column is the full-precision one (up to bf16 storage)."""
    w = random_weight(64, 128, seed=1)
    q = quantized_with_outliers(64, 128, 64, [5, 100])
    assert torch.allclose(q.dequantize()[:, [5, 100]], w[:, [5, 100]], atol=1e-2, rtol=1e-2)
    assert not torch.allclose(QuantizedWeight(q.codes, q.scales, q.zeros).dequantize()[:, [5, 100]], w[:, [5, 100]], atol=1e-2)


@pytest.mark.parametrize("kernel", KERNELS)
def test_embedding_rows_come_from_the_packed_kernel_weight(kernel):
    q = quantized_with_outliers(192, 128, 32, [7])
    table = Int4Linear(q, kernel)
    token_ids = torch.tensor([[0, 191, 64], [33, 32, 5]])
    rows = Int4Embedding(table, torch.float32)(token_ids)
    assert rows.shape == (2, 3, 128)
    expected = q.dequantize()[token_ids.reshape(-1)].bfloat16().float().view(2, 3, 128)
    assert torch.allclose(rows, expected, atol=1e-2, rtol=1e-2)


def test_group_size_falls_back_when_it_does_not_divide():
    assert fit_group_size(576, 128) == 64 and fit_group_size(1536, 128) == 128
    with pytest.raises(ValueError, match="not a multiple"):
        fit_group_size(48, 32)


@needs_c_kernel
@pytest.mark.skipif(platform.machine() != "x86_64", reason="elsewhere the default build is the portable path")
@pytest.mark.parametrize("flags", [("-mno-avx512f",), ("-mno-avx512bf16",)], ids=["plain-c", "avx512-without-bf16"])
def test_the_other_builds_of_the_kernel_match_the_reference(tmp_path, flags):
    """Built without AVX-512, the kernel takes its plain-C loops (what a Jetson's ARM cores run);
    built without AVX512_BF16, its fp32 AVX-512 path for bf16 activations too."""
    other = tmp_path / "int4_other.so"
    cpu_kernel.build(cpu_kernel.compiler(), other, flags)
    q = quantized_with_outliers(96, 128, 32, [9])
    layer = Int4Linear(q, "c")
    layer._lib = cpu_kernel.load(other)  # the same tiles, read by the other build
    for dtype, tolerance in ((torch.float32, 1e-3), (torch.bfloat16, 4e-3)):
        for num_rows in (1, 5, 11):
            x = torch.randn(num_rows, 128, generator=torch.Generator().manual_seed(num_rows)).to(dtype)
            reference = x.float() @ q.dequantize().t()
            assert float((layer(x).float() - reference).abs().max()) <= tolerance * float(reference.abs().max())


@needs_c_kernel
def test_our_kernel_gives_the_same_result_on_any_number_of_threads():
    q = quantized_with_outliers(320, 128, 32, [4])
    layer = Int4Linear(q, "c")
    before = torch.get_num_threads()
    try:
        outputs = []
        for threads in (1, 3):
            torch.set_num_threads(threads)
            outputs.append([layer(torch.ones(rows, 128) / rows) for rows in (1, 9, DENSE_MIN_ROWS)])
    finally:
        torch.set_num_threads(before)
    for one, three in zip(*outputs):
        assert torch.equal(one, three)  # tiles are split between threads, never a sum


@needs_c_kernel
def test_our_kernel_is_right_when_two_threads_call_it_at_once():
    """Two engines in one process share the C library's thread pool: while one runs a job the
    other runs its own alone, and both get their exact answers."""
    q = quantized_with_outliers(640, 128, 32, [4])
    layer = Int4Linear(q, "c")
    inputs = [torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows)) for rows in (1, 7, 32)]
    expected = [layer(x) for x in inputs]
    failures = []

    def hammer() -> None:
        torch.set_num_threads(2)
        for _ in range(200):
            for x, want in zip(inputs, expected):
                if not torch.equal(layer(x), want):
                    failures.append(x.shape)

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures
