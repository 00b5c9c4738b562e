"""Turns a SchedulerOutput into tensors, runs the model, samples: the only place that
touches both bookkeeping (sequences, block tables) and tensors.

It also keeps the tensors that belong to one sequence, keyed by its seq_id, from the moment
the loop hands the sequence to the scheduler until it leaves:
  staged K/V      FROM_KV: the prompt's K/V from a prefill service, copied into the
                  sequence's blocks when the scheduler admits it, then dropped
  prefix K/V      K/V of the first tokens kept from an earlier prefill (a takeover's prompt):
                  its first prefill computes only the tokens after them; a LOCAL sequence
                  also copies them into its blocks. Then dropped
  layer-KV hook   PREFILL_ONLY: where each layer's K/V of the prompt goes
release(seq_id) drops whatever is left when the sequence finishes, fails or is cancelled.
The runner reads sequences but never changes them: postprocess.py records what it did.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from edgellm.engine.block_manager import BlockManager
from edgellm.engine.cuda_graphs import DecodeGraphs
from edgellm.engine.kv_cache import ForwardBatch, PagedKVCache
from edgellm.engine.kv_offload import PerSequenceLayerKV
from edgellm.engine.model import LayerKVHook, LlamaModel
from edgellm.engine.postprocess import RunnerOutput
from edgellm.engine.sampling import sample
from edgellm.engine.scheduler import SchedulerOutput
from edgellm.engine.sequence import Kind, Sequence, Status

KV = tuple[torch.Tensor, torch.Tensor]  # K, V: [L, Hkv, T, D] each
# Runs a ForwardBatch over the cache and returns fp32 logits, called as forward(batch, cache,
# on_layer_kv=None): the model itself, or a pipeline of decode stages that starts with it
# (parallel/pipeline.py).
Forward = Callable[..., torch.Tensor]
# Told (request_id, slots) when a FROM_KV sequence's staged KV goes into its blocks: the other
# pipeline stages hold that request's KV of their layers and copy it into the same slots.
OnAdmitKV = Callable[[str, list[int]], None]


class ModelRunner:
    def __init__(
        self, model: LlamaModel, cache: PagedKVCache, blocks: BlockManager, max_running: int = 64,
        cuda_graphs: bool = False, forward: Forward | None = None, on_admit_kv: OnAdmitKV | None = None,
    ) -> None:
        """The model and cache live on one device (cache.device); only token ids come back to
        the host each step. cuda_graphs: replay decode steps as CUDA graphs (CUDA only, not with
        `forward`). forward: what runs a batch instead of the model alone (a pipeline's stage 0);
        on_admit_kv: where admitted FROM_KV sequences are announced (the same pipeline)."""
        self.model, self.cache, self.blocks = model, cache, blocks
        self.forward: Forward = forward or model
        self.on_admit_kv = on_admit_kv
        self.device = cache.device
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and forward is None and self.device.type == "cuda":
            max_blocks = min(blocks.num_blocks, -(-model.arch.max_position_embeddings // blocks.block_size))
            self.graphs = DecodeGraphs(model, cache, max_running, max_blocks, capture=True)
        self._staged: dict[int, KV] = {}
        self._prefixes: dict[int, KV] = {}
        self._hooks: dict[int, LayerKVHook] = {}

    # ---- per-sequence state (engine thread only) ------------------------------------------
    def stage_kv(self, seq_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Hold a FROM_KV sequence's prompt K/V ([L, Hkv, T, D] each) until it is admitted."""
        self._staged[seq_id] = (k, v)

    def set_prefix(self, seq_id: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Hold a LOCAL sequence's kept prefix K/V ([L, Hkv, C, D] each) for its first prefill."""
        self._prefixes[seq_id] = (k, v)

    def set_layer_hook(self, seq_id: int, hook: LayerKVHook) -> None:
        """Send each layer's K/V of this sequence's prefill to hook ([Hkv, T, D] each)."""
        self._hooks[seq_id] = hook

    def release(self, seq_id: int) -> None:
        """Drop everything held for a sequence that left the engine (no-op if nothing is)."""
        self._staged.pop(seq_id, None)
        self._prefixes.pop(seq_id, None)
        self._hooks.pop(seq_id, None)

    @property
    def held_seq_ids(self) -> set[int]:
        """Sequences the runner still holds tensors or a hook for (tests check nothing leaks)."""
        return set(self._staged) | set(self._prefixes) | set(self._hooks)

    # ---- one step --------------------------------------------------------------------------
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one scheduled step: copy newly admitted staged KV in, then the prefill batch or
        the decode step."""
        for seq in out.admitted_from_kv:
            if seq.status is Status.RUNNING:  # not preempted again in this same schedule
                self._load_staged(seq)
        if out.prefills:
            return self.prefill(out.prefills)
        return self.decode(out.decodes) if out.decodes else RunnerOutput([])

    def _load_staged(self, seq: Sequence) -> None:
        """Copy prompt KV received from a prefill service into the sequence's blocks."""
        k, v = self._staged.pop(seq.seq_id)  # [L, Hkv, T, D]
        slot_ids = self.blocks.slots(seq.block_table, 0, seq.num_staged_tokens)
        slots = self._tensor(slot_ids)
        for layer in range(k.shape[0]):
            self.cache.store(layer, slots, k[layer].transpose(0, 1), v[layer].transpose(0, 1))
        if self.on_admit_kv is not None:
            self.on_admit_kv(seq.request_id, slot_ids)

    def _take_prefix(self, seq: Sequence) -> KV | None:
        """A sequence's kept prefix K/V, on this device in the cache's dtype as [L, C, Hkv, D]
        each, for its prefill's attention; None without one. A LOCAL sequence's prefix also goes
        into its blocks (its decode reads it there); a PREFILL_ONLY one has no blocks (its K/V
        leaves for a decode service)."""
        if not seq.num_prefix_tokens:
            return None
        k, v = self._prefixes.pop(seq.seq_id)  # [L, Hkv, C, D]
        assert k.shape[2] == seq.num_prefix_tokens
        dtype = self.cache.k[0].dtype
        k, v = (t.to(device=self.device, dtype=dtype).transpose(1, 2) for t in (k, v))
        if seq.kind is Kind.LOCAL:
            slots = self._tensor(self.blocks.slots(seq.block_table, 0, k.shape[1]))
            for layer in range(k.shape[0]):
                self.cache.store(layer, slots, k[layer], v[layer])
        return k, v

    def _wait_for_device(self) -> None:
        """On a GPU, wait for the step's kernels so that its timestamps mean the compute's end
        (the sampling right after would wait for them anyway)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def prefill(self, seqs: list[Sequence]) -> RunnerOutput:
        """One packed forward over whole prompts. Samples a token for each sequence (index
        num_generated): a takeover or a recompute after preemption (prompt + generated tokens)
        gets its next token from this pass, without waiting for a decode step."""
        token_ids, positions, slots, store_rows, cu_seqlens, prefixes = [], [], [], [], [0], []
        for seq in seqs:
            ids = seq.token_ids
            prefix = self._take_prefix(seq)
            cached = 0 if prefix is None else prefix[0].shape[1]
            token_ids += ids[cached:]
            positions += range(cached, len(ids))
            if seq.kind is not Kind.PREFILL_ONLY:  # a prefill service's prompt K/V leaves, never stays
                slots += self.blocks.slots(seq.block_table, cached, len(ids))
                store_rows += range(cu_seqlens[-1], cu_seqlens[-1] + len(ids) - cached)
            cu_seqlens.append(cu_seqlens[-1] + len(ids) - cached)
            prefixes.append(prefix)
        batch = ForwardBatch(
            token_ids=self._tensor(token_ids),
            positions=self._tensor(positions),
            is_prefill=True,
            cu_seqlens=cu_seqlens,
            slot_mapping=self._tensor(slots) if slots else None,
            store_rows=None if len(store_rows) == len(token_ids) else self._tensor(store_rows),
            prefix_kv=prefixes,
        )
        hooks = [(self._hooks[seq.seq_id], cu_seqlens[i], cu_seqlens[i + 1])
                 for i, seq in enumerate(seqs) if seq.seq_id in self._hooks]
        batch.kv_routes = [dict(hook.route, rows=[start, end]) for hook, start, end in hooks
                           if getattr(hook, "route", None) is not None]

        layer_kv = PerSequenceLayerKV(self.device, hooks) if hooks else None  # each request's K/V: [Hkv, L, D]
        start_ns = time.time_ns()
        logits = self.forward(batch, self.cache, on_layer_kv=layer_kv)  # [B, V]
        if layer_kv is not None:
            layer_kv.drain()
        self._wait_for_device()
        end_ns = time.time_ns()
        return self._sample(seqs, logits, start_ns, end_ns)

    def decode(self, seqs: list[Sequence]) -> RunnerOutput:
        """Advance every sequence by one token (blocks for the new token already allocated)."""
        positions = [s.num_cached_tokens for s in seqs]
        token_ids = [s.last_token_id for s in seqs]
        slots = [self.blocks.slots(s.block_table, p, p + 1)[0] for s, p in zip(seqs, positions)]
        max_blocks = max(len(s.block_table) for s in seqs)
        start_ns = time.time_ns()
        if self.graphs is not None and self.graphs.fits(len(seqs), max_blocks):
            logits = self.graphs.run(token_ids, positions, slots, [s.block_table for s in seqs])
        else:
            host = torch.tensor([token_ids, positions, slots, [p + 1 for p in positions]])
            step = host.to(self.device, non_blocking=True)  # one copy for the four vectors
            block_tables = self._tensor([s.block_table + [0] * (max_blocks - len(s.block_table)) for s in seqs])
            batch = ForwardBatch(
                token_ids=step[0],
                positions=step[1],
                is_prefill=False,
                cu_seqlens=list(range(len(seqs) + 1)),
                slot_mapping=step[2],
                block_tables=block_tables,
                context_lens=step[3],
                max_context_len=max(positions) + 1,
                )
            logits = self.forward(batch, self.cache)  # [B, V]
        self._wait_for_device()
        end_ns = time.time_ns()
        return self._sample(seqs, logits, start_ns, end_ns)

    def _sample(self, seqs: list[Sequence], logits: torch.Tensor, start_ns: int, end_ns: int) -> RunnerOutput:
        """Each sequence's next token from its logits row. One batched argmax on the
        device serves every greedy sequence: only the token ids cross to the host. Seeded
        sampling runs on the host, on that sequence's row alone: its draw is then the same
        whichever device computed the logits, so a request that moves between a GPU engine and
        a CPU one keeps its text."""
        greedy = logits.argmax(dim=-1).tolist()
        failed: dict[int, str] = {}
        sampled: list[int | None] = [
            greedy[i] if seq.sampling.is_greedy else _sample_one(logits[i].cpu(), seq, failed)
            for i, seq in enumerate(seqs)
        ]
        return RunnerOutput(sampled, start_ns, end_ns, failed)


def _sample_one(logits: torch.Tensor, seq: Sequence, failed: dict[int, str]) -> int | None:
    """Sample seq's next token from its logits [V]. Sampling is per sequence, so a failure here
    (non-finite logits, say) is that sequence's alone: it goes into failed[seq_id] and the
    rest of the batch carries on."""
    try:
        return sample(logits, seq.sampling, index=seq.num_generated)
    except Exception as e:  # noqa: BLE001 - any error of this one draw ends this one sequence
        failed[seq.seq_id] = f"sampling failed: {type(e).__name__}: {e}"
        return None
