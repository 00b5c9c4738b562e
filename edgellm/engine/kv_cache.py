"""The paged KV cache (tensors) and the per-step batch description the model reads.

Storage per layer: K and V of shape [num_blocks * block_size, kv_heads, head_dim], i.e. a
flat array of token slots; slot = block_id * block_size + offset. Which blocks belong to
which sequence is bookkeeping (block_manager.py); the model only sees slot numbers
(where to write new K/V) and block tables (where to read a sequence's context).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ForwardBatch:
    """Everything one forward pass needs to know about its sequences, as tensors."""

    token_ids: torch.Tensor  # [T] new tokens of all sequences, packed
    positions: torch.Tensor  # [T] their positions within their sequences
    is_prefill: bool
    cu_seqlens: list[int]  # prefill: sequence i is tokens cu_seqlens[i]:cu_seqlens[i+1]
    slot_mapping: torch.Tensor | None = None  # [S] cache slot of each stored new token (all of them unless store_rows)
    store_rows: torch.Tensor | None = None  # [S] which new tokens slot_mapping is for; None = every token
    block_tables: torch.Tensor | None = None  # decode: [B, max_blocks] (padded with 0)
    context_lens: torch.Tensor | None = None  # decode: [B] tokens in context, the new one included
    max_context_len: int = 0
    # prefill: each sequence's kept prefix K/V, [L, C, Hkv, D] each (its new tokens, at positions
    # C on, attend to those first); None: no prefix
    prefix_kv: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None
    # prefill: where the K/V of prompts that leave this engine goes, for the other ranks of a
    # tensor-parallel group (each streams its own heads): a layer-KV hook's `route` (a plain dict)
    # with "rows": [start, end) of its packed tokens
    kv_routes: list[dict] | None = None


@dataclass(frozen=True)
class ContextView:
    """Where a decode step's contexts live in the cache: the same for every layer, so the model
    computes it once per step."""

    slots: torch.Tensor  # [B, L] cache slot of each context position (beyond a context: padding)
    mask: torch.Tensor  # [B, 1, 1, L] 0 inside the context, -inf beyond (additive: SDPA takes it as
    # is, where a boolean mask is converted in every layer; measured 27 -> 13 us per call)


class PagedKVCache:
    def __init__(
        self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.device = torch.device(device)
        # One block more than the block manager hands out: the scratch block, where the padding
        # rows of a fixed-shape (CUDA graph) decode step write their K/V. No sequence reads it.
        shape = ((num_blocks + 1) * block_size, num_kv_heads, head_dim)
        self.scratch_slot = num_blocks * block_size
        # Zeros, not empty: decode gathers whole blocks, and a NaN in a masked-out slot would
        # still poison attention (0 weight x NaN value = NaN).
        self.k = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=self.device) for _ in range(num_layers)]
        self._block_offsets = torch.arange(block_size, device=self.device)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write k, v ([T, Hkv, D]) at slots ([T], every one a real slot). No check that reads the
        slots back: on a GPU it would wait for the device in every layer, and it cannot be
        captured in a CUDA graph."""
        self.k[layer][slots] = k.to(device=self.device, dtype=self.k[layer].dtype)
        self.v[layer][slots] = v.to(device=self.device, dtype=self.v[layer].dtype)

    def context_view(
        self, block_tables: torch.Tensor, context_lens: torch.Tensor, max_len: int, dtype: torch.dtype
    ) -> ContextView:
        """The slots of each sequence's first max_len positions, and which of them are its context
        (as an additive mask in the attention's dtype)."""
        num_seqs, _ = block_tables.shape
        slots = (block_tables[:, :, None] * self.block_size + self._block_offsets).view(num_seqs, -1)[:, :max_len]
        outside = torch.arange(max_len, device=self.device)[None, :] >= context_lens[:, None]  # [B, L]
        mask = torch.zeros(outside.shape, dtype=dtype, device=self.device).masked_fill_(outside, float("-inf"))
        return ContextView(slots, mask[:, None, None, :])

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V at slots [B, L] (a ContextView's): [B, Hkv, L, D]."""
        return self.k[layer][slots].transpose(1, 2), self.v[layer][slots].transpose(1, 2)
