"""INT4 weights for decode: asymmetric per-group codes on a compact parameter grid.

A weight W [N, K] is split along K into groups of `group_size`. Each group stores 4-bit codes
q in [0, 15], a scale and a zero, and W ~= (q - 8) * scale + zero: the convention of torch's
tinygemm-style kernels (gpt-fast's too). Scales and zeros are not free floats: each is an
8-bit code times a power of two shared by its output row (scale = code * 2**e_s, code in
[1, 255]; zero = code * 2**e_z, code in [-127, 127]), so a group costs 16 bits of parameters
instead of 32 (4.5 instead of 5 bits a weight at group 32; see quant/linear.py for the
kernels that read them). The codes are rounded against the grid values, so they absorb the
grid's error; every grid value is exact in bf16 and fp32, so the dequantized reference is
exactly what either kernel computes with.

Outlier channels (the MixQ idea): a few input channels whose activations are large are
corrected exactly by a small side matmul, out += x[:, idx] @ residual.T, where residual
is the full-precision weight minus its INT4 approximation on those channels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZES = (32, 64, 128)
SCALE_CODE_MAX = 255  # scale = code * 2**scale_exp[row], code a uint8 in [1, 255]
ZERO_CODE_MAX = 127  # zero = code * 2**zero_exp[row], code an int8 in [-127, 127]
MIN_SCALE = 2.0**-100


def fit_group_size(in_features: int, group_size: int) -> int:
    """The largest supported group size <= group_size that divides the input width.

    576 (SmolLM2's hidden size) is not a multiple of 128: such layers use 64, never a silent
    full-precision layer.
    """
    fitting = [g for g in GROUP_SIZES if g <= group_size and in_features % g == 0]
    if not fitting:
        raise ValueError(f"input width {in_features} is not a multiple of {GROUP_SIZES[0]}")
    return max(fitting)


def group_range(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = weight.shape
    groups = weight.float().view(n, k // group_size, group_size)
    return groups.amin(-1), groups.amax(-1)


def param_exponents(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per output row, the powers of two that scale and zero codes count in: the smallest that
    let the row's largest scale (zero) fit in SCALE_CODE_MAX (ZERO_CODE_MAX) steps. int32 [N]."""
    scales = ((hi - lo) / 15).clamp(min=MIN_SCALE)
    zeros = lo + 8 * scales
    scale_exp = torch.ceil(torch.log2(scales.amax(1) / SCALE_CODE_MAX))
    zero_exp = torch.ceil(torch.log2(zeros.abs().amax(1).clamp(min=MIN_SCALE) / ZERO_CODE_MAX))
    return scale_exp.int(), zero_exp.int()


def quantize_groups(
    weight: torch.Tensor,
    group_size: int,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
    exponents: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> codes uint8 [N, K] in [0, 15], scales and zeros (fp32) [N, K/g].

    Round to nearest over each group's [lo, hi]; by default its min and max, narrower when a
    clipping search chose so (values outside are clamped). Scales and zeros land on their
    row's grid (param_exponents of the unclipped range unless `exponents` is given), and the
    codes are rounded against those grid values, so they absorb the grid's error.
    """
    n, k = weight.shape
    if group_size not in GROUP_SIZES or k % group_size:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} and divide K={k}")
    if lo is None or hi is None:
        lo, hi = group_range(weight, group_size)
    scale_exp, zero_exp = param_exponents(lo, hi) if exponents is None else exponents
    scale_unit, zero_unit = torch.exp2(scale_exp.float())[:, None], torch.exp2(zero_exp.float())[:, None]
    scales = ((hi - lo) / 15 / scale_unit).round().clamp(1, SCALE_CODE_MAX) * scale_unit
    zeros = ((lo + 8 * scales) / zero_unit).round().clamp(-ZERO_CODE_MAX, ZERO_CODE_MAX) * zero_unit
    groups = weight.float().view(n, k // group_size, group_size)
    codes = ((groups - zeros[..., None]) / scales[..., None] + 8).round().clamp(0, 15).to(torch.uint8)
    return codes.view(n, k), scales, zeros


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = codes.shape
    groups = codes.view(n, k // group_size, group_size).float() - 8
    return (groups * scales[..., None] + zeros[..., None]).view(n, k)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] -> [N, K/2], even k in the low nibble (the checkpoint's layout)."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).view(packed.shape[0], -1)


def grid_codes(values: torch.Tensor, code_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """values [N, G] = codes * 2**exp[row] -> (codes fp32 [N, G], exp int8 [N]), with the
    smallest exponent that keeps |codes| <= code_max. Values quantize_groups made always fit
    (their exponent may only be larger, and then their codes scale up by a power of two)."""
    values = values.detach()
    exp = torch.ceil(torch.log2(values.abs().amax(1).clamp(min=MIN_SCALE) / code_max))
    codes = values * torch.exp2(-exp)[:, None]
    if not torch.equal(codes, codes.round()) or float(codes.abs().max()) > code_max:
        raise ValueError("INT4 scales or zeros are off their grid (code * 2**exponent)")
    return codes, exp.to(torch.int8)


@dataclass
class QuantizedWeight:
    """The portable form of one INT4 linear layer (what the checkpoint stores)."""

    codes: torch.Tensor  # uint8 [N, K], values 0..15
    scales: torch.Tensor  # [N, K/g]
    zeros: torch.Tensor  # [N, K/g]
    outlier_channels: torch.Tensor | None = None  # int64 [k] input channels corrected in bf16
    outlier_residual: torch.Tensor | None = None  # [N, k] full-precision weight minus its INT4 value there

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scales.shape[1]

    def param_codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Scales and zeros as their grid codes: (scale codes uint8 [N, G], zero codes int8
        [N, G], scale and zero exponents int8 [N]). Raises ValueError if they are off the grid."""
        scale_codes, scale_exp = grid_codes(self.scales, SCALE_CODE_MAX)
        zero_codes, zero_exp = grid_codes(self.zeros, ZERO_CODE_MAX)
        return scale_codes.to(torch.uint8), zero_codes.to(torch.int8), scale_exp, zero_exp

    def dequantize(self) -> torch.Tensor:
        """The effective weight [N, K] in fp32: the reference path the tests hold the kernel to."""
        weight = dequantize(self.codes, self.scales, self.zeros, self.group_size)
        if self.outlier_channels is not None:
            weight[:, self.outlier_channels] += self.outlier_residual.float()
        return weight
