"""Wording helpers for TopologyError messages: field paths, value kinds, "did you mean".

Shared by :mod:`flowspec.config.parse` and :mod:`flowspec.config.topology`.
"""

from __future__ import annotations

from typing import Any

from ..speculative.bounds import suggest as _suggest  # noqa: F401 -- one "did you mean" for requests and topologies


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
