"""Where this prefill service may send KV: the decode services of the monitor's route table.

Anyone able to call Prefill names a `decode_address`; without this check the service would open
a channel to (and stream a prompt's KV to) any address it is given. The allowed set is every
decode service the monitor's latest table lists, healthy or not: a service marked down and back
up again stays allowed, and the gateway (which follows the same monitor) never races this
table when a service comes back. Before the first table has arrived a call waits for it, briefly.

A pipeline-parallel decode unit lists its stages in its load (Load.stages): each layer's KV
goes to the stage that owns it, so those stage addresses are allowed too, and `stages(address)`
says where each layer of that unit goes.
"""

from __future__ import annotations

import asyncio

from edgellm.v1 import common_pb2, monitor_pb2

FIRST_TABLE_WAIT_S = 5.0


class DecodeRoutes:
    def __init__(self, first_table_wait_s: float = FIRST_TABLE_WAIT_S) -> None:
        self.addresses: frozenset[str] = frozenset()  # decode services and their stages
        self._stages: dict[str, tuple] = {}  # decode service -> its Load.stages (empty: one engine)
        self._first_table_wait_s = first_table_wait_s
        self._applied = asyncio.Event()

    def apply(self, table: monitor_pb2.RouteTable) -> bool:
        """Take the decode services of `table`; True when the set changed."""
        decode = [s for s in table.services if s.role == common_pb2.SERVICE_ROLE_DECODE]
        self._stages = {s.address: tuple(s.load.stages) for s in decode}
        addresses = frozenset(s.address for s in decode) | {st.address for s in decode for st in s.load.stages}
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
        return address in self._stages

    def stages(self, address: str) -> tuple:
        """The stages (common_pb2.DecodeStage) of the decode unit at `address`; empty: one engine."""
        return self._stages.get(address, ())
