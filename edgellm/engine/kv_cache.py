"""Per-sequence contiguous KV cache.

Layout per layer: K and V of shape [kv_heads, capacity, head_dim]; the first
`num_tokens` positions are valid. Storage grows by doubling, so appending a
token is amortised O(1). During a forward pass each layer appends the new
tokens' K/V (`append`), and the pass ends with `commit(n)`, which advances
`num_tokens` once for all layers.
"""

from __future__ import annotations

import torch


class SequenceKV:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype, capacity: int = 0) -> None:
        self.num_layers, self.num_kv_heads, self.head_dim, self.dtype = num_layers, num_kv_heads, head_dim, dtype
        self.num_tokens = 0
        capacity = max(capacity, 16)
        self.k = [torch.empty(num_kv_heads, capacity, head_dim, dtype=dtype) for _ in range(num_layers)]
        self.v = [torch.empty(num_kv_heads, capacity, head_dim, dtype=dtype) for _ in range(num_layers)]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    @property
    def num_bytes(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.num_tokens * self.head_dim * self.k[0].element_size()

    def _grow(self, layer: int, needed: int) -> None:
        new_cap = max(needed, 2 * self.capacity)
        for store in (self.k, self.v):
            grown = torch.empty(self.num_kv_heads, new_cap, self.head_dim, dtype=self.dtype)
            # Copy all old capacity, not just num_tokens: write_prompt fills positions before commit.
            grown[:, : store[layer].shape[1]] = store[layer]
            store[layer] = grown

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' k, v ([kv_heads, S, D]) after the cached ones; return all valid K, V."""
        end = self.num_tokens + k.shape[1]
        if end > self.k[layer].shape[1]:
            self._grow(layer, end)
        self.k[layer][:, self.num_tokens : end] = k
        self.v[layer][:, self.num_tokens : end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def commit(self, num_new: int) -> None:
        self.num_tokens += num_new

    def write_prompt(self, layer: int, token_start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Place received prompt K/V ([kv_heads, T, D]) at [token_start, token_start+T) of a layer."""
        end = token_start + k.shape[1]
        if end > self.k[layer].shape[1]:
            self._grow(layer, end)
        self.k[layer][:, token_start:end] = k.to(self.dtype)
        self.v[layer][:, token_start:end] = v.to(self.dtype)
