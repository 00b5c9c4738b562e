"""Int4Linear: y = x @ W.T with W an INT4 QuantizedWeight, on one of two CPU kernels or, on a
GPU, torch's CUDA int4 kernel.

- "c" (default where a C compiler exists): our kernel (edgellm/native/int4_cpu.c via
  quant/cpu_kernel.py). It reads the 8-bit parameter codes as they are: 4.5 bits a weight at
  group 32, plus a byte per row for the two exponents. Decode-sized inputs (a few rows) run
  the kernel; long inputs (a prompt on a degraded path, perplexity windows) dequantize slices
  of the weight to fp32 and use a dense matmul, which wins there.
- "torch": torch's own CPU int4 kernel (`aten._weight_int4pack_mm_for_cpu`, bf16 activations).
  It needs each group's scale and zero as bf16, so the parameters are expanded at load time
  (5 bits a weight at group 32). Used where the C kernel cannot be built, and for comparison.

- "cuda": torch's CUDA kernel (`aten._weight_int4pack_mm`, tinygemm, bf16 activations), for
  an engine on a GPU. The same portable checkpoint is packed at load time into its tiled
  layout (`_convert_weight_to_int4pack`), with bf16 scales and zeros like "torch".

All compute with exactly the dequantized weight (grid values are exact in bf16), so tests
hold each to QuantizedWeight.dequantize(). Outlier channels: the C kernel adds them in the
same call; on torch's kernels (and the dense path) they are a side matmul on the same device.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.nn import functional as F

from edgellm.quant import cpu_kernel
from edgellm.quant.int4 import QuantizedWeight, pack_nibbles, unpack_nibbles

TILE = cpu_kernel.TILE
DENSE_MIN_ROWS = 64  # from this many input rows on, dequantize + dense matmul beats the kernel
DENSE_SLICE_ROWS = 4096  # output rows dequantized at a time (bounds the fp32 scratch: 9 MiB at K=576)


def resolve_kernel(kernel: str = "auto", device: torch.device | str = "cpu") -> str:
    """The kernel an Int4Linear on `device` uses. On CUDA always "cuda" (--int4-kernel picks
    among CPU kernels). On the CPU, --int4-kernel's "c" or "torch": "auto" is "c" where the C
    kernel builds (once per machine), else "torch"; "c" raises where it does not."""
    if torch.device(device).type == "cuda":
        return "cuda"
    if kernel == "auto":
        return "c" if cpu_kernel.library() is not None else "torch"
    if kernel == "c" and cpu_kernel.library() is None:
        raise RuntimeError("--int4-kernel c: the C INT4 kernel could not be built here (see the native_kernels_unavailable log)")
    if kernel not in ("c", "torch"):
        raise ValueError(f"unknown INT4 kernel {kernel!r} (auto, c or torch)")
    return kernel


class Int4Linear(nn.Module):
    """An INT4 linear layer on `kernel` ("auto", "c" or "torch"; see resolve_kernel)."""

    MAX_KERNEL_ROWS = DENSE_MIN_ROWS - 1  # input rows our C kernel takes (beyond: dequantize + dense)

    def __init__(self, weight: QuantizedWeight, kernel: str = "auto", device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.kernel = resolve_kernel(kernel, device)
        self.out_features, self.in_features = weight.codes.shape
        self.group_size = weight.group_size
        self.outlier_channels = weight.outlier_channels
        # [k, N] bf16 (fp32 would double the outliers' share of memory, and put the default over
        # 30 % of bf16's weights). The side matmul reads it as fp32: bf16 matmuls take a slow path
        # on CPUs without AMX.
        self.outlier_residual_t = (
            None if weight.outlier_residual is None else weight.outlier_residual.bfloat16().t().contiguous()
        )
        if self.kernel == "c":
            self._init_c(weight)
        elif self.kernel == "cuda":
            self._init_cuda(weight, torch.device(device))
        else:
            self._init_torch(weight)

    # ---- our kernel --------------------------------------------------------------------------
    def _init_c(self, weight: QuantizedWeight) -> None:
        n, k = weight.codes.shape
        pad = -n % TILE
        num_tiles, num_groups = (n + pad) // TILE, k // self.group_size
        scale_codes, zero_codes, scale_exp, zero_exp = weight.param_codes()
        codes = F.pad(weight.codes, (0, 0, 0, pad)).view(num_tiles, 2, TILE // 2, k)
        # [T, K, 16]: rows 32t + j (low nibble) and 32t + 16 + j (high nibble) share byte j
        self.register_buffer("tile_codes", (codes[:, 0] | (codes[:, 1] << 4)).transpose(1, 2).contiguous())

        def tiles(params: torch.Tensor) -> torch.Tensor:  # [N, G] -> [T, G, 32]
            return F.pad(params, (0, 0, 0, pad)).view(num_tiles, TILE, num_groups).transpose(1, 2).contiguous()

        self.register_buffer("scale_codes", tiles(scale_codes))
        self.register_buffer("zero_codes", tiles(zero_codes))
        self.register_buffer("scale_exp", F.pad(scale_exp, (0, pad)).contiguous())
        self.register_buffer("zero_exp", F.pad(zero_exp, (0, pad)).contiguous())
        self._lib = cpu_kernel.library()
        if self.outlier_channels is not None:  # pad the residual's columns like the tiles' rows
            self.outlier_residual_t = F.pad(self.outlier_residual_t, (0, pad)).contiguous()
            self.outlier_channels = self.outlier_channels.long().contiguous()
        # The buffers' addresses, kept between calls (checked each call: a move re-reads them).
        self._weight_args = self._tile_args(0)
        self._outlier_args = self._outlier_pointers()

    def c_pointers(self) -> tuple[int, ...]:
        """The C kernel's arguments for this layer's weights: its five tile arrays, then the outlier
        channels, their count and their residual (0, 0, 0 without)."""
        if self.tile_codes.data_ptr() != self._weight_args[0]:  # the buffers were moved (module.to(...))
            self._weight_args = self._tile_args(0)
            self._outlier_args = self._outlier_pointers()
        return (*self._weight_args, *self._outlier_args)

    def c_layer(self) -> tuple[int, ...] | None:
        """For C callers beyond forward (engine/cpu_ops.py's whole decode step, which does not
        import quant): c_pointers() + (in_features, out_features, group_size); None where this
        layer is not on our C kernel or its output rows are padded to whole tiles. Such a caller
        runs the kernel on at most MAX_KERNEL_ROWS input rows, as forward does."""
        if self.kernel != "c" or self.out_features % TILE:
            return None
        return (*self.c_pointers(), self.in_features, self.out_features, self.group_size)

    def _outlier_pointers(self) -> tuple[int, int, int]:
        if self.outlier_channels is None:
            return (0, 0, 0)
        return (self.outlier_channels.data_ptr(), len(self.outlier_channels), self.outlier_residual_t.data_ptr())

    def _tile_args(self, first_tile: int) -> tuple[int, ...]:
        """Pointers to the tile arrays from tile `first_tile` on."""
        g = self.in_features // self.group_size
        return (
            self.tile_codes.data_ptr() + first_tile * self.in_features * (TILE // 2),
            self.scale_codes.data_ptr() + first_tile * g * TILE,
            self.zero_codes.data_ptr() + first_tile * g * TILE,
            self.scale_exp.data_ptr() + first_tile * TILE,
            self.zero_exp.data_ptr() + first_tile * TILE,
        )

    def _matmul_c(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] -> [M, N] in x's dtype (fp32 or bf16 pass straight through the kernel; others
        go through fp32), outlier channels included."""
        m, k = x.shape
        n_padded = self.tile_codes.shape[0] * TILE
        if m < DENSE_MIN_ROWS:
            x = x.contiguous() if x.dtype in (torch.float32, torch.bfloat16) else x.float().contiguous()
            out = torch.empty(m, n_padded, dtype=x.dtype)
            status = self._lib.edgellm_int4_matmul(
                x.data_ptr(), m, k, n_padded, self.group_size, *self.c_pointers(), out.data_ptr(),
                n_padded, x.dtype == torch.bfloat16, torch.get_num_threads(),
            )
            if status != 0:
                raise MemoryError("INT4 kernel: out of memory for its scratch buffers")
            return out if n_padded == self.out_features else out[:, : self.out_features]
        return self._dense_matmul(x.float().contiguous())

    def _dense_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Long inputs: dequantize slices of the weight to fp32, dense matmul (fp32 in and out)."""
        m, k = x.shape
        n_padded = self.tile_codes.shape[0] * TILE
        out = torch.empty(m, n_padded)
        step = DENSE_SLICE_ROWS // TILE
        for t0 in range(0, self.tile_codes.shape[0], step):
            rows = min(step, self.tile_codes.shape[0] - t0) * TILE
            weight = torch.empty(rows, k)
            self._lib.edgellm_int4_dequantize(
                k, rows, self.group_size, *self._tile_args(t0), weight.data_ptr(), torch.get_num_threads()
            )
            torch.mm(x, weight.t(), out=out[:, t0 * TILE : t0 * TILE + rows])
        out = out[:, : self.out_features]
        return out if self.outlier_channels is None else out + self._outlier_side(x)

    def _outlier_side(self, x: torch.Tensor) -> torch.Tensor:
        side = x.index_select(1, self.outlier_channels).float() @ self.outlier_residual_t.float()
        return side[:, : self.out_features]

    def _rows_c(self, index: torch.Tensor) -> torch.Tensor:
        tile, lane = index // TILE, index % TILE
        byte = self.tile_codes[tile, :, lane % (TILE // 2)]  # [R, K]
        codes = torch.where((lane >= TILE // 2)[:, None], byte >> 4, byte & 0xF)
        scales = self.scale_codes[tile, :, lane].float() * torch.exp2(self.scale_exp[index].float())[:, None]
        zeros = self.zero_codes[tile, :, lane].float() * torch.exp2(self.zero_exp[index].float())[:, None]
        return codes, scales, zeros

    # ---- torch's kernel ----------------------------------------------------------------------
    def _init_torch(self, weight: QuantizedWeight) -> None:
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes.int(), 1))
        # The kernel wants [K/g, N, 2]: (scale, zero) per group and output row.
        self.register_buffer(
            "scales_and_zeros", torch.stack([weight.scales.t(), weight.zeros.t()], -1).bfloat16().contiguous()
        )
        block = cpu_pack_block_n()
        self._block_n = block if block is not None and self.out_features % block == 0 else None
        # Rows for embedding lookups come from the packed kernel weight; if this CPU's packing is
        # not the layout we know, keep a plain copy of the codes instead (more memory, still right).
        self._plain_codes = None if self._block_n is not None else pack_nibbles(weight.codes)

    def _matmul_torch(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.bfloat16)  # with fp32 activations this kernel is 10-25x slower (issue 4)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales_and_zeros)

    def _rows_torch(self, index: torch.Tensor) -> torch.Tensor:
        if self._block_n is not None:
            codes = _rows_from_cpu_pack(self.packed, index, self.in_features, self._block_n)
        else:
            codes = unpack_nibbles(self._plain_codes[index])
        sz = self.scales_and_zeros[:, index].float()  # [K/g, R, 2]
        return codes, sz[..., 0].t(), sz[..., 1].t()

    # ---- torch's CUDA kernel -------------------------------------------------------------------
    def _init_cuda(self, weight: QuantizedWeight, device: torch.device) -> None:
        n, k = weight.codes.shape
        pad = -n % TINYGEMM_N_MULTIPLE
        codes = F.pad(weight.codes, (0, 0, 0, pad)).to(device)
        self.register_buffer(
            "packed", torch.ops.aten._convert_weight_to_int4pack(pack_for_tinygemm(codes), tinygemm_inner_k_tiles(k))
        )
        scales_and_zeros = torch.stack([weight.scales.t(), weight.zeros.t()], -1).bfloat16()  # [K/g, N, 2]
        self.register_buffer("scales_and_zeros", F.pad(scales_and_zeros, (0, 0, 0, pad)).contiguous().to(device))
        # Embedding rows (a tied LM head) read plain codes: the tiled layout is the kernel's own.
        self._plain_codes = pack_nibbles(weight.codes).to(device)
        if self.outlier_channels is not None:
            self.outlier_channels = self.outlier_channels.long().to(device)
            self.outlier_residual_t = self.outlier_residual_t.to(device)

    def _matmul_cuda(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm(
            x.to(torch.bfloat16).contiguous(), self.packed, self.group_size, self.scales_and_zeros
        )
        return out if out.shape[1] == self.out_features else out[:, : self.out_features]

    # ---- any ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        if self.kernel == "c":
            out = self._matmul_c(x2)
        else:
            out = self._matmul_cuda(x2) if self.kernel == "cuda" else self._matmul_torch(x2)
            if self.outlier_channels is not None:
                out = out + self._outlier_side(x2).to(out.dtype)
        return out.to(x.dtype).view(*shape[:-1], self.out_features)

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Dequantized rows W[index] in bf16: the embedding lookup of a tied LM head."""
        if self.kernel == "c":
            codes, scales, zeros = self._rows_c(index)
        elif self.kernel == "cuda":
            codes = unpack_nibbles(self._plain_codes[index])
            sz = self.scales_and_zeros[:, index].float()  # [K/g, R, 2]
            scales, zeros = sz[..., 0].t(), sz[..., 1].t()
        else:
            codes, scales, zeros = self._rows_torch(index)
        groups = codes.view(len(index), -1, self.group_size).float() - 8
        rows = (groups * scales[..., None] + zeros[..., None]).view(len(index), -1)
        if self.outlier_channels is not None:
            rows[:, self.outlier_channels] += self.outlier_residual_t[:, index].t().float()  # (padded columns unread)
        return rows.bfloat16()

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers()) + sum(
            t.numel() * t.element_size() for t in (self.outlier_residual_t, getattr(self, "_plain_codes", None))
            if t is not None
        )


