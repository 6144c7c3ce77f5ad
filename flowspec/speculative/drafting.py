"""Drafting of several requests at once: one drafter pass per tree level for all of them.

A request's expansion is stepped (``Speculator.think_steps``, ``respond_steps``): a
generator that yields a :class:`~.drafters.base.DraftCall` whenever it needs the children
of one tree level and takes the proposals back. :func:`step` advances every expansion it
is given by one call: the calls whose drafters share a ``batch_key`` (per-request states
over the same weights, e.g. EAGLE heads) are served by one ``propose_together`` -- for the
EAGLE head one grouped layer pass per level and one draft-logits pass for all of them
instead of one each -- and the others alone. A drafter pass over a few rows costs about
the same whatever its rows (its weights come from memory), so k requests drafting
together cost about what one costs.

Each request's tree grows as it does alone: a call's proposals do not depend on which
other calls share the pass (beyond float rounding: a matrix product over more rows may
round differently), and a request's expansion only ever reads its own state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Generic, Sequence, TypeVar

from .drafters.base import DraftCall, PassCount, Proposals, Steps

T = TypeVar("T")


@dataclass
class DraftingStats:
    """How much sharing the drafting steps found."""

    steps: int = 0  # steps that served at least one call
    calls: int = 0  # drafter calls served (one per request per tree level)
    shared_calls: int = 0  # of which were served in one drafter pass with another request's call
    passes: PassCount = field(default_factory=PassCount)  # drafter passes run, and what they cost alone

    @property
    def passes_saved(self) -> int:
        """Drafter passes that serving the calls one by one would have run on top."""
        return self.passes.alone - self.passes.run

    def add(self, other: "DraftingStats") -> None:
        self.steps += other.steps
        self.calls += other.calls
        self.shared_calls += other.shared_calls
        self.passes.add(other.passes)

    def as_dict(self) -> dict[str, int]:
        return {"steps": self.steps, "calls": self.calls, "shared_calls": self.shared_calls,
                "passes": self.passes.run, "passes_alone": self.passes.alone, "passes_saved": self.passes_saved}


class Expansion(Generic[T]):
    """One request's stepped expansion and where it stands."""

    def __init__(self, steps: Steps[T]) -> None:
        self.steps = steps  # the generator
        self.call: DraftCall | None = None  # the call it waits on
        self.started = False  # it has run up to its first call (or its end)
        self.done = False  # it has returned or raised
        self.result: T | None = None  # what it returned
        self.error: Exception | None = None  # what it raised

    def advance(self, answer: Proposals | Exception | None = None) -> None:
        """Run it to its next call or its end, handing it `answer` (the proposals for its
        call, or the exception serving the call met, raised inside the expansion)."""
        try:
            if not self.started:
                self.started = True
                self.call = next(self.steps)
            elif isinstance(answer, Exception):
                self.call = self.steps.throw(answer)
            else:
                assert answer is not None, "an expansion waiting on a call needs its proposals"
                self.call = self.steps.send(answer)
        except StopIteration as stop:
            self.call, self.done, self.result = None, True, stop.value
        except Exception as e:  # noqa: BLE001 -- it stays with its own request
            self.call, self.done, self.error = None, True, e


def serve(calls: Sequence[DraftCall]) -> tuple[list[Proposals | Exception], PassCount, int]:
    """Every call's proposals (or the exception it met): the calls whose drafters share a
    batch key in one ``propose_together``, the others alone; each call's ``seconds`` gets
    its share of the time (by frontier size). Also the passes, and how many calls shared
    theirs with another call."""
    out: list[Proposals | Exception] = [[] for _ in calls]
    count = PassCount()
    shared = 0
    groups: dict[int, list[int]] = {}
    alone: list[int] = []
    for i, c in enumerate(calls):
        key = c.drafter.batch_key()
        if key is None:
            alone.append(i)
        else:
            groups.setdefault(id(key), []).append(i)
    for members in [*groups.values(), *([i] for i in alone)]:
        part = [calls[i] for i in members]
        t0 = time.perf_counter()
        try:
            got, n = type(part[0].drafter).propose_together(part)
        except Exception as e:  # noqa: BLE001 -- a failed shared pass fails the calls that shared it
            got, n = [e] * len(part), PassCount()
        spent = time.perf_counter() - t0
        rows = sum(len(c.frontier) for c in part) or 1
        for i, c, g in zip(members, part, got):
            out[i] = g
            c.seconds = spent * len(c.frontier) / rows
        count.add(n)
        shared += len(part) if len(part) > 1 else 0
    return out, count, shared


def step(expansions: Sequence[Expansion[T]]) -> DraftingStats:
    """Advance every expansion that has not ended by one call: start the new ones (up to
    their first call), serve every waiting call together, and hand each its proposals."""
    for e in expansions:
        if not e.started:
            e.advance()
    waiting = [e for e in expansions if not e.done and e.call is not None]
    report = DraftingStats()
    if not waiting:
        return report
    answers, report.passes, report.shared_calls = serve([e.call for e in waiting if e.call is not None])
    report.steps = 1
    report.calls = len(waiting)
    for e, a in zip(waiting, answers):
        e.advance(a)
    return report


def run_together(steps: Sequence[Steps[T]], stats: DraftingStats | None = None) -> list[T]:
    """Run several expansions to their ends, stepping them together; what each returned (the
    first exception one raised is raised, after all have ended)."""
    exps = [Expansion(s) for s in steps]
    while not all(e.done for e in exps):
        report = step(exps)
        if stats is not None:
            stats.add(report)
    for e in exps:
        if e.error is not None:
            raise e.error
    return [e.result for e in exps]  # type: ignore[misc]
