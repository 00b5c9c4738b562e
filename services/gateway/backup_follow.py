"""Keep a request's hot backup close behind its stream (issue 18).

The prefill service that prefilled a request keeps its prompt's K/V (services/prefill/backup.py).
When the decode service fails, the takeover reuses it and recomputes only the tokens streamed
since: 16 streams x 32 tokens took about 2 s on one core, most of a recovery. So while a request
streams on a split route, every --backup-follow-tokens tokens its prefill service is asked to
extend that K/V with the new tokens (ExtendBackup): a takeover then recomputes at most that many
per stream. Only while no prompt waits for a prefill slot, and one extension per request at a
time: it uses prefill capacity new prompts are not asking for. Failures only cost the speed-up.
"""

from __future__ import annotations

import asyncio

import grpc
import structlog

from services.gateway.pools import Pools
from services.gateway.request import Request
from services.gateway.upstream import Upstream

log = structlog.get_logger(__name__)


class BackupFollower:
    """One request's extensions; cancel() when the request or its split route ends."""

    def __init__(self, upstream: Upstream, pools: Pools, every_tokens: int) -> None:
        self.upstream, self.pools, self.every_tokens = upstream, pools, every_tokens
        self._kept = 0  # tokens (prompt + streamed) the prefill service has confirmed keeping
        self._task: asyncio.Task | None = None

    def after_token(self, req: Request, prefill_address: str) -> None:
        """Called once each streamed token is in req.generated."""
        if not self.every_tokens or (self._task is not None and not self._task.done()):
            return
        num_tokens = len(req.prompt_token_ids) + len(req.generated)
        if num_tokens - max(self._kept, len(req.prompt_token_ids)) < self.every_tokens:
            return
        if self.pools.num_prefill_waiting:  # new prompts first
            return
        self._task = asyncio.ensure_future(self._extend(req, prefill_address))

    async def _extend(self, req: Request, prefill_address: str) -> None:
        try:
            self._kept = await self.upstream.extend_backup(req, prefill_address)
        except grpc.aio.AioRpcError as e:  # the takeover just recomputes more
            log.debug("backup_extension_failed", prefill=prefill_address, code=e.code().name)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()
