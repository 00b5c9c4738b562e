"""KV block bookkeeping: plain Python over integers, no tensors.

The cache is num_blocks fixed-size blocks. A sequence owns a block table (list of block
ids) covering its cached tokens; blocks come from a free list and carry reference counts,
so a later prefix-sharing change can point two tables at one block.
"""

from __future__ import annotations

import collections


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.ref_counts = [0] * num_blocks
        self._free: collections.deque[int] = collections.deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.num_blocks_for(num_tokens) <= self.num_free_blocks

    def allocate(self, num_tokens: int) -> list[int]:
        """A new block table with room for num_tokens."""
        needed = self.num_blocks_for(num_tokens)
        if needed > self.num_free_blocks:
            raise MemoryError(f"need {needed} KV blocks, {self.num_free_blocks} free")
        return [self._take() for _ in range(needed)]

    def can_append(self, block_table: list[int], num_tokens: int) -> bool:
        """Whether a sequence holding num_tokens can store one more token."""
        return num_tokens < len(block_table) * self.block_size or self.num_free_blocks > 0

    def append(self, block_table: list[int], num_tokens: int) -> None:
        """Make room in block_table for token number num_tokens (0-based)."""
        if num_tokens >= len(block_table) * self.block_size:
            if not self._free:
                raise MemoryError("no free KV block")
            block_table.append(self._take())

    def free(self, block_table: list[int]) -> None:
        for block in block_table:
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self._free.append(block)
        block_table.clear()

    def _take(self) -> int:
        block = self._free.popleft()
        self.ref_counts[block] = 1
        return block

    def slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        """Cache slot numbers of token positions [start, end) of a sequence."""
        bs = self.block_size
        return [block_table[i // bs] * bs + i % bs for i in range(start, end)]
