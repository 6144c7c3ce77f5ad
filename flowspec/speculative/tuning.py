"""The draft tree's ring-dependent settings, chosen from what this ring's nodes cost.

``segment``, ``in_flight`` and ``expand`` may be ``auto`` in a topology. The source measures
its ring once it has formed (every stage's pass by rows, every link's round trip, its own
lm_head by rows: ``runtime/tuning.py``) and these pure rules turn the costs into settings:

* **segment**: the most rows a stage passes at nearly the price of one, and no more than
  two levels of the tree (``2 * top_k``). A round of speculation is bound by its latency
  (the ring trip of its first segment, then one segment after another), so a segment may
  only grow while it stays cheap: the most rows whose pass costs every stage at most
  ``SEGMENT_COST_RATIO`` times a one-token step, on a straight line fitted through the
  stage's measured passes (single measurements jump on a throttled device). Rows beyond the first two levels
  add little to a round (they are mostly pruned) but lengthen every trip. Where several
  rows cost almost as much as one (weights read once from memory) this takes 8 or more;
  where they cost rows in proportion (no native bfloat16, a slow core) it takes 1 to 4.
* **in_flight**: as many segments as the ring holds without one waiting behind another:
  the trip of a segment (every stage's pass, every link, the source's verification)
  divided by the slowest of those servers. The source counts as one of them.
* **expand**: one ring's worth of nodes per expansion, ``segment * in_flight``.

Chosen with ``tools/simulate_ring.py`` on edge-5, where these rules give the settings that
were the best by hand (segments of 8, 4 in flight, expansions of 32; segments of 12 and 16
measured 3% and 15% slower there).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from .params import TREE_LIMITS, TreeParams

AUTO = "auto"
TUNABLE = ("segment", "in_flight", "expand")  # the tree settings that may be "auto"
SEGMENT_COST_RATIO = 1.4  # a segment may cost a stage this many one-token steps, at most

Curve = Sequence[tuple[int, float]]  # (rows, milliseconds), rows ascending


@dataclass(frozen=True)
class RingCosts:
    """What one pass costs on each server of a formed ring (milliseconds)."""

    stages: tuple[Curve, ...]  # per stage in ring order: its pass by rows (the smallest measured size first)
    links_ms: float  # one-way latency summed over every link of the ring, the source's included
    source: Curve  # the source's verification (its lm_head) by rows; empty when the last stage verifies


@dataclass(frozen=True)
class Tuning:
    """Settings chosen for a ring, and the figures they came from."""

    tree: TreeParams  # the topology's tree with its "auto" settings resolved
    trip_ms: float  # a segment's expected trip around the idle ring
    bottleneck_ms: float  # the slowest server's pass of one segment
    chosen: tuple[str, ...]  # the settings that were "auto"

    def describe(self) -> str:
        t = self.tree
        picked = ", ".join(f"{k} {getattr(t, k)}" for k in self.chosen) or "nothing"
        return (f"{picked} (a segment's trip {self.trip_ms:.1f} ms, the slowest server "
                f"{self.bottleneck_ms:.1f} ms per segment)")


def fit(curve: Curve) -> tuple[float, float]:
    """(ms of a pass, ms per row): a least-squares line through the measured passes. A pass
    of a few rows costs the weights' reading plus a little per row; the line keeps the
    choice steady where single measurements jump (a throttled device, a busy host)."""
    pts = [(float(n), float(ms)) for n, ms in curve]
    if not pts:
        return 0.0, 0.0
    if len({n for n, _ in pts}) < 2:
        n, ms = pts[0]
        return ms, 0.0
    mn = sum(n for n, _ in pts) / len(pts)
    mm = sum(ms for _, ms in pts) / len(pts)
    slope = sum((n - mn) * (ms - mm) for n, ms in pts) / sum((n - mn) ** 2 for n, _ in pts)
    slope = max(slope, 0.0)
    return max(mm - slope * mn, 0.0), slope


def at(curve: Curve, rows: int) -> float:
    """The fitted cost of a pass of `rows` rows."""
    base, per_row = fit(curve)
    return base + per_row * rows


def pick_segment(stages: Sequence[Curve], most: int, ratio: float = SEGMENT_COST_RATIO) -> int:
    """The most rows, up to `most`, that cost every stage at most `ratio` one-token steps."""
    lines = [fit(c) for c in stages if c]
    best = 1
    for n in range(2, max(most, 1) + 1):
        if all(base + per_row * n <= ratio * (base + per_row) for base, per_row in lines):
            best = n
    lo, hi = TREE_LIMITS["segment"]
    return min(max(best, lo), hi)


def trip(costs: RingCosts, segment: int) -> tuple[float, float]:
    """(a segment's trip around the idle ring, the slowest server's share of it) in ms."""
    passes = [at(c, segment) for c in costs.stages] + ([at(costs.source, segment)] if costs.source else [])
    if not passes:
        return costs.links_ms, 0.0
    return sum(passes) + costs.links_ms, max(passes)


def tune(costs: RingCosts, base: TreeParams, auto: Sequence[str]) -> Tuning:
    """`base` with the settings named in `auto` chosen for this ring."""
    unknown = set(auto) - set(TUNABLE)
    if unknown:
        raise ValueError(f"only {', '.join(TUNABLE)} can be chosen automatically, not {sorted(unknown)}")
    changes: dict[str, int] = {}
    segment = pick_segment(costs.stages, 2 * base.top_k) if "segment" in auto else base.segment
    changes["segment"] = segment
    trip_ms, slowest = trip(costs, segment)
    in_flight = base.in_flight
    if "in_flight" in auto:
        lo, hi = TREE_LIMITS["in_flight"]
        in_flight = min(max(math.floor(trip_ms / slowest) if slowest > 0 else lo, lo), hi)
    changes["in_flight"] = in_flight
    if "expand" in auto:
        lo, hi = TREE_LIMITS["expand"]
        changes["expand"] = min(max(segment * in_flight, lo), hi)
    tree = dataclasses.replace(base, **{k: v for k, v in changes.items() if k in auto})
    return Tuning(tree, round(trip_ms, 2), round(slowest, 2), tuple(k for k in TUNABLE if k in auto))


def fallback(base: TreeParams, auto: Sequence[str], stages: int) -> TreeParams:
    """The settings when the ring could not be measured: segments of 8 rows (at most two
    tree levels), one in flight per stage, one ring's worth of nodes per expansion."""
    values: Mapping[str, int] = {"segment": min(8, 2 * base.top_k) if "segment" in auto else base.segment}
    values = dict(values, in_flight=max(1, stages) if "in_flight" in auto else base.in_flight)
    values = dict(values, expand=values["segment"] * values["in_flight"] if "expand" in auto else base.expand)
    return dataclasses.replace(base, **{k: v for k, v in values.items() if k in auto})
