"""The hidden-state stream between decode stages: tensors and batch descriptions as StageStep /
StageResult messages, and back. Pure conversion, no I/O.

Stage 0 builds each ForwardBatch (slots, block tables: its bookkeeping) and sends it with the
hidden states after its layers; a later stage rebuilds the same ForwardBatch on its device and
runs its layers over the same slots of its own cache.
"""

from __future__ import annotations

import torch

from edgellm.engine.kv_cache import ForwardBatch
from edgellm.engine.weights import DTYPE_NAMES, TORCH_DTYPES
from edgellm.v1 import decode_stage_pb2


def tensor_to_proto(t: torch.Tensor) -> decode_stage_pb2.StageTensor:
    t = t.detach().contiguous().cpu()
    return decode_stage_pb2.StageTensor(dtype=DTYPE_NAMES[t.dtype], shape=list(t.shape),
                                        data=t.view(torch.uint8).numpy().tobytes())


def tensor_from_proto(p: decode_stage_pb2.StageTensor, device: torch.device | str = "cpu") -> torch.Tensor:
    if p.dtype not in TORCH_DTYPES:
        raise ValueError(f"unknown tensor dtype {p.dtype!r}")
    flat = torch.frombuffer(bytearray(p.data), dtype=TORCH_DTYPES[p.dtype]) if p.data else \
        torch.empty(0, dtype=TORCH_DTYPES[p.dtype])
    return flat.view(*p.shape).to(device)


def _ints(t: torch.Tensor | None) -> list[int]:
    return [] if t is None else t.reshape(-1).tolist()


def step_message(batch: ForwardBatch, hidden: torch.Tensor, step_id: int,
                 kv_loads: list[decode_stage_pb2.StageKVLoad] = ()) -> decode_stage_pb2.StageStep:
    """One micro-batch for the next stage: its description and hidden states [T, hidden_size]."""
    block_tables = batch.block_tables
    return decode_stage_pb2.StageStep(
        step_id=step_id,
        is_prefill=batch.is_prefill,
        positions=_ints(batch.positions),
        cu_seqlens=batch.cu_seqlens,
        slot_mapping=_ints(batch.slot_mapping),
        store_rows=_ints(batch.store_rows),
        block_tables=_ints(block_tables),
        max_blocks=0 if block_tables is None else block_tables.shape[1],
        context_lens=_ints(batch.context_lens),
        max_context_len=batch.max_context_len,
        hidden=tensor_to_proto(hidden),
        kv_loads=kv_loads,
    )


def batch_from_message(step: decode_stage_pb2.StageStep, device: torch.device) -> ForwardBatch:
    """The ForwardBatch stage 0 ran, on this stage's device (token ids stay with stage 0: the
    embedding is there)."""

    def tensor(values) -> torch.Tensor | None:
        return torch.tensor(list(values), dtype=torch.long, device=device) if len(values) else None

    positions = tensor(step.positions)
    block_tables = tensor(step.block_tables)
    return ForwardBatch(
        token_ids=torch.empty(0, dtype=torch.long, device=device),
        positions=positions if positions is not None else torch.empty(0, dtype=torch.long, device=device),
        is_prefill=step.is_prefill,
        cu_seqlens=list(step.cu_seqlens),
        slot_mapping=tensor(step.slot_mapping),
        store_rows=tensor(step.store_rows),
        block_tables=None if block_tables is None else block_tables.view(-1, step.max_blocks),
        context_lens=tensor(step.context_lens),
        max_context_len=step.max_context_len,
    )


def result_message(hidden: torch.Tensor) -> decode_stage_pb2.StageResult:
    """A stage's answer: the hidden states after its layers."""
    return decode_stage_pb2.StageResult(hidden=tensor_to_proto(hidden))
