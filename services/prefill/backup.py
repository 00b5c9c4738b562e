"""KV hot backup: the prompt K/V this prefill service computed, kept for a short time.

When a request's decode service fails, the gateway moves it here (degraded mode) with the
prompt and the tokens already streamed. With the prompt's K/V still here, the takeover
computes only the streamed tokens instead of the whole prompt again. While the request
decodes elsewhere, the gateway asks this service now and then to extend the entry with the
tokens streamed since (ExtendBackup, --backup-follow-tokens): a takeover then recomputes only
the few tokens after the last extension. Entries are keyed by the gateway's request id (an
attempt's upstream id is `<id>/<n>`), used only when the new request's tokens start with
exactly the kept ones, dropped after `ttl_s` without use or extension, and the oldest go first
when they would take more than `max_bytes`.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import torch


@dataclass
class KeptPrompt:
    token_ids: list[int]
    k: torch.Tensor  # [L, Hkv, P, D]
    v: torch.Tensor
    expires_at: float

    @property
    def num_bytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


def base_request_id(request_id: str) -> str:
    return request_id.split("/", 1)[0]


class PromptKVBackup:
    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self._entries: collections.OrderedDict[str, KeptPrompt] = collections.OrderedDict()
        self.num_bytes = 0
        self.hits = 0
        self.extensions = 0  # ExtendBackup calls that added tokens

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def put(self, request_id: str, token_ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        entry = KeptPrompt(list(token_ids), k, v, time.monotonic() + self.ttl_s)
        if not self.enabled or entry.num_bytes > self.max_bytes:
            return
        self._drop(base_request_id(request_id))
        self._entries[base_request_id(request_id)] = entry
        self.num_bytes += entry.num_bytes
        self._expire()
        while self.num_bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def get(self, request_id: str, token_ids: list[int], count_hit: bool = True,
            ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The kept K/V of this request's first tokens ([L, Hkv, C, D] each), if token_ids starts
        with exactly those tokens. At most len(token_ids) - 1 of them: a prefill computes at least
        the last token (its logits give the next one)."""
        self._expire()
        entry = self._entries.get(base_request_id(request_id))
        if entry is None or list(token_ids[: len(entry.token_ids)]) != entry.token_ids:
            return None
        num_kept = min(len(entry.token_ids), len(token_ids) - 1)
        if num_kept < 1:
            return None
        self.hits += count_hit
        return entry.k[:, :, :num_kept], entry.v[:, :, :num_kept]

    def _expire(self) -> None:
        now = time.monotonic()
        for key in [key for key, e in self._entries.items() if e.expires_at <= now]:
            self._drop(key)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.num_bytes -= entry.num_bytes
