"""Wording helpers for TopologyError messages: field paths, value kinds, "did you mean".

Shared by :mod:`flowspec.config.parse` and :mod:`flowspec.config.topology`.
"""

from __future__ import annotations

import difflib
from typing import Any, Sequence


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return repr(v)


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
