"""INT4 weights for decode: asymmetric per-group codes, and torch's CPU int4 kernel.

A weight W [N, K] is split along K into groups of `group_size`. Each group stores 4-bit codes
q in [0, 15], a scale and a zero, and W ~= (q - 8) * scale + zero: the convention of torch's
tinygemm-style kernels (gpt-fast's too), so scales and zeros go to the kernel unchanged. Both
are kept as bf16 values from the start, so the dequantized reference is exactly what the
kernel computes with. `aten._weight_int4pack_mm_for_cpu` wants bf16 activations (with fp32
activations it is 10-25x slower, see issue 4): Int4Linear casts its input to bf16 and back.

Outlier channels (the MixQ idea): a few input channels whose activations are large are
corrected exactly by a small bf16 side matmul, out += x[:, idx] @ residual.T, where residual
is the full-precision weight minus its INT4 approximation on those channels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

GROUP_SIZES = (32, 64, 128)


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


def quantize_groups(
    weight: torch.Tensor, group_size: int, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> codes uint8 [N, K] in [0, 15], scales and zeros (bf16 values, fp32) [N, K/g].

    Round to nearest over each group's [lo, hi]; by default its min and max, narrower when a
    clipping search chose so (values outside are clamped).
    """
    n, k = weight.shape
    if group_size not in GROUP_SIZES or k % group_size:
        raise ValueError(f"group_size must be one of {GROUP_SIZES} and divide K={k}")
    if lo is None or hi is None:
        lo, hi = group_range(weight, group_size)
    scales = ((hi - lo) / 15).clamp(min=1e-6).bfloat16().float()
    zeros = (lo + 8 * scales).bfloat16().float()
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

    def dequantize(self) -> torch.Tensor:
        """The effective weight [N, K] in fp32: the reference path the tests hold the kernel to."""
        weight = dequantize(self.codes, self.scales, self.zeros, self.group_size)
        if self.outlier_channels is not None:
            weight[:, self.outlier_channels] += self.outlier_residual.float()
        return weight


@functools.cache
def cpu_pack_block_n() -> int | None:
    """How many output rows the CPU packing interleaves, found by asking the packer itself.

    The packed layout is [N / B, K, B / 2] bytes, row n's code in the low nibble of byte
    n % (B/2) and row n + B/2's in the high nibble. B depends on the CPU's vector width;
    embedding lookups read rows straight from it, so we check instead of assuming.
    """
    k = 64
    codes = torch.randint(0, 16, (256, k), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    for block in (64, 32, 16, 128):
        rows = torch.arange(256)
        if torch.equal(_rows_from_cpu_pack(packed, rows, k, block).int(), codes):
            return block
    return None


def _rows_from_cpu_pack(packed: torch.Tensor, rows: torch.Tensor, k: int, block: int) -> torch.Tensor:
    tiles = packed.view(-1, k, block // 2)[rows // block]  # [R, K, B/2]
    lane = (rows % (block // 2))[:, None, None].expand(-1, k, 1)
    byte = tiles.gather(2, lane).squeeze(2)  # [R, K]
    high = (rows % block >= block // 2)[:, None]
    return torch.where(high, byte >> 4, byte & 0xF)




class Int4Linear(nn.Module):
    """y = x @ W.T with W in INT4 (torch's CPU kernel, bf16 activations), plus outlier channels."""

    def __init__(self, weight: QuantizedWeight) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.codes.shape
        self.group_size = weight.group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes.int(), 1))
        # The kernel wants [K/g, N, 2]: (scale, zero) per group and output row.
        self.register_buffer(
            "scales_and_zeros", torch.stack([weight.scales.t(), weight.zeros.t()], -1).bfloat16().contiguous()
        )
        self.outlier_channels = weight.outlier_channels
        # [k, N] in fp32 (bf16 values): a k x N product in bf16 takes torch's slow path on CPUs
        # without AMX, 3-4x slower than fp32 here; the side matmul is tiny either way.
        self.outlier_residual_t = (
            None if weight.outlier_residual is None else weight.outlier_residual.bfloat16().float().t().contiguous()
        )
        block = cpu_pack_block_n()
        self._block_n = block if block is not None and self.out_features % block == 0 else None
        # Rows for embedding lookups come from the packed kernel weight; if this CPU's packing is
        # not the layout we know, keep a plain copy of the codes instead (more memory, still right).
        self._plain_codes = None if self._block_n is not None else pack_nibbles(weight.codes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_and_zeros)
        if self.outlier_channels is not None:
            side = x2.index_select(1, self.outlier_channels).float() @ self.outlier_residual_t
            out = out.add_(side.to(torch.bfloat16))
        return out.to(x.dtype).view(*shape[:-1], self.out_features)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantized rows W[index] in bf16: the embedding lookup of a tied LM head."""
        if self._block_n is not None:
            codes = _rows_from_cpu_pack(self.packed, index, self.in_features, self._block_n)
        else:
            codes = unpack_nibbles(self._plain_codes[index])
        g = self.group_size
        sz = self.scales_and_zeros[:, index].float()  # [K/g, R, 2]
        groups = codes.view(len(index), -1, g).float() - 8
        rows = (groups * sz[..., 0].t()[..., None] + sz[..., 1].t()[..., None]).view(len(index), -1)
        if self.outlier_channels is not None:
            rows[:, self.outlier_channels] += self.outlier_residual_t[:, index].t()
        return rows.bfloat16()

    def weight_bytes(self) -> int:
        tensors = [self.packed, self.scales_and_zeros, self.outlier_residual_t, self._plain_codes]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Int4Embedding(nn.Module):
    """Token embeddings read from an INT4 matrix (the tied LM head's, so it is stored once)."""

    def __init__(self, table: Int4Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = [table]  # a list: not registered twice as a submodule when it is the LM head
        self.dtype = dtype

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.table[0].rows(token_ids.reshape(-1)).to(self.dtype).view(*token_ids.shape, -1)
