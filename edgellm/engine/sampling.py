"""Per-token sampling: greedy, temperature, top-k, top-p.

Token i of a request is drawn with a generator seeded from (seed, i). Any service that
samples position i (prefill for i = 0, decode afterwards, prefill again in degraded
mode) therefore draws the same token from the same logits: the seed, not a process's
generator state, is the sampling state.
"""

from __future__ import annotations

import torch

from edgellm.engine.sampling_params import SamplingParams

__all__ = ["SamplingParams", "sample"]


def _position_seed(seed: int, index: int) -> int:
    # splitmix64-style mixing: nearby (seed, index) pairs get unrelated streams.
    x = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def sample(logits: torch.Tensor, params: SamplingParams, index: int) -> int:
    """Pick token number `index` of a request from fp32 logits [vocab]."""
    if params.is_greedy:
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < params.top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop a token when the tokens before it already reach top_p (the first is always kept).
        drop = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    generator = torch.Generator().manual_seed(_position_seed(params.seed, index))
    return int(torch.multinomial(probs, 1, generator=generator))
