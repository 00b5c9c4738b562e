"""Where this prefill service may send KV: the decode services of the monitor's route table.

Anyone able to call Prefill names a `decode_address`; without this check the service would open
a channel to (and stream a prompt's KV to) any address it is given. The allowed set is every
decode service the monitor's latest table lists, healthy or not: a service marked down and back
up again stays allowed, and the gateway (which follows the same monitor) never races this
table when a service comes back. Before the first table has arrived a call waits for it, briefly.
"""

from __future__ import annotations

import asyncio

from edgellm.v1 import common_pb2, monitor_pb2

FIRST_TABLE_WAIT_S = 5.0


class DecodeRoutes:
    def __init__(self, first_table_wait_s: float = FIRST_TABLE_WAIT_S) -> None:
        self.addresses: frozenset[str] = frozenset()
        self._first_table_wait_s = first_table_wait_s
        self._applied = asyncio.Event()

    def apply(self, table: monitor_pb2.RouteTable) -> bool:
        """Take the decode services of `table`; True when the set changed."""
        addresses = frozenset(s.address for s in table.services if s.role == common_pb2.SERVICE_ROLE_DECODE)
        changed = addresses != self.addresses
        self.addresses = addresses
        self._applied.set()
        return changed

    async def admits(self, address: str) -> bool:
        """Whether KV may go to `address` (waiting up to a few seconds for the monitor's first table)."""
        if not self._applied.is_set():
            try:
                await asyncio.wait_for(self._applied.wait(), self._first_table_wait_s)
            except TimeoutError:
                return False
        return address in self.addresses
