"""The per-caller request and token buckets (services/gateway/rate_limit.py), on a hand-driven clock."""

from __future__ import annotations

import pytest

from services.gateway.errors import RateLimited
from services.gateway.rate_limit import PRUNE_EVERY, RateLimiter
from services.gateway.request import Caller


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_off_admits_everything_and_keeps_no_state():
    limiter = RateLimiter(0, 0, Clock())
    for _ in range(10_000):
        limiter.admit("a")
    limiter.charge("a", 10**9)
    assert not limiter.enabled and limiter.num_callers == 0


def test_requests_per_minute_refill_continuously():
    clock = Clock()
    limiter = RateLimiter(rpm=3, tpm=0, clock=clock)
    for _ in range(3):
        limiter.admit("a")
    with pytest.raises(RateLimited) as e:
        limiter.admit("a")
    assert e.value.limit == "rate_limit_rpm"
    assert e.value.headers["retry-after"] == "20"  # one request back every 60/3 s
    assert e.value.headers["x-ratelimit-limit-requests"] == "3"
    assert e.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-limit-tokens" not in e.value.headers  # that limit is off
    clock.now += 19.9
    with pytest.raises(RateLimited):
        limiter.admit("a")
    clock.now += 0.1
    limiter.admit("a")


def test_a_refused_request_takes_nothing():
    clock = Clock()
    limiter = RateLimiter(rpm=1, tpm=0, clock=clock)
    limiter.admit("a")
    for _ in range(5):
        with pytest.raises(RateLimited):
            limiter.admit("a")
    clock.now += 60
    limiter.admit("a")  # the refusals did not push the budget further into the future


def test_tokens_are_admitted_while_any_budget_is_left_and_debt_is_waited_out():
    clock = Clock()
    limiter = RateLimiter(rpm=0, tpm=60, clock=clock)  # one token per second
    limiter.admit("a")
    limiter.charge("a", 50)  # prompt
    limiter.admit("a")  # 10 left: admitted, size unknown up front
    limiter.charge("a", 40)  # 30 in debt
    with pytest.raises(RateLimited) as e:
        limiter.admit("a")
    assert e.value.limit == "rate_limit_tpm"
    assert e.value.headers["retry-after"] == "31"  # back above zero: 30 s of debt, then one token
    assert e.value.headers["x-ratelimit-remaining-tokens"] == "0"
    assert e.value.headers["x-ratelimit-reset-tokens"] == "90.000s"  # until full again
    clock.now += 30.5
    limiter.admit("a")


def test_callers_have_separate_budgets():
    limiter = RateLimiter(rpm=1, tpm=10, clock=Clock())
    limiter.admit("a")
    limiter.charge("a", 100)
    with pytest.raises(RateLimited):
        limiter.admit("a")
    limiter.admit("b")
    assert limiter.budget("b").remaining_tokens == 10


def test_budget_of_a_new_caller_is_full_and_the_buckets_never_exceed_a_minute():
    clock = Clock()
    limiter = RateLimiter(rpm=5, tpm=100, clock=clock)
    limiter.admit("a")
    clock.now += 3600
    budget = limiter.budget("a")
    assert (budget.remaining_requests, budget.remaining_tokens) == (5, 100)
    assert budget.reset_requests_s == budget.reset_tokens_s == 0.0
    assert "retry-after" not in budget.headers()


def test_full_buckets_are_pruned_so_one_off_callers_do_not_pile_up():
    clock = Clock()
    limiter = RateLimiter(rpm=100, tpm=0, clock=clock)
    for i in range(PRUNE_EVERY - 1):
        limiter.admit(f"addr:{i}")
    assert limiter.num_callers == PRUNE_EVERY - 1
    clock.now += 60  # every bucket back to full
    limiter.admit("addr:last")
    assert limiter.num_callers == 1


def test_negative_limits_are_refused():
    with pytest.raises(ValueError):
        RateLimiter(-1, 0)


def test_a_caller_is_its_key_fingerprint_or_else_its_address():
    keyed = Caller.of("sk-secret", "10.0.0.1")
    assert "sk-secret" not in keyed.id and "sk-secret" not in keyed.key_label
    assert keyed == Caller.of("sk-secret", "10.0.0.2")  # one budget per key, wherever it comes from
    assert len(keyed.key_label) == 12
    anonymous = Caller.of("", "10.0.0.1")
    assert anonymous.id == "addr:10.0.0.1" and anonymous.key_label == "-"
    assert anonymous != Caller.of("", "10.0.0.2")
