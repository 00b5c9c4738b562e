"""How a request wants its tokens drawn: plain values, no torch (sampling.py draws them).

The one rule set for sampling values: the gateway validates a client's request by building
one, and every internal door (Prefill, Decode, GenerateLocal) builds one from the request's
spec, so a value the engine cannot sample with never reaches an engine step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# temperature is 0 (greedy) or in [MIN_TEMPERATURE, MAX_TEMPERATURE]: below 1e-3 logits / t
# overflows fp32 to inf (and a subnormal to NaN); above 100 the distribution is uniform anyway.
MIN_TEMPERATURE = 1e-3
MAX_TEMPERATURE = 100.0
MAX_SEED = 2**64 - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 0 or 1 = off
    top_k: int = 0  # 0 = off
    seed: int = 0

    def __post_init__(self) -> None:
        t = self.temperature
        if not math.isfinite(t) or not (t == 0 or MIN_TEMPERATURE <= t <= MAX_TEMPERATURE):
            raise ValueError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE:g}, {MAX_TEMPERATURE:g}], got {t!r}")
        if not math.isfinite(self.top_p) or not 0 <= self.top_p <= 1:
            raise ValueError(f"top_p must be a finite number in [0, 1], got {self.top_p!r}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2^64), got {self.seed}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0
