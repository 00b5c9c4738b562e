"""Who owns what when a phase spans several devices: pure arithmetic, no torch.

Tensor parallelism splits attention by heads and the MLP by its intermediate channels.
KV-head groups stay whole (a query head and the KV head it reads live on the same rank), so
the counts need not divide evenly: SmolLM2's 9 query / 3 KV heads over 2 ranks give
(6 q, 2 kv) and (3 q, 1 kv). Pipeline parallelism gives each stage a contiguous range of layers.
"""

from __future__ import annotations

from dataclasses import dataclass


def split_evenly(total: int, parts: int) -> list[tuple[int, int]]:
    """[start, end) of each part; the first `total % parts` parts get one more."""
    if not 1 <= parts <= total:
        raise ValueError(f"cannot split {total} into {parts} non-empty parts")
    base, extra = divmod(total, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


@dataclass(frozen=True)
class HeadShard:
    """One tensor-parallel rank's share of a layer: query heads, KV heads, MLP channels."""

    q_heads: tuple[int, int]
    kv_heads: tuple[int, int]
    mlp: tuple[int, int]

    @property
    def num_q_heads(self) -> int:
        return self.q_heads[1] - self.q_heads[0]

    @property
    def num_kv_heads(self) -> int:
        return self.kv_heads[1] - self.kv_heads[0]


def tp_shards(num_heads: int, num_kv_heads: int, intermediate_size: int, world: int) -> list[HeadShard]:
    """Each rank's heads and MLP channels. KV heads are split as evenly as they go and each takes
    its group of query heads along; a rank needs at least one KV head."""
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not form groups over {num_kv_heads} KV heads")
    if world > num_kv_heads:
        raise ValueError(f"prefill_tp={world} is more ranks than the model's {num_kv_heads} KV heads "
                         "(KV-head groups are kept whole)")
    group = num_heads // num_kv_heads
    return [HeadShard((a * group, b * group), (a, b), mlp)
            for (a, b), mlp in zip(split_evenly(num_kv_heads, world), split_evenly(intermediate_size, world))]


def stage_layers(num_layers: int, num_stages: int, layer_bytes: list[int] | None = None,
                 first_stage_bytes: int = 0) -> list[tuple[int, int]]:
    """[start, end) of the layers each pipeline stage owns, contiguous. With layer_bytes (each
    layer's weight bytes) and first_stage_bytes (what stage 0 holds besides its layers: the
    embedding and the LM head) the split makes the largest stage as small as it can be; without,
    the layers are split evenly (the first stages take one more)."""
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"decode_stages={num_stages} must be between 1 and the model's {num_layers} layers")
    if layer_bytes is None:
        return split_evenly(num_layers, num_stages)
    # best[k][i]: the smallest largest-stage bytes putting layers [0, i) on stages 0..k-1 (each
    # non-empty); a few dozen layers and stages, so the plain O(k n^2) table is instant
    prefix = [0]
    for b in layer_bytes:
        prefix.append(prefix[-1] + b)
    inf = float("inf")
    best = [[inf] * (num_layers + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = 0
    for k in range(1, num_stages + 1):
        for i in range(k, num_layers + 1):
            for j in range(k - 1, i):
                stage = prefix[i] - prefix[j] + (first_stage_bytes if k == 1 else 0)
                cost = max(best[k - 1][j], stage)
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds, end = [], num_layers
    for k in range(num_stages, 0, -1):
        start = cut[k][end]
        bounds.append((start, end))
        end = start
    return bounds[::-1]
