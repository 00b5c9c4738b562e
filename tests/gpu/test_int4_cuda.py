"""torch's CUDA int4 kernel, fed the portable checkpoint's codes: equal to the
dequantize-and-matmul reference (bf16 activations), outlier channels included."""

from __future__ import annotations

import pytest
import torch

from edgellm.quant.int4 import QuantizedWeight, quantize_groups
from edgellm.quant.linear import Int4Linear


def quantized(n: int, k: int, group: int, outliers: int, seed: int) -> QuantizedWeight:
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=g) * 0.05
    codes, scales, zeros = quantize_groups(weight, group)
    q = QuantizedWeight(codes, scales, zeros)
    if outliers:
        channels = torch.randperm(k, generator=g)[:outliers].sort().values
        q = QuantizedWeight(codes, scales, zeros, channels, (weight - q.dequantize())[:, channels].bfloat16())
    return q


@pytest.mark.parametrize("n,k,group,outliers", [(960, 576, 32, 8), (100, 1536, 64, 0), (3072, 576, 64, 8),
                                                (49152, 576, 32, 0)])
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_cuda_int4_linear_equals_the_dequantized_reference(n, k, group, outliers, rows):
    q = quantized(n, k, group, outliers, seed=n + k)
    layer = Int4Linear(q, device="cuda")
    assert layer.kernel == "cuda" and layer.packed.is_cuda
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)).bfloat16().cuda()
    expected = x.float() @ q.dequantize().cuda().T
    actual = layer(x).float()
    assert actual.shape == (rows, n)
    scale = expected.abs().max()
    assert (actual - expected).abs().max() <= 0.02 * scale, "bf16 output rounding is all the difference allowed"


def test_cuda_int4_rows_are_the_dequantized_rows():
    q = quantized(1000, 576, 32, 8, seed=5)
    layer = Int4Linear(q, device="cuda")
    index = torch.tensor([0, 7, 999, 500], device="cuda")
    torch.testing.assert_close(layer.rows(index).float(), q.dequantize().cuda()[index].bfloat16().float())
