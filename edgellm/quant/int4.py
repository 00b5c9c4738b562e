"""INT4 weights for decode: asymmetric per-group quantization and torch's CPU int4 kernel.

A weight W [N, K] is split along K into groups of `group_size`; each group stores 4-bit
codes q in [0, 15] with a scale and a zero point, W ~= q * scale + zero. The portable form
(q, scales, zeros) is packed for `aten._weight_int4pack_mm_for_cpu` only at load time. That
kernel wants bf16 activations (with fp32 activations it is 10-25x slower, see issue 4), so
Int4Linear casts its input to bf16 and its output back. `dequantize` is the reference path.

This is round-to-nearest (RTN); the activation-aware scale search (AWQ) and FP16 outlier
channels build on the same module.
"""

from __future__ import annotations

import torch
from torch import nn

GROUP_SIZES = (32, 64, 128)


def quantize_rtn(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> codes int32 [N, K] in [0, 15], scales and zeros fp32 [N, K/group_size]."""
    n, k = weight.shape
    if group_size not in GROUP_SIZES or k % group_size:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} and divide K={k}")
    groups = weight.float().view(n, k // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scales = ((hi - lo) / 15).clamp(min=1e-8)
    codes = ((groups - lo[..., None]) / scales[..., None]).round().clamp(0, 15).to(torch.int32)
    return codes.view(n, k), scales, lo


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    n, k = codes.shape
    groups = codes.view(n, k // group_size, group_size).float()
    return (groups * scales[..., None] + zeros[..., None]).view(n, k)


class Int4Linear(nn.Module):
    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        # The kernel computes (q - 8) * scale + offset per group: offset = zero + 8 * scale. [K/g, N, 2]
        scales_and_zeros = torch.stack([scales.t(), (zeros + 8 * scales).t()], dim=-1)
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(torch.bfloat16).contiguous())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> "Int4Linear":
        return cls(*quantize_rtn(linear.weight.data, group_size), group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.reshape(-1, self.in_features).to(torch.bfloat16), self.packed, self.group_size, self.scales_and_zeros
        )
        return out.to(x.dtype).view(*shape[:-1], self.out_features)


def quantize_model(model: nn.Module, group_size: int) -> dict[int, int]:
    """Replace every nn.Linear by an Int4Linear; return {group size used: number of layers}.

    A layer whose input width the group size does not divide (576 is not a multiple of 128 in
    SmolLM2) uses the largest smaller group size that does, never a silent full-precision layer.
    """
    used: dict[int, int] = {}
    targets = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    for name, linear in targets:
        fitting = [g for g in GROUP_SIZES if g <= group_size and linear.in_features % g == 0]
        if not fitting:
            raise ValueError(f"{name}: input width {linear.in_features} is not a multiple of 32")
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, Int4Linear.from_linear(linear, max(fitting)))
        used[max(fitting)] = used.get(max(fitting), 0) + 1
    return used
