"""A pipeline stage's share of the model, and how a stage k >= 1 runs one micro-batch.

keep_stage_layers turns a loaded LlamaModel into one stage's: layers [start, end) only; stage 0
also keeps the embedding, the final norm and the LM head (the last stage hands its hidden states
back to stage 0, which samples). The head sits with the embedding rather than on the last stage
because on the default model they are one table (tied; the INT4 embedding reads the INT4 head):
on two stages a copy on each would leave each stage 0.61 of the weights. stage_plan balances the
layers by weight bytes around that table (SmolLM2 at 2 stages: 11 + 19 layers, about half the
bytes each), which also balances the compute: the head's matmul costs stage 0 about 8 layers.
What a stage does not own is dropped before its KV cache is built. Layers are renumbered from 0
inside a stage: its cache holds only its own layers.

StageRunner is stage k's engine: it owns the stage's model and paged cache, copies claimed
prompt KV of newly admitted FROM_KV requests into the slots stage 0 names, and runs each
StageStep's layers. Stage 0 is the scheduler; a stage k only follows its slot numbers.
"""

from __future__ import annotations

import torch
from torch import nn

from edgellm.engine.kv_cache import ForwardBatch, PagedKVCache
from edgellm.engine.model import LlamaModel, weight_bytes
from edgellm.parallel import wire
from edgellm.parallel.layout import stage_layers
from edgellm.v1 import decode_stage_pb2

KV = tuple[torch.Tensor, torch.Tensor]  # K, V of this stage's layers: [L_stage, Hkv, T, D] each


def stage_plan(model: LlamaModel, num_stages: int) -> list[tuple[int, int]]:
    """Every stage's layers [start, end), stage 0 first, balanced by weight bytes: stage 0 also
    holds the embedding and the LM head. Every stage computes it from the same whole model."""
    layer_bytes = [weight_bytes(layer) for layer in model.layers]
    return stage_layers(len(layer_bytes), num_stages, layer_bytes, model.weight_bytes() - sum(layer_bytes))


def keep_stage_layers(model: LlamaModel, layers: tuple[int, int]) -> LlamaModel:
    """Drop in place every module stage `layers` = [start, end) does not own; returns the model."""
    start, end = layers
    if not 0 <= start < end <= model.arch.num_layers:
        raise ValueError(f"stage layers [{start}, {end}) are not inside the model's {model.arch.num_layers}")
    model.layers = nn.ModuleList(model.layers[start:end])
    if start > 0:
        model.embed_tokens = model.lm_head = None
    return model


class StageRunner:
    """Stage k >= 1: its model ([start, end) only) and its paged cache with stage 0's block count.
    Runs on one thread at a time (the stage servicer's executor)."""

    def __init__(self, model: LlamaModel, num_blocks: int, block_size: int) -> None:
        a = model.arch
        self.model = model
        dtype, self.device = model.norm.weight.dtype, model.norm.weight.device
        self.cache = PagedKVCache(len(model.layers), num_blocks, block_size, a.num_kv_heads, a.head_dim, dtype,
                                  self.device)

    def warm_up(self, num_tokens: int = 16) -> None:
        """A short prefill and a decode step over zero hidden states in the first blocks, so that the
        first real step does not pay for torch's lazy initialisation (stage 0 bounds every step)."""
        num_tokens = min(num_tokens, self.cache.block_size * self.cache.num_blocks - 1)
        dtype, none = self.model.norm.weight.dtype, torch.empty(0, dtype=torch.long)
        prefill = ForwardBatch(token_ids=none, positions=torch.arange(num_tokens), is_prefill=True,
                               cu_seqlens=[0, num_tokens], slot_mapping=torch.arange(num_tokens))
        decode = ForwardBatch(token_ids=none, positions=torch.tensor([num_tokens]), is_prefill=False,
                              cu_seqlens=[0, 1], slot_mapping=torch.tensor([num_tokens]),
                              block_tables=torch.arange(-(-(num_tokens + 1) // self.cache.block_size))[None],
                              context_lens=torch.tensor([num_tokens + 1]), max_context_len=num_tokens + 1)
        for batch, rows in ((prefill, num_tokens), (decode, 1)):
            on_device = ForwardBatch(**{name: value.to(self.device) if isinstance(value, torch.Tensor) else value
                                        for name, value in vars(batch).items()})
            hidden = torch.zeros(rows, self.model.arch.hidden_size, dtype=dtype, device=self.device)
            self.model(on_device, self.cache, hidden=hidden)

    def load_kv(self, kv: KV, slots: list[int]) -> None:
        """Copy a request's prompt K/V of this stage's layers into its slots (stage 0's block table)."""
        k, v = kv
        if len(slots) != k.shape[2]:
            raise ValueError(f"{len(slots)} slots for KV of {k.shape[2]} tokens")
        index = torch.tensor(slots, dtype=torch.long, device=self.device)
        for layer in range(k.shape[0]):
            self.cache.store(layer, index, k[layer].transpose(0, 1), v[layer].transpose(0, 1))

    def step(self, step: decode_stage_pb2.StageStep, loads: list[tuple[KV, list[int]]]) -> decode_stage_pb2.StageResult:
        """Load the micro-batch's admitted KV, run this stage's layers over its hidden states."""
        for kv, slots in loads:
            self.load_kv(kv, slots)
        batch = wire.batch_from_message(step, self.device)
        hidden = wire.tensor_from_proto(step.hidden, self.device).to(self.model.norm.weight.dtype)
        out = self.model(batch, self.cache, hidden=hidden)
        return wire.result_message(out)
