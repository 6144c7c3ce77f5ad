"""Reading one field of a topology: the value checks behind :mod:`flowspec.config.parse`.

:class:`_Fields` holds the file's name, its folder and the problems found so far; each
reader returns the checked value or raises TopologyError naming the field path and what
is allowed. A field whose dataclass declares its rule (:func:`~flowspec.speculative.bounds.allows`)
is read by :meth:`_Fields.field`, with the dataclass's default. :meth:`_Fields.attempt`
records a problem and goes on, so that a file's problems are all reported at once.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, TypeVar

from ..errors import TopologyError
from ..speculative.bounds import FieldError, rule_of
from .messages import _join, _kind, _suggest

_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
T = TypeVar("T")


class _Recorded(Exception):
    """A section cannot be read further; its problems are already recorded."""


class _Fields:
    """Field readers over one file; every problem found is kept in ``problems``."""

    def __init__(self, origin: str, base_dir: str) -> None:
        self.origin = origin
        self.base_dir = base_dir
        self.problems: list[TopologyError] = []  # every problem found so far

    def attempt(self, read: Callable[[], T], fallback: T) -> T:
        """read(), or fallback with its problem recorded, so that the rest of the file is checked too."""
        try:
            return read()
        except TopologyError as e:
            self.problems.append(e)
        except _Recorded:
            pass
        return fallback

    def close(self, before: int) -> None:
        """End a section: _Recorded when it recorded a problem since `before` (the count of
        ``problems`` when it began), since its value would hold stand-ins for refused fields."""
        if len(self.problems) > before:
            raise _Recorded

    # ------------------------------------------------------------------ helpers
    def error(self, path: str, msg: str) -> TopologyError:
        return TopologyError(f"{self.origin}: {path}: {msg}" if path else f"{self.origin}: {msg}")

    def mapping(self, v: Any, path: str, allowed: Sequence[str], required: Sequence[str] = (),
                what: str = "", fatal_missing: bool = True) -> dict[str, Any]:
        """v as a mapping; unknown and missing keys are recorded, and a missing one ends the section
        (with fatal_missing) once all are recorded."""
        if not isinstance(v, dict):
            raise self.error(path or "top level", f"must be a mapping with keys {', '.join(allowed)}"
                             f", not {_kind(v)}")
        unknown = [str(k) for k in v if k not in allowed]
        for key in unknown:
            self.problems.append(self.error(_join(path, key), f"unknown key{_suggest(key, allowed)} "
                                            f"(allowed{what}: {', '.join(allowed)})"))
        # a missing key that an unknown one misspells is said once, by that key's "did you mean"
        meant = {m for u in unknown for m in difflib.get_close_matches(u, list(allowed), n=1, cutoff=0.6)}
        missing = [k for k in required if k not in v]
        for k in missing:
            if k not in meant:
                self.problems.append(self.error(_join(path, k), f"missing; required{what}: {', '.join(required)}"))
        if missing and fatal_missing:
            raise _Recorded
        return v

    def ruled(self, cls: type, name: str, v: Any, path: str) -> Any:
        """A value checked by the rule the algorithm declares on field `name` of the dataclass
        `cls` (:mod:`flowspec.speculative.bounds`)."""
        try:
            return rule_of(cls, name).read(v)
        except FieldError as e:
            raise self.error(e.within(path).field, e.reason) from None

    def field(self, cls: type, name: str, d: Mapping[str, Any], path: str,
              default: Any = dataclasses.MISSING) -> Any:
        """Field `name` of the dataclass `cls` from the section `d` found at `path` (the key is
        the field's name): the value given, else `default`, else the field's own default,
        checked by the rule declared on the field. A value the rule refuses is recorded as a
        problem and the default stands in for it, so that the section's other fields are
        checked too (the file is refused once every section has been read)."""
        if default is dataclasses.MISSING:
            default = next(f.default for f in dataclasses.fields(cls) if f.name == name)
        if name in d:
            v = d[name]
        elif default is not dataclasses.MISSING:
            v = default
        else:
            raise self.error(_join(path, name), "missing")
        try:
            return self.ruled(cls, name, v, _join(path, name))
        except TopologyError as e:
            if default is dataclasses.MISSING:
                raise
            self.problems.append(e)
            return default

    def field_ok(self, cls: type, name: str, d: Mapping[str, Any], path: str) -> tuple[Any, bool]:
        """:meth:`field`, and whether the value was accepted (False: a problem was recorded and
        the default stands in; a check across fields then has nothing to compare)."""
        n = len(self.problems)
        v = self.field(cls, name, d, path)
        return v, len(self.problems) == n

    def string(self, v: Any, path: str, allowed: str, pattern: re.Pattern[str] | None = None) -> str:
        if not isinstance(v, str) or not v.strip() or (pattern is not None and not pattern.match(v)):
            raise self.error(path, f"must be {allowed}, not {v!r}")
        return v.strip()

    def flag(self, v: Any, path: str) -> bool:
        if not isinstance(v, bool):
            raise self.error(path, f"must be true or false, not {v!r}")
        return v

    def env_name(self, v: Any, path: str, nullable: bool) -> str | None:
        if v is None and nullable:
            return None
        return self.string(v, path, "the name of an environment variable ([A-Za-z_][A-Za-z0-9_]*)"
                           + (", or null" if nullable else ""), _ENV_RE)

    def file_path(self, v: Any, path: str) -> str | None:
        if v is None:
            return None
        s = self.string(v, path, f"a file path (relative to {self.base_dir}), or null")
        return self.resolve(s)

    def resolve(self, p: str) -> str:
        q = Path(p).expanduser()
        if not q.is_absolute():
            q = Path(self.base_dir) / q
        return os.path.normpath(str(q))

    def host(self, v: Any, path: str, wildcard_ok: bool) -> str:
        allowed = "a hostname or an IP address"
        if not isinstance(v, str):
            raise self.error(path, f"must be {allowed}, not {v!r}")
        h = v.strip()
        try:
            ip = ipaddress.ip_address(h)
        except ValueError:
            ip = None
        if ip is not None:
            if ip.is_unspecified and not wildcard_ok:
                raise self.error(path, f"{h} is a bind-all address, not one the other nodes can connect "
                                 "to; give this node's reachable hostname or IP")
            return h
        labels = h.rstrip(".").split(".")
        if not h or len(h) > 253 or not all(_HOST_LABEL_RE.match(lb) for lb in labels):
            raise self.error(path, f"must be {allowed}, not {v!r}")
        return h

