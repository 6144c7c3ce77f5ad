"""Text deltas of a growing answer: incremental detokenization and stop strings, in one place.

The source turns the tokens of an answer into text pieces that never need taking back:
what could still change (an incomplete UTF-8 character, the start of a stop string) is
held back until it is settled, and the answer ends before the first stop string. Each
push decodes only a short window of recent tokens, so an answer of n tokens costs O(n),
not O(n^2) (the whole answer is decoded once, at the end, as the final word).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger(__name__)


@dataclass
class TextStream:
    """Turns the growing token list into text deltas that never need taking back."""

    decode: Callable[[list[int]], str]  # token ids -> text
    stops: list[str]  # stop strings; the text ends before the first one
    ids: list[int] = field(default_factory=list)  # tokens so far
    sent: str = ""  # text already handed out
    stopped: bool = False  # a stop string was found: nothing more is handed out
    _text: str = ""  # settled text of ids[:_read] (before stop handling)
    _prefix: int = 0  # ids[_prefix:_read] is the context window decoded before the new tokens
    _read: int = 0  # tokens whose text is settled

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the text that is now settled (may be empty)."""
        self.ids.extend(ids)
        if self.stopped:
            return ""
        before = self.decode(self.ids[self._prefix:self._read])
        after = self.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            self._text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(self._text)

    def _release(self, text: str) -> str:
        cuts = [text.find(s) for s in self.stops if s in text]
        if cuts:
            text, self.stopped = text[:min(cuts)], True
        else:
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta

    def final_text(self) -> str:
        """The whole answer's text (decoded at once), cut before the first stop string."""
        text = self.decode(self.ids)
        cuts = [text.find(s) for s in self.stops if s in text]
        return text[:min(cuts)] if cuts else text

    def finish(self, final: str) -> str:
        """The rest of the answer once the final text is known."""
        if final.startswith(self.sent):
            rest, self.sent = final[len(self.sent):], final
            return rest
        log.debug("streamed text is not a prefix of the final answer")
        return ""
