"""Which services are up, with hysteresis, and the route table that follows from it.

Plain bookkeeping, no I/O: the checker feeds `record(address, ok)`; a service goes down
after `down_after` consecutive failures and comes back after `up_after` consecutive
successes (a service not seen yet comes up on its first success). Every change of the resulting table bumps its version.
Mode: NORMAL while at least one decode and one prefill service are up; DEGRADED (prefill
decodes too) when no decode service is; NO_PREFILL (decode prefills too) when no prefill
service is; COLOCATED when no decode service is configured (the baseline deployment).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from edgellm.v1 import common_pb2, monitor_pb2


@dataclass
class ServiceHealth:
    address: str
    role: int  # common_pb2.ServiceRole
    healthy: bool = False
    seen: bool = False  # a service never seen up counts as up on its first good check (start-up)
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    last_change_unix_ms: int = 0
    load: common_pb2.Load | None = None


class Registry:
    def __init__(self, services: list[tuple[str, int]], down_after: int, up_after: int) -> None:
        now = int(time.time() * 1000)
        self.services = {addr: ServiceHealth(addr, role, last_change_unix_ms=now) for addr, role in services}
        self.down_after, self.up_after = down_after, up_after
        self.version = 1

    def record(self, address: str, ok: bool) -> bool:
        """Feed one check result; True when the route table changed."""
        s = self.services[address]
        if ok:
            s.consecutive_failures = 0
            s.consecutive_successes += 1
            flip = not s.healthy and (not s.seen or s.consecutive_successes >= self.up_after)
            s.seen = True
        else:
            s.consecutive_successes = 0
            s.consecutive_failures += 1
            flip = s.healthy and s.consecutive_failures >= self.down_after
        if flip:
            s.healthy = not s.healthy
            s.last_change_unix_ms = int(time.time() * 1000)
            self.version += 1
        return flip

    def healthy(self, role: int) -> list[str]:
        return [s.address for s in self.services.values() if s.role == role and s.healthy]

    @property
    def mode(self) -> int:
        if not any(s.role == common_pb2.SERVICE_ROLE_DECODE for s in self.services.values()):
            return monitor_pb2.ROUTE_MODE_COLOCATED
        if not self.healthy(common_pb2.SERVICE_ROLE_DECODE):
            return monitor_pb2.ROUTE_MODE_DEGRADED
        if not self.healthy(common_pb2.SERVICE_ROLE_PREFILL):
            return monitor_pb2.ROUTE_MODE_NO_PREFILL
        return monitor_pb2.ROUTE_MODE_NORMAL

    def table(self) -> monitor_pb2.RouteTable:
        return monitor_pb2.RouteTable(
            version=self.version,
            mode=self.mode,
            prefill_addresses=self.healthy(common_pb2.SERVICE_ROLE_PREFILL),
            decode_addresses=self.healthy(common_pb2.SERVICE_ROLE_DECODE),
            services=[
                monitor_pb2.ServiceState(
                    address=s.address,
                    role=s.role,
                    healthy=s.healthy,
                    consecutive_failures=s.consecutive_failures,
                    last_change_unix_ms=s.last_change_unix_ms,
                    load=s.load,
                )
                for s in self.services.values()
            ],
        )