class Int4Embedding(nn.Module):
    """Token embeddings read from an INT4 matrix (the tied LM head's, so it is stored once)."""

    def __init__(self, table: Int4Linear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = [table]  # a list: not registered twice as a submodule when it is the LM head
        self.dtype = dtype

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.table[0].rows(token_ids.reshape(-1)).to(self.dtype).view(*token_ids.shape, -1)


TINYGEMM_N_MULTIPLE = 8  # output rows torch's CUDA int4 packing needs (rows are padded up to it)


def tinygemm_inner_k_tiles(in_features: int) -> int:
    """The CUDA packing's innerKTiles: the largest of 8, 4, 2 with in_features a multiple of
    16 x it (576, SmolLM2's hidden size, takes 4)."""
    for tiles in (8, 4, 2):
        if in_features % (16 * tiles) == 0:
            return tiles
    raise ValueError(f"input width {in_features} is not a multiple of 32 (torch's CUDA int4 kernel)")


def pack_for_tinygemm(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] in [0, 15] -> uint8 [N, K/2] as `_convert_weight_to_int4pack` takes them
    (torch >= 2.5): even k in the HIGH nibble (the checkpoint keeps it in the low one)."""
    return (codes[:, 0::2] << 4) | codes[:, 1::2]


@functools.cache
def cpu_pack_block_n() -> int | None:
    """How many output rows torch's CPU packing interleaves, found by asking the packer itself.

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
