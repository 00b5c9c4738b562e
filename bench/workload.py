"""What the benchmark sends: a fixed, seeded request distribution.

Short chat request (closed loop, Poisson, and the mix's short streams): one user message
drawn uniformly from the 16 PROMPTS (about 36 prompt tokens with SmolLM2's chat template and
system prompt), greedy (temperature 0), max_tokens drawn uniformly from SHORT_MAX_TOKENS =
[32, 64]; the mix's short streams send the same prompts with max_tokens 64. A request may
stop earlier at end-of-sequence (greedy, so each prompt always gives the same output).
Requests are drawn one after another with `random.Random(seed)`, so every level, rate and
stack of a run sends the same requests in the same order (a level with n requests sends
the first n).

Poisson arrivals: the gaps are seeded unit exponentials divided by the rate, so every
rate sees the same arrival pattern, scaled.

Long prompt (the mix's prefill-heavy requests): "Document i." followed by LONG_PROSE
repeated LONG_REPEATS times and an instruction to summarize, about 1,460 prompt tokens;
max_tokens LONG_MAX_TOKENS. The leading number makes every long prompt distinct.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

PROMPTS: tuple[str, ...] = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three uses for a paperclip.",
    "What is 17 times 23?",
    "Give me a short tip for learning a new language.",
    "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?",
    "Translate 'good morning' into Spanish and German.",
    "Write one sentence that starts a mystery story.",
    "What does a CPU do?",
    "Suggest a name for a friendly robot.",
    "How do I boil an egg?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "What are the primary colors?",
    "Write a Python function that adds two numbers.",
)
SHORT_MAX_TOKENS = (32, 64)  # inclusive range of a short request's max_tokens
MIX_SHORT_MAX_TOKENS = 64

LONG_PROSE = (  # 102 tokens with SmolLM2's tokenizer
    "The river town woke slowly in the autumn fog. Fishermen carried their nets down to the harbour "
    "while the baker opened his shutters and set the first loaves on the cooling racks. Children ran "
    "along the stone wall that kept the tide out of the market square, and an old ferry sounded its "
    "horn as it left for the islands across the bay. By noon the fog had lifted, the bells of the "
    "church rang twelve times, and the town went about its business as it had for three hundred years. "
)
LONG_REPEATS = 14
LONG_MAX_TOKENS = 4


@dataclass(frozen=True)
class BenchRequest:
    prompt: str  # the content of one user message
    max_tokens: int


def sample_requests(seed: int, num_requests: int, max_tokens: int | None = None) -> list[BenchRequest]:
    """The first `num_requests` short requests of the seeded sequence; `max_tokens` replaces the drawn one."""
    rng = random.Random(seed)
    drawn = [BenchRequest(rng.choice(PROMPTS), rng.randint(*SHORT_MAX_TOKENS)) for _ in range(num_requests)]
    return drawn if max_tokens is None else [BenchRequest(r.prompt, max_tokens) for r in drawn]


def long_request(index: int) -> BenchRequest:
    prompt = f"Document {index}. " + LONG_PROSE * LONG_REPEATS + "Summarize the text above in one sentence."
    return BenchRequest(prompt, LONG_MAX_TOKENS)


def arrival_times(seed: int, num_requests: int, rate_per_s: float) -> list[float]:
    """Seconds from the start at which each request of a Poisson process with this rate arrives."""
    rng = random.Random(seed)
    return list(itertools.accumulate(rng.expovariate(1.0) / rate_per_s for _ in range(num_requests)))
