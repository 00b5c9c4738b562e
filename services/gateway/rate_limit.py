"""Per-caller request and token budgets (`--rate-limit-rpm`, `--rate-limit-tpm`), shared by every front end.

A caller is an API key (by its fingerprint), or a client address when the gateway has no keys.
Each caller has two token buckets that refill continuously at their limit per minute and hold
at most one minute's worth:
  requests  a request takes one; one that finds less than one is refused.
  tokens    a request is admitted while the bucket is above zero; its prompt tokens are taken
            once it has its prefill slot and its completion tokens as it ends (however it
            ends: finished, stopped, cancelled, failed), so the bucket may go below
            zero (a request's size is not known up front): the caller then waits until it has
            refilled above zero.
`admit` either takes a request or raises RateLimited (errors.py) with the facts a client needs
(limits, what is left, when it refills, how long to wait), spelled by `Budget.headers()` as the
`retry-after` and `x-ratelimit-*` headers that HTTP sends and gRPC puts in trailing metadata.

Plain bookkeeping over floats: the clock is passed in (time.monotonic by default), so the unit
tests drive it by hand. Buckets of callers who are back to full are dropped now and then, so
many one-off client addresses cannot grow the table without bound.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

from services.gateway.errors import RateLimited

PRUNE_EVERY = 1024  # admits between two sweeps of full buckets


@dataclass
class Bucket:
    """Refills at `limit` per minute up to `limit`; `level` may go below zero (debt)."""

    limit: int
    level: float
    updated_at: float

    @property
    def rate_per_s(self) -> float:
        return self.limit / 60.0

    def refill(self, now: float) -> None:
        self.level = min(float(self.limit), self.level + (now - self.updated_at) * self.rate_per_s)
        self.updated_at = now

    def seconds_until(self, level: float) -> float:
        """How long until the bucket holds `level` (0 when it already does)."""
        return max(0.0, (level - self.level) / self.rate_per_s)

    @property
    def is_full(self) -> bool:
        return self.level >= self.limit


@dataclass(frozen=True)
class Budget:
    """A caller's standing against one or both limits (a limit of 0 is off and left out)."""

    limit_requests: int
    remaining_requests: int
    reset_requests_s: float  # until the request bucket is full again
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_s: float
    retry_after_s: float = 0.0  # > 0 on a refusal: when the request would be admitted

    def headers(self) -> dict[str, str]:
        """OpenAI's rate-limit headers (lower case, so they are valid gRPC metadata keys too)."""
        out: dict[str, str] = {}
        if self.limit_requests:
            out |= {"x-ratelimit-limit-requests": str(self.limit_requests),
                    "x-ratelimit-remaining-requests": str(self.remaining_requests),
                    "x-ratelimit-reset-requests": f"{self.reset_requests_s:.3f}s"}
        if self.limit_tokens:
            out |= {"x-ratelimit-limit-tokens": str(self.limit_tokens),
                    "x-ratelimit-remaining-tokens": str(self.remaining_tokens),
                    "x-ratelimit-reset-tokens": f"{self.reset_tokens_s:.3f}s"}
        if self.retry_after_s > 0:
            out["retry-after"] = str(max(1, math.ceil(self.retry_after_s)))
        return out


class RateLimiter:
    """The budgets of every caller of one gateway process (used from its event loop only)."""

    def __init__(self, rpm: int, tpm: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rpm < 0 or tpm < 0:
            raise ValueError("rpm and tpm must be >= 0 (0 = off)")
        self.rpm, self.tpm, self.clock = rpm, tpm, clock
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}
        self._num_admits = 0

    @property
    def enabled(self) -> bool:
        return bool(self.rpm or self.tpm)

    def _bucket(self, table: dict[str, Bucket], limit: int, caller: str, now: float) -> Bucket | None:
        if not limit:
            return None
        bucket = table.get(caller)
        if bucket is None:
            bucket = table[caller] = Bucket(limit, float(limit), now)
        else:
            bucket.refill(now)
        return bucket

    def budget(self, caller: str, retry_after_s: float = 0.0) -> Budget:
        """The caller's standing now (full buckets for a caller not seen yet)."""
        now = self.clock()
        req = self._bucket(self._requests, self.rpm, caller, now)
        tok = self._bucket(self._tokens, self.tpm, caller, now)
        return Budget(
            limit_requests=self.rpm,
            remaining_requests=max(0, math.floor(req.level)) if req else 0,
            reset_requests_s=req.seconds_until(req.limit) if req else 0.0,
            limit_tokens=self.tpm,
            remaining_tokens=max(0, math.floor(tok.level)) if tok else 0,
            reset_tokens_s=tok.seconds_until(tok.limit) if tok else 0.0,
            retry_after_s=retry_after_s,
        )

    def admit(self, caller: str) -> None:
        """Take one request from the caller's budget, or raise RateLimited (taking nothing)."""
        if not self.enabled:
            return
        now = self.clock()
        self._num_admits += 1
        if self._num_admits % PRUNE_EVERY == 0:
            self._prune(now)
        req = self._bucket(self._requests, self.rpm, caller, now)
        tok = self._bucket(self._tokens, self.tpm, caller, now)
        if req is not None and req.level < 1:
            raise RateLimited(f"over the request budget of {self.rpm} requests per minute (rate_limit_rpm)",
                              "rate_limit_rpm", self.budget(caller, req.seconds_until(1)).headers())
        if tok is not None and tok.level <= 0:
            wait = tok.seconds_until(0) + 1 / tok.rate_per_s  # above zero: at least one token back
            raise RateLimited(f"over the token budget of {self.tpm} tokens per minute (rate_limit_tpm)",
                              "rate_limit_tpm", self.budget(caller, wait).headers())
        if req is not None:
            req.level -= 1

    def charge(self, caller: str, num_tokens: int) -> None:
        """Take tokens a request used (its prompt, then its completion) from the caller's token budget."""
        if not self.tpm or num_tokens <= 0:
            return
        bucket = self._bucket(self._tokens, self.tpm, caller, self.clock())
        bucket.level -= num_tokens

    def _prune(self, now: float) -> None:
        for table in (self._requests, self._tokens):
            for caller, bucket in list(table.items()):
                bucket.refill(now)
                if bucket.is_full:
                    del table[caller]

    @property
    def num_callers(self) -> int:
        return len(self._requests.keys() | self._tokens.keys())
