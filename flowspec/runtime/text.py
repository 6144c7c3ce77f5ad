"""Text deltas of a growing answer: incremental detokenization and stop strings, in one place.

The source turns the tokens of an answer into text pieces that never need taking back:
what could still change (an incomplete UTF-8 character, the start of a stop string) is
held back until it is settled, and the answer ends before the first stop string. Each
push decodes only a short window of recent tokens and looks for stop strings only in the
text not handed out yet (a stop string never starts in text already handed out: its start
would have been held back), so an answer of n tokens costs O(n), not O(n^2) (the whole
answer is decoded once, at the end, as the final word).
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
    stopped: bool = False  # a stop string was found: nothing more is handed out
    _sent: list[str] = field(default_factory=list)  # the pieces handed out, in order
    _unsent: str = ""  # settled text not handed out yet: what may start a stop string
    _prefix: int = 0  # ids[_prefix:_read] is the context window decoded before the new tokens
    _read: int = 0  # tokens whose text is settled

    @property
    def sent(self) -> str:
        """The text handed out so far."""
        return "".join(self._sent)

    def push(self, ids: list[int]) -> str:
        """Add tokens; return the text that is now settled (may be empty)."""
        self.ids.extend(ids)
        if self.stopped:
            return ""
        before = self.decode(self.ids[self._prefix:self._read])
        after = self.decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            self._unsent += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        """Hand out the settled text up to the first stop string, or up to where a stop string
        may start (held back until the next tokens settle it)."""
        text = self._unsent
        cuts = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if cuts:
            delta, self._unsent, self.stopped = text[:min(cuts)], "", True
        else:
            hold = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            delta, self._unsent = text[:len(text) - hold], text[len(text) - hold:]
        if delta:
            self._sent.append(delta)
        return delta

    def final_text(self) -> str:
        """The whole answer's text (decoded at once), cut before the first stop string."""
        text = self.decode(self.ids)
        cuts = [text.find(s) for s in self.stops if s in text]
        return text[:min(cuts)] if cuts else text

    def finish(self, final: str) -> str:
        """The rest of the answer once the final text is known."""
        sent = self.sent
        if final.startswith(sent):
            rest = final[len(sent):]
            self._sent, self._unsent = [final], ""
            return rest
        log.debug("streamed text is not a prefix of the final answer")
        return ""
