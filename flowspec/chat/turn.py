"""One answer of the chat as it streams in: its text, statistics, finish reason and the ring's health.

Shared by the session (which fills it from the stream's chunks) and the view (which draws it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Turn:
    """One answer as it streams in."""

    answer: str = ""  # text so far
    stats: dict[str, Any] = field(default_factory=dict)  # latest FlowSpec statistics (live, then final)
    final: bool = False  # stats are the request's final statistics
    finish: str | None = None  # finish reason once known
    health: dict[str, Any] | None = None  # latest GET /health body
    streaming: bool = False  # the answer is still coming (a broken ring now holds it, to resume)
    t0: float = field(default_factory=time.perf_counter)  # when the request was sent

    def apply(self, chunk: dict[str, Any]) -> str:
        """Take a stream chunk; return its new text."""
        delta = ""
        for c in chunk.get("choices") or []:
            delta += (c.get("delta") or {}).get("content") or ""
            if c.get("finish_reason"):
                self.finish = c["finish_reason"]
        self.answer += delta
        fs = chunk.get("flowspec")
        if isinstance(fs, dict):
            self.stats = fs
            self.final = self.finish is not None
        return delta
