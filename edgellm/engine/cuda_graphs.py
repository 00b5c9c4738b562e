"""The decode step at a fixed shape, replayed as CUDA graphs (the nano-vllm / gpt-fast approach).

A decode step of a small model on a GPU is bound by kernel launches, not arithmetic: 30
layers of about a dozen small kernels each cost more in CPU-side dispatch than on the GPU.
A CUDA graph records one step's kernels once and replays them with a single launch. A graph
has fixed shapes and fixed addresses, so:
  - the batch is padded up to a batch-size bucket (BATCH_BUCKETS) and the context up to a
    power-of-two number of KV blocks; each (batch bucket, context bucket) pair gets its own
    graph, captured the first time a step of that shape runs;
  - inputs are copied into static buffers the graphs read (token ids, positions, slots,
    block tables, context lengths), and the logits come out in one static buffer;
  - padding rows decode token 0 at position 0 with a one-token context and write their K/V
    to the cache's scratch slot, which no sequence reads.
Prefill, and decode batches larger than the largest bucket, run eagerly.

The same code runs eagerly on any device (`capture=False`): that is how the CPU tests hold
the padded fixed-shape step to the plain one.
"""

from __future__ import annotations

import torch

from edgellm.engine.kv_cache import ForwardBatch, PagedKVCache
from edgellm.engine.model import LlamaModel

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def batch_bucket(num_seqs: int, max_batch: int) -> int | None:
    """The smallest bucket that holds num_seqs, or None when it needs more than max_batch."""
    for bucket in BATCH_BUCKETS:
        if bucket > max_batch:
            break
        if bucket >= num_seqs:
            return bucket
    return None


def context_bucket(num_blocks: int, max_blocks: int) -> int:
    """KV blocks a graph reads per sequence: the next power of two >= num_blocks, at most
    max_blocks (attention then reads at most twice the context it needs)."""
    bucket = 1
    while bucket < num_blocks:
        bucket *= 2
    return min(bucket, max_blocks)


class DecodeGraphs:
    """Runs decode steps at bucketed shapes; on CUDA (capture=True) as replayed graphs."""

    def __init__(self, model: LlamaModel, cache: PagedKVCache, max_batch: int, max_blocks: int, capture: bool) -> None:
        self.model, self.cache = model, cache
        self.max_batch = batch_bucket(max_batch, BATCH_BUCKETS[-1]) or BATCH_BUCKETS[-1]  # buckets up to max_running
        self.max_blocks = max_blocks
        self.capture = capture
        device = cache.device
        b, nb = self.max_batch, max_blocks
        self.token_ids = torch.zeros(b, dtype=torch.long, device=device)
        self.positions = torch.zeros(b, dtype=torch.long, device=device)
        self.slots = torch.full((b,), cache.scratch_slot, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(b, nb, dtype=torch.long, device=device)
        self.context_lens = torch.ones(b, dtype=torch.long, device=device)
        self.logits = torch.zeros(b, model.arch.vocab_size, device=device)
        self._graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def fits(self, num_seqs: int, num_blocks: int) -> bool:
        return num_seqs <= self.max_batch and num_blocks <= self.max_blocks

    def run(
        self, token_ids: list[int], positions: list[int], slots: list[int], block_tables: list[list[int]]
    ) -> torch.Tensor:
        """One decode step for len(token_ids) sequences (fits() must hold): logits [B, V] fp32,
        a view of the static output buffer (valid until the next step)."""
        n = len(token_ids)
        batch = batch_bucket(n, self.max_batch)
        blocks = context_bucket(max(len(t) for t in block_tables), self.max_blocks)
        pad = batch - n
        table = torch.tensor([row + [0] * (blocks - len(row)) for row in block_tables] + [[0] * blocks] * pad)
        # Padding rows: token 0 at position 0, context of one token (block 0 slot 0 is read,
        # a finite value), K/V written to the scratch slot.
        host = torch.tensor([token_ids + [0] * pad, positions + [0] * pad,
                             slots + [self.cache.scratch_slot] * pad, [p + 1 for p in positions] + [1] * pad])
        self.token_ids[:batch].copy_(host[0], non_blocking=True)
        self.positions[:batch].copy_(host[1], non_blocking=True)
        self.slots[:batch].copy_(host[2], non_blocking=True)
        self.context_lens[:batch].copy_(host[3], non_blocking=True)
        self.block_tables[:batch, :blocks].copy_(table, non_blocking=True)
        if not self.capture:
            self._forward(batch, blocks)
        else:
            graph = self._graphs.get((batch, blocks))
            if graph is None:
                graph = self._graphs[(batch, blocks)] = self._capture(batch, blocks)
            graph.replay()
        return self.logits[:n]

    def _forward(self, batch: int, blocks: int) -> None:
        step = ForwardBatch(
            token_ids=self.token_ids[:batch],
            positions=self.positions[:batch],
            is_prefill=False,
            cu_seqlens=list(range(batch + 1)),
            slot_mapping=self.slots[:batch],
            block_tables=self.block_tables[:batch, :blocks],
            context_lens=self.context_lens[:batch],
            max_context_len=blocks * self.cache.block_size,
        )
        self.logits[:batch].copy_(self.model(step, self.cache))

    def _capture(self, batch: int, blocks: int) -> torch.cuda.CUDAGraph:
        # One eager run on a side stream first (the CUDA docs' recipe: lazy library
        # initialisation must not happen inside a capture). It computes this very step, so the
        # replay that follows recomputes the same values into the same places.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(batch, blocks)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self._forward(batch, blocks)
        return graph
