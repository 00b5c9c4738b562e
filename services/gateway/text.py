"""Token ids -> text deltas for one request: incremental detokenization and stop strings.

Decoding token by token breaks multi-byte characters and merges ("\ufffd" mid-character);
so text is released only when it is stable: we decode a small window of recent ids and
emit what grew beyond the previous decode of that window. Text that could be the start
of a stop string is held back until it either completes the stop string (generation ends,
the stop string is not returned) or stops matching.
"""

from __future__ import annotations

from typing import Any


class TextStream:
    def __init__(self, tokenizer: Any, stop: list[str]) -> None:
        self._tok = tokenizer
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start for decoding
        self._read_offset = 0  # ids before this are already in self._text
        self._text = ""  # all stable text so far
        self._released = 0  # chars of self._text already returned
        self.stopped = False  # a stop string matched

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Append one generated token; return the text that is now safe to send (may be "")."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix_offset : self._read_offset])
        after = self._decode(self._ids[self._prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._text += after[len(before) :]
            self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of generation: whatever was held back for a possible stop string."""
        return "" if self.stopped else self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self._text)
        hits = [i for i in (self._text.find(s, max(0, self._released - len(s))) for s in self._stop) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif not final:
            end -= self._held_back()
        end = max(end, self._released)
        delta = self._text[self._released : end]
        self._released = end
        return delta

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._text)), longest, -1):
                if self._text.endswith(s[:n]):
                    longest = n
                    break
        return longest
