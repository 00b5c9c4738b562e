"""Chat messages -> prompt token ids, with message contents kept as text.

The chat template is the only source of control tokens (<|im_start|>, <|im_end|>, ...): a
control-token string typed inside a message's content must stay text, or a user could forge
a system turn. So the template is rendered with a unique placeholder for each content; the
template's own pieces are tokenized normally (their special tokens parsed) and each content
with special tokens split as plain text; the ids are joined in order.
"""

from __future__ import annotations

import copy
import re
import uuid
from typing import Any, Sequence


class ChatTokenizer:
    """Not thread-safe: the pipeline calls it from its one tokenizer thread."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # A private copy that never parses special tokens: HF's per-call split_special_tokens
        # flips a flag on the shared Rust tokenizer, which would race with other users.
        self._as_text = copy.deepcopy(tokenizer)

    def token_ids(self, messages: Sequence[tuple[str, str]]) -> list[int]:
        """The prompt for (role, content) messages, ending with the generation prompt."""
        tag = uuid.uuid4().hex
        holders = [f"\x00{tag}:{i}\x00" for i in range(len(messages))]
        rendered = self.tokenizer.apply_chat_template(
            [{"role": role, "content": holder} for (role, _), holder in zip(messages, holders)],
            add_generation_prompt=True, tokenize=False,
        )
        ids: list[int] = []
        pattern = re.compile("\x00" + tag + r":(\d+)\x00")
        start = 0
        for match in pattern.finditer(rendered):
            ids += self._encode(self.tokenizer, rendered[start:match.start()], False)
            ids += self._encode(self._as_text, messages[int(match.group(1))][1], True)
            start = match.end()
        ids += self._encode(self.tokenizer, rendered[start:], False)
        return ids

    @staticmethod
    def _encode(tokenizer: Any, text: str, as_text: bool) -> list[int]:
        if not text:
            return []
        return list(tokenizer(text, add_special_tokens=False, split_special_tokens=as_text)["input_ids"])
