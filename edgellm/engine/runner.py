"""Turns a SchedulerOutput into tensors, runs the model, samples: the only place that
touches both bookkeeping (sequences, block tables) and tensors."""

from __future__ import annotations

import time

import torch

from edgellm.engine.block_manager import BlockManager
from edgellm.engine.kv_cache import ForwardBatch, PagedKVCache
from edgellm.engine.model import LlamaModel
from edgellm.engine.sampling import sample
from edgellm.engine.sequence import Kind, Sequence


class ModelRunner:
    def __init__(self, model: LlamaModel, cache: PagedKVCache, blocks: BlockManager) -> None:
        self.model, self.cache, self.blocks = model, cache, blocks

    def load_staged(self, seq: Sequence) -> None:
        """Copy prompt KV received from a prefill service into the sequence's blocks."""
        assert seq.staged_kv is not None
        k, v = seq.staged_kv  # [L, Hkv, T, D]
        slots = torch.tensor(self.blocks.slots(seq.block_table, 0, seq.num_staged_tokens))
        for layer in range(k.shape[0]):
            self.cache.store(layer, slots, k[layer].transpose(0, 1), v[layer].transpose(0, 1))
        seq.staged_kv = None
        seq.num_cached_tokens = seq.num_staged_tokens

    def _load_prefix(self, seq: Sequence) -> int:
        """Copy a LOCAL sequence's kept prefix K/V into its blocks; returns how many tokens it covers."""
        if seq.prefix_kv is None:
            return 0
        assert seq.kind is Kind.LOCAL, "only a local sequence's prefill reads a cached prefix"
        k, v = seq.prefix_kv  # [L, Hkv, C, D]
        slots = torch.tensor(self.blocks.slots(seq.block_table, 0, k.shape[2]))
        for layer in range(k.shape[0]):
            self.cache.store(layer, slots, k[layer].transpose(0, 1), v[layer].transpose(0, 1))
        seq.prefix_kv = None  # a later recompute (preemption) runs every token
        return k.shape[2]

    def prefill(self, seqs: list[Sequence]) -> list[int | None]:
        """One packed forward over whole prompts. Returns the token sampled for each sequence
        (index num_generated); None for recomputes (their next token is known)."""
        token_ids, positions, slots, cu_seqlens, prefix_slots = [], [], [], [0], []
        for seq in seqs:
            ids = seq.prefill_token_ids
            cached = self._load_prefix(seq)
            token_ids += ids[cached:]
            positions += range(cached, len(ids))
            keep_kv = seq.kind is not Kind.PREFILL_ONLY
            slots += self.blocks.slots(seq.block_table, cached, len(ids)) if keep_kv else [-1] * (len(ids) - cached)
            cu_seqlens.append(cu_seqlens[-1] + len(ids) - cached)
            prefix_slots.append(torch.tensor(self.blocks.slots(seq.block_table, 0, cached)) if cached else None)
        batch = ForwardBatch(
            token_ids=torch.tensor(token_ids),
            positions=torch.tensor(positions),
            is_prefill=True,
            cu_seqlens=cu_seqlens,
            slot_mapping=torch.tensor(slots),
            prefix_slots=prefix_slots,
        )
        hooks = [(seq.on_layer_kv, cu_seqlens[i], cu_seqlens[i + 1]) for i, seq in enumerate(seqs) if seq.on_layer_kv]

        def on_layer_kv(layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
            for hook, start, end in hooks:  # each request's K/V: [Hkv, L, D]
                hook(layer, k[start:end].transpose(0, 1), v[start:end].transpose(0, 1))

        start_ns = time.time_ns()
        logits = self.model(batch, self.cache, on_layer_kv=on_layer_kv if hooks else None)  # [B, V]
        end_ns = time.time_ns()
        firsts: list[int | None] = []
        for seq, row in zip(seqs, logits):
            seq.forward_start_unix_ns, seq.forward_end_unix_ns = start_ns, end_ns
            seq.num_cached_tokens = len(seq.prefill_token_ids) if seq.kind is not Kind.PREFILL_ONLY else 0
            firsts.append(sample(row, seq.sampling, index=seq.num_generated) if seq.samples_after_prefill else None)
        return firsts

    def decode(self, seqs: list[Sequence]) -> list[int]:
        """Advance every sequence by one token (blocks for the new token already allocated)."""
        max_blocks = max(len(s.block_table) for s in seqs)
        block_tables = torch.tensor([s.block_table + [0] * (max_blocks - len(s.block_table)) for s in seqs])
        positions = [s.num_cached_tokens for s in seqs]
        batch = ForwardBatch(
            token_ids=torch.tensor([s.last_token_id for s in seqs]),
            positions=torch.tensor(positions),
            is_prefill=False,
            cu_seqlens=list(range(len(seqs) + 1)),
            slot_mapping=torch.tensor([self.blocks.slots(s.block_table, p, p + 1)[0] for s, p in zip(seqs, positions)]),
            block_tables=block_tables,
            context_lens=torch.tensor(positions) + 1,
            max_context_len=max(positions) + 1,
        )
        logits = self.model(batch, self.cache)  # [B, V]
        for seq in seqs:
            seq.num_cached_tokens += 1
        greedy = logits.argmax(dim=-1).tolist()  # one batched argmax serves every greedy sequence
        return [
            greedy[i] if seq.sampling.is_greedy else sample(row, seq.sampling, index=seq.num_generated)
            for i, (seq, row) in enumerate(zip(seqs, logits))
        ]
