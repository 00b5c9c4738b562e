"""Route and migrate: the tokens of one request, from wherever the route table says.

Lifecycle of a request here, one attempt at a time:
  pick a route (router.py; with no route, wait for the monitor's next tables, up to the
  request's deadline or --route-wait-s) -> run the attempt (upstream.py) while watching the
  down signals of the services it depends on (the gateway's probes, liveness.py, and the
  monitor's verdicts) -> on the first token move the request from the prefill pool to the
  streaming service's decode pool -> stream.

When a service on its path fails (a stream error, an unanswered probe, or the monitor marking
it down, whichever comes first) the request is re-submitted elsewhere with prompt + streamed
tokens and num_generated set, so the client's stream goes on with no gap and no repeat. Where it goes:
another decode service (re-prefilled on a prefill service, which streams the KV there), or,
with no other decode service, the prefill service decodes too (degraded). A service that
failed this request is avoided by it until the monitor has seen it come back up. A damaged
KV stream (DATA_LOSS) is sent once more to the same decode service. `--migrate false` ends
such a request with Unavailable instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Callable

import structlog

from edgellm import metrics
from edgellm.config import GatewayConfig
from edgellm.v1 import monitor_pb2
from services.gateway.backup_follow import BackupFollower
from services.gateway.errors import Unavailable
from services.gateway.pools import Pools
from services.gateway.request import Request
from services.gateway.router import NoRoute, Route, Router
from services.gateway.upstream import PathFailed, Tokens, Upstream

log = structlog.get_logger(__name__)


class Migrator:
    def __init__(self, router: Router, pools: Pools, upstream: Upstream, cfg: GatewayConfig) -> None:
        self.router = router
        self.pools = pools
        self.upstream = upstream
        self.cfg = cfg

    async def tokens(self, req: Request) -> Tokens:
        """(token, finish_reason or None) for `req`, moving it when a service on its path fails.
        The caller appends each token to req.generated before asking for the next, and leaves
        req.decode_pool's pool (or the prefill pool while it is None) when done. Raises
        Unavailable (no route, or migration off) and UpstreamError."""
        failed_at: dict[str, int] = {}  # services that failed this request -> their up_count then
        resent = False
        path_failed_at = 0.0  # time.monotonic() of the last failure, for the `resumed` timings
        for attempt in itertools.count(1):
            route = await self._route(req, failed_at)
            routed_at = time.monotonic()
            if not route.is_split and self.router.mode != monitor_pb2.ROUTE_MODE_COLOCATED:
                metrics.DEGRADED_REQUESTS.labels("prefill" if route.decode is None else "decode").inc()
            log.info("routed", attempt=attempt, prefill=route.prefill, decode=route.decode, num_sent=len(req.generated))
            streaming = route.decode or route.prefill
            follower = BackupFollower(self.upstream, self.pools, self.cfg.backup_follow_tokens)
            try:
                attempt_tokens = self._until_down(self.upstream.attempt(req, route, attempt), route,
                                                  lambda a: self.router.has_route(self._avoid(failed_at) | {a}))
                async with contextlib.aclosing(attempt_tokens) as items:
                    async for item in items:
                        if req.decode_pool != streaming:
                            self._into_decode_pool(req, streaming)
                        if attempt > 1 and path_failed_at:  # a takeover's first token: where the stall went
                            now = time.monotonic()
                            log.info("resumed", attempt=attempt, to=streaming, num_sent=len(req.generated),
                                     route_wait_s=round(routed_at - path_failed_at, 4),
                                     takeover_s=round(now - routed_at, 4))
                            path_failed_at = 0.0
                        yield item
                        if route.is_split:  # the caller appended the token: the prefill service may keep up
                            follower.after_token(req, route.prefill)
                return
            except PathFailed as e:
                path_failed_at = time.monotonic()
                log.warning("path_failed", failed=e.failed, reason=e.reason, details=e.details,
                            num_sent=len(req.generated))
                if e.reason == "stream_error" and e.failed is not None:
                    metrics.FAILURES_DETECTED.labels("stream").inc()
                if not self.cfg.migrate:
                    raise Unavailable(f"generation failed upstream: {e.details}") from None
                if e.failed is None and resent:  # a second damaged KV stream: stop using that decode service
                    e.failed = route.decode
                resent = resent or e.failed is None
                if e.failed is not None:
                    failed_at[e.failed] = self.router.up_count[e.failed]
                to = "decode" if self.router.has_decode(self._avoid(failed_at)) else "prefill"
                metrics.MIGRATIONS.labels(e.reason, to).inc()
            finally:
                follower.cancel()

    def _avoid(self, failed_at: dict[str, int]) -> set[str]:
        """The services this request still avoids: those that failed it and have not come back up since."""
        return {a for a, n in failed_at.items() if self.router.up_count[a] == n}

    async def _route(self, req: Request, failed_at: dict[str, int]) -> Route:
        """A route now, or once the monitor's tables give one (start-up, a failover gap)."""
        wait_s = self.cfg.route_wait_s
        timeout = req.timeout()
        if timeout is not None and timeout < wait_s:
            wait_s, why = timeout, "until the request's deadline"
        else:
            why = f"for --route-wait-s={self.cfg.route_wait_s:g}"
        try:
            return await self.router.wait_pick(self.pools.pick_decode, lambda: self._avoid(failed_at), wait_s)
        except NoRoute as e:
            log.warning("no_route", waited_s=round(wait_s, 3), num_sent=len(req.generated))
            raise Unavailable(f"{e}: waited {wait_s:.1f} s ({why}) for one") from None

    def _into_decode_pool(self, req: Request, address: str) -> None:
        """First token: from the prefill pool to a decode pool; after a migration, to the new one."""
        if req.decode_pool is None:
            self.pools.leave_prefill()
        else:
            self.pools.leave_decode(req.decode_pool)
        self.pools.enter_decode(address)
        req.decode_pool = address

    async def _until_down(self, items: Tokens, route: Route, can_leave: Callable[[str], bool]) -> Tokens:
        """items, until a service the request depends on is found down: then PathFailed. A hung
        service (SIGSTOP, a cut link) keeps its TCP connection open and never fails a stream: the
        gateway's own probe (liveness.py) or the monitor finds it, whichever is first.
        On a split route the prefill service matters only until the first token. A probe's verdict
        (a live but starved service may miss one) moves the request only where can_leave(address)
        says another route is there; otherwise the stream goes on until it ends, errs or the
        monitor, which is slower to judge, marks that service down."""
        addresses = [a for a in (route.prefill, route.decode) if a is not None]
        verdicts = {asyncio.ensure_future(self.router.down_signal(a).wait()): (a, "monitor_verdict") for a in addresses}
        verdicts |= {asyncio.ensure_future(self.upstream.prober.dead_signal(a).wait()): (a, "probe_unanswered")
                     for a in addresses}
        step: asyncio.Future | None = None
        try:
            while True:
                if step is None:
                    step = asyncio.ensure_future(anext(items))
                done, _ = await asyncio.wait([step, *verdicts], return_when=asyncio.FIRST_COMPLETED)
                if step not in done:
                    signal = next(iter(done))
                    down, reason = verdicts.pop(signal)
                    if reason == "probe_unanswered" and not can_leave(down):
                        log.warning("probe_verdict_ignored", address=down, why="no other route for this request")
                        continue
                    if reason == "probe_unanswered":
                        raise PathFailed(down, reason, f"{down} stopped answering: a probe went unanswered for "
                                                       f"{self.upstream.prober.timeout_s:g} s")
                    raise PathFailed(down, reason, f"the monitor marked {down} down")
                try:
                    item = step.result()
                except StopAsyncIteration:
                    return
                step = None
                if route.is_split:  # the KV is at decode now: only decode matters
                    for signal in [f for f, (a, _) in verdicts.items() if a == route.prefill]:
                        signal.cancel()
                        del verdicts[signal]
                yield item
        finally:
            for signal in verdicts:
                signal.cancel()
            if step is not None and not step.done():
                step.cancel()  # cancels the upstream call
                await asyncio.wait([step])
            await items.aclose()
