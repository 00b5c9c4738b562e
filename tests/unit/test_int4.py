"""INT4 linear layers: the packed CPU kernel agrees with the dequantized reference (outlier
channels included), rows read back from the kernel's packing are the weight's rows, and
round-to-nearest error is bounded."""

import pytest
import torch

from edgellm.quant.int4 import (
    Int4Embedding,
    Int4Linear,
    QuantizedWeight,
    dequantize,
    fit_group_size,
    pack_nibbles,
    quantize_groups,
    unpack_nibbles,
)


def random_weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_rtn_error_is_within_half_a_step(group_size):
    w = random_weight(96, 256)
    codes, scales, zeros = quantize_groups(w, group_size)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15
    err = (dequantize(codes, scales, zeros, group_size) - w).abs().view(96, -1, group_size)
    # half a step, plus the bf16 rounding of the group's zero
    assert bool((err <= scales[..., None] * 0.51 + zeros.abs()[..., None] * 2**-8).all())


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


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("outliers", [[], [3, 70, 200]])
def test_kernel_matches_the_dequantized_reference(group_size, outliers):
    q = quantized_with_outliers(128, 256, group_size, outliers) if outliers else QuantizedWeight(
        *quantize_groups(random_weight(128, 256, seed=1), group_size)
    )
    layer = Int4Linear(q)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(2))
    reference = x.bfloat16().float() @ q.dequantize().t()
    out = layer(x)
    assert out.dtype == x.dtype and out.shape == (5, 128)
    # bf16 activations and outputs inside the kernel: relative error of a few tenths of a percent
    assert float((out - reference).abs().max()) <= 0.01 * float(reference.abs().max())


def test_outlier_channels_are_exact():
    """An outlier channel's weight column is the full-precision one (up to bf16 storage)."""
    w = random_weight(64, 128, seed=1)
    q = quantized_with_outliers(64, 128, 64, [5, 100])
    assert torch.allclose(q.dequantize()[:, [5, 100]], w[:, [5, 100]], atol=1e-2, rtol=1e-2)
    assert not torch.allclose(QuantizedWeight(q.codes, q.scales, q.zeros).dequantize()[:, [5, 100]], w[:, [5, 100]], atol=1e-2)


def test_embedding_rows_come_from_the_packed_kernel_weight():
    q = quantized_with_outliers(192, 128, 32, [7])
    table = Int4Linear(q)
    token_ids = torch.tensor([[0, 191, 64], [33, 32, 5]])
    rows = Int4Embedding(table, torch.float32)(token_ids)
    assert rows.shape == (2, 3, 128)
    expected = q.dequantize()[token_ids.reshape(-1)].bfloat16().float().view(2, 3, 128)
    assert torch.allclose(rows, expected, atol=1e-2, rtol=1e-2)


def test_group_size_falls_back_when_it_does_not_divide():
    assert fit_group_size(576, 128) == 64 and fit_group_size(1536, 128) == 128
    with pytest.raises(ValueError, match="not a multiple"):
        fit_group_size(48, 32)
