"""Field rules: what one field of a request allows, declared once and read by one reader.

A rule is attached to a dataclass field as metadata (:func:`allows`), next to the field it
bounds. :meth:`read` turns a plain value (from JSON or YAML) into the checked value, or raises
:class:`FieldError` whose reason says what is allowed and what was given ("must be a number
in [0, 2], not 5"); whoever reads a whole request names the field, and each front end
prefixes its own path (the topology's ``decoding.``, the HTTP API's parameter name).
No torch here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence


class FieldError(ValueError):
    """A value a field does not allow."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field  # the field's path in the request ("tree.depth", "stop[1]"); "" = not named yet
        self.reason = reason  # what is allowed, and what was given

    def within(self, name: str) -> "FieldError":
        """The same error one level up: the field `name` holds the value that was refused."""
        if not self.field:
            return FieldError(name, self.reason)
        return FieldError(name + self.field if self.field.startswith("[") else f"{name}.{self.field}", self.reason)


class Rule(Protocol):
    """What a field allows."""

    @property
    def allowed(self) -> str: ...  # "a number in [0, 2]": the words after "must be"

    def read(self, v: Any) -> Any: ...  # the checked value, or FieldError("", reason)


def show(v: Any) -> str:
    """A value as an error message quotes it: null, or its repr, cut to 60 characters."""
    text = "null" if v is None else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def suggest(word: str, choices: Sequence[str]) -> str:
    """' (did you mean 'x'?)' for a close match among `choices`, else ''."""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def text_problem(text: str) -> str | None:
    """Why a string cannot be tokenized, or None (lone surrogates come from JSON escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode text (a lone surrogate {text[e.start]!r} at character {e.start})"
    return None


def allows(rule: Rule) -> dict[str, Rule]:
    """Field metadata that declares the field's rule: ``field(default=..., metadata=allows(...))``."""
    return {"allows": rule}


def rule_of(cls: type, name: str) -> Rule:
    """The rule declared on field `name` of the dataclass `cls`."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return f.metadata["allows"]
    raise KeyError(f"{cls.__name__} has no field {name!r}")


def _refuse(rule: Rule, v: Any) -> FieldError:
    return FieldError("", f"must be {rule.allowed}, not {show(v)}")


@dataclass(frozen=True)
class Integer:
    """An integer within bounds (true integers only: 5.0 and true are not integers)."""

    lo: int | None = None  # smallest allowed value; None = unbounded
    hi: int | None = None  # largest allowed value; None = unbounded
    note: str = ""  # what the bounds mean, said after them ("model.max_context"); "" = nothing
    null: str = ""  # what null means where it is allowed ("random"); "" = null is not allowed

    @property
    def allowed(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = f"an integer from {self.lo} to {self.hi}"
        elif self.lo is not None:
            text = f"an integer >= {self.lo}"
        else:
            text = "an integer"
        text += f" ({self.note})" if self.note else ""
        return text + (f", or null ({self.null})" if self.null else "")

    def read(self, v: Any) -> int | None:
        if v is None and self.null:
            return None
        if isinstance(v, bool) or not isinstance(v, int) or (self.lo is not None and v < self.lo) \
                or (self.hi is not None and v > self.hi):
            raise _refuse(self, v)
        return int(v)

    def capped(self, hi: int, why: str) -> "Integer":
        """The rule with a lower upper bound where `hi` is lower, said to come from `why`."""
        if self.hi is not None and self.hi <= hi:
            return self
        return dataclasses.replace(self, hi=hi, note=why)


@dataclass(frozen=True)
class Number:
    """A finite number within bounds, read as a float."""

    lo: float | None = None  # smallest allowed value; None = unbounded
    hi: float | None = None  # largest allowed value; None = unbounded
    lo_open: bool = False  # lo itself is not allowed
    hi_open: bool = False  # hi itself is not allowed
    null: str = ""  # what null means where it is allowed ("unlimited"); "" = null is not allowed

    @property
    def allowed(self) -> str:
        if self.lo is not None and self.hi is not None:
            text = (f"a number in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                    f"{')' if self.hi_open else ']'}")
        elif self.lo is not None:
            text = f"a number {'>' if self.lo_open else '>='} {self.lo:g}"
        else:
            text = "a number"
        return text + (f", or null ({self.null})" if self.null else "")

    def read(self, v: Any) -> float | None:
        if v is None and self.null:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _refuse(self, v)
        lo, hi = self.lo, self.hi
        if (lo is not None and (v < lo or (self.lo_open and v == lo))) \
                or (hi is not None and (v > hi or (self.hi_open and v == hi))):
            raise _refuse(self, v)
        return float(v)


@dataclass(frozen=True)
class OneOf:
    """One name of a fixed list."""

    choices: tuple[str, ...]  # the allowed names
    word: str  # what a name names, for "unknown strategy 'x'"

    @property
    def allowed(self) -> str:
        return f"one of {', '.join(self.choices)}"

    def read(self, v: Any) -> str:
        if not isinstance(v, str) or v not in self.choices:
            hint = suggest(v, self.choices) if isinstance(v, str) else ""
            raise FieldError("", f"unknown {self.word} {show(v)}{hint}; allowed: {', '.join(self.choices)}")
        return v


@dataclass(frozen=True)
class Texts:
    """A string, or a list of strings: non-empty, valid Unicode, at most `most` of them."""

    most: int  # the most strings allowed

    @property
    def allowed(self) -> str:
        return f"a string or a list of up to {self.most} non-empty strings"

    def read(self, v: Any) -> tuple[str, ...]:
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, list) or len(items) > self.most or not all(isinstance(s, str) and s for s in items):
            raise _refuse(self, v)
        for i, s in enumerate(items):
            problem = text_problem(s)
            if problem:
                raise FieldError(f"[{i}]", problem)
        return tuple(items)


@dataclass(frozen=True)
class Changes:
    """A mapping that changes some fields of a dataclass, each checked by that field's rule."""

    of: type  # the dataclass whose fields may be changed

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self.of))

    @property
    def allowed(self) -> str:
        return f"a mapping with some of {', '.join(self.names)}"

    def read(self, v: Any) -> dict[str, Any]:
        if not isinstance(v, Mapping):
            raise _refuse(self, v)
        names = self.names
        for k in v:
            if k not in names:
                raise FieldError("", f"unknown field {show(k)}{suggest(str(k), names)}; allowed: {', '.join(names)}")
        out = {}
        for k, x in v.items():
            try:
                out[k] = rule_of(self.of, k).read(x)
            except FieldError as e:
                raise e.within(k) from None
        return out
