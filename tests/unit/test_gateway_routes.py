"""The gateway's router and request pipeline without any gRPC: a real Router fed hand-made
monitor tables, a fake upstream (engine services) and a character tokenizer.

What they check: a request that finds no route waits for the monitor's next table instead of
failing; it fails with Unavailable, naming the wait, when none comes within route_wait_s;
the gateway's readiness follows whether a route exists; a request that lost its only
service mid-stream waits and goes on where it stopped once the monitor sees that service back.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from edgellm import config as cfg
from edgellm.v1 import common_pb2, monitor_pb2
from services.gateway.errors import InvalidRequest, Unavailable
from services.gateway.liveness import LivenessProber
from services.gateway.migration import Migrator
from services.gateway.pipeline import Pipeline
from services.gateway.pools import Pools
from services.gateway.request import Finished, GenerateInput, TextDelta
from services.gateway.router import NoRoute, Router
from services.gateway.upstream import PathFailed

P, D = common_pb2.SERVICE_ROLE_PREFILL, common_pb2.SERVICE_ROLE_DECODE
PREFILL, DECODE = "prefill:1", "decode:1"


def table(version: int, *healthy: str) -> monitor_pb2.RouteTable:
    """The monitor's table for one prefill and one decode service, `healthy` of them up."""
    prefills = [a for a in (PREFILL,) if a in healthy]
    decodes = [a for a in (DECODE,) if a in healthy]
    mode = (monitor_pb2.ROUTE_MODE_NORMAL if prefills and decodes else
            monitor_pb2.ROUTE_MODE_NO_PREFILL if decodes else monitor_pb2.ROUTE_MODE_DEGRADED)
    return monitor_pb2.RouteTable(
        version=version, mode=mode, prefill_addresses=prefills, decode_addresses=decodes,
        services=[monitor_pb2.ServiceState(address=a, role=r, healthy=a in healthy)
                  for a, r in ((PREFILL, P), (DECODE, D))],
    )


def gateway_config(**overrides) -> cfg.GatewayConfig:
    return dataclasses.replace(cfg.parse([], env={}).gateway, **overrides)


class CharTokenizer:
    """One token per character (token id = code point)."""

    chat_template = None

    def __call__(self, text: str) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


class FakeUpstream:
    """Each attempt streams the answer on from where the request stands; `fail_after` makes the
    first attempt fail with a stream error after that many tokens."""

    def __init__(self, answer: str, fail_after: int | None = None) -> None:
        self.answer = [ord(c) for c in answer]
        self.fail_after = fail_after
        self.routes = []
        self.prober = LivenessProber(None, after_ms=0, timeout_ms=1)  # never probes: no channels here

    async def attempt(self, req, route, attempt):
        self.routes.append(route)
        for i in range(len(req.generated), len(self.answer)):
            if attempt == 1 and i == self.fail_after:
                raise PathFailed(route.decode or route.prefill, "stream_error", "UNAVAILABLE: gone")
            yield self.answer[i], "stop" if i == len(self.answer) - 1 else None


def pipeline(router: Router, upstream: FakeUpstream, **config) -> Pipeline:
    gw = gateway_config(**config)
    pools = Pools(gw.max_queued_requests, gw.max_inflight_prefills)
    return Pipeline(CharTokenizer(), 2048, pools, Migrator(router, pools, upstream, gw), gw)


async def run(p: Pipeline, prompt: str = "Hi", **kw) -> list:
    return [e async for e in p.generate(GenerateInput(prompt=prompt, **kw), timeout_s=30)]


def text_of(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


async def test_router_has_no_route_until_the_monitors_first_table():
    router = Router()
    assert not router.has_route()
    with pytest.raises(NoRoute):
        router.pick(lambda decodes, t: decodes[0])
    router.apply(table(1))  # the engines still load: nothing healthy
    assert not router.has_route()
    router.apply(table(2, PREFILL, DECODE))
    route = router.pick(lambda decodes, t: decodes[0])
    assert (route.prefill, route.decode) == (PREFILL, DECODE)


async def test_a_request_waits_for_a_route_and_proceeds_when_a_table_brings_one():
    router = Router()
    upstream = FakeUpstream("sea")
    request = asyncio.create_task(run(pipeline(router, upstream, route_wait_s=30)))
    await asyncio.sleep(0.1)
    assert not request.done()  # waiting, not failed
    router.apply(table(1))  # a table with no healthy service: still waiting
    await asyncio.sleep(0.1)
    assert not request.done() and not upstream.routes
    router.apply(table(2, PREFILL, DECODE))
    events = await asyncio.wait_for(request, 5)
    assert text_of(events) == "sea"
    assert isinstance(events[-1], Finished) and events[-1].finish_reason == "stop"
    assert events[-1].usage.completion_tokens == 3


async def test_no_table_within_route_wait_s_is_unavailable_naming_the_wait():
    p = pipeline(Router(), FakeUpstream("sea"), route_wait_s=0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(Unavailable) as e:
        await run(p)
    assert 0.2 <= loop.time() - started < 2
    assert "no healthy prefill or decode service" in e.value.message and "route-wait-s=0.2" in e.value.message


async def test_the_requests_own_deadline_ends_the_wait_sooner():
    p = pipeline(Router(), FakeUpstream("sea"), route_wait_s=30)
    with pytest.raises(Unavailable) as e:
        [_ async for _ in p.generate(GenerateInput(prompt="Hi"), timeout_s=0.2)]
    assert "deadline" in e.value.message


async def test_invalid_requests_fail_before_any_wait():
    p = pipeline(Router(), FakeUpstream("sea"), route_wait_s=30)
    with pytest.raises(InvalidRequest, match="exactly one of prompt or messages"):
        await asyncio.wait_for(run(p, prompt=""), 1)


async def test_readiness_follows_whether_a_route_exists():
    router = Router()
    readiness = router.readiness()
    assert await anext(readiness) is False
    router.apply(table(1))
    router.apply(table(2, PREFILL))  # degraded still routes (the prefill service decodes)
    assert await asyncio.wait_for(anext(readiness), 1) is True
    router.apply(table(3, PREFILL, DECODE))  # still a route: no change to report
    router.apply(table(4))
    assert await asyncio.wait_for(anext(readiness), 1) is False


async def test_a_request_that_lost_its_only_service_waits_and_resumes_when_it_is_back():
    router = Router()
    router.apply(table(1, PREFILL))  # degraded: the prefill service runs whole requests
    upstream = FakeUpstream("river", fail_after=2)
    request = asyncio.create_task(run(pipeline(router, upstream, route_wait_s=30)))
    await asyncio.sleep(0.1)
    assert not request.done()  # the prefill service failed it and is avoided: no route, waiting
    router.apply(table(2))  # the monitor marks it down ...
    router.apply(table(3, PREFILL))  # ... and up again: the request may use it again
    events = await asyncio.wait_for(request, 5)
    assert text_of(events) == "river"  # no gap, no repeat
    assert [r.prefill for r in upstream.routes] == [PREFILL, PREFILL]
