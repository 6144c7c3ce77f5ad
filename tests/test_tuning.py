"""The draft tree's "auto" settings, chosen from what a ring's nodes cost (speculative/tuning.py).

The rules are pure: measured costs in, settings out. The ring that measures itself once it
has formed is tested in tests/test_ring.py."""

from __future__ import annotations

import pytest

from flowspec.config import Topology
from flowspec.speculative.params import TreeParams
from flowspec.speculative.tuning import RingCosts, at, fallback, fit, pick_segment, trip, tune

# an 8-layer stage where several rows cost little more than one (native bfloat16), in ms
FLAT = ((1, 11.6), (2, 12.2), (4, 13.2), (8, 15.9), (12, 18.0), (16, 19.5), (24, 23.9), (32, 28.3))
# the same stage where rows cost nearly in proportion (bfloat16 without native support)
STEEP = ((1, 22.0), (2, 30.0), (4, 45.0), (8, 104.0), (16, 200.0))
AUTO = ("segment", "in_flight", "expand")


def scaled(curve: tuple[tuple[int, float], ...], k: float) -> tuple[tuple[int, float], ...]:
    return tuple((n, ms * k) for n, ms in curve)


def test_a_line_through_the_measured_passes() -> None:
    base, per_row = fit(FLAT)
    assert base == pytest.approx(11.23, abs=0.01) and per_row == pytest.approx(0.533, abs=0.001)
    assert at(FLAT, 8) == pytest.approx(base + 8 * per_row)
    # a throttled device's passes jump (4 ms CFS periods): the line does not
    jumpy = ((1, 47.8), (2, 47.6), (4, 71.2), (8, 70.1), (12, 73.4), (16, 89.1), (32, 117.5))
    assert pick_segment([jumpy], most=8) == 8
    assert fit(((4, 8.0),)) == (8.0, 0.0) and fit(()) == (0.0, 0.0)
    assert fit(((1, 10.0), (2, 9.0))) == (9.5, 0.0)  # never a negative cost per row


def test_segment_is_the_most_rows_at_nearly_the_price_of_one() -> None:
    assert pick_segment([FLAT] * 4, most=8) == 8  # at most two levels of a top-k 4 tree
    assert pick_segment([FLAT] * 4, most=16) == 9  # 10 rows cost more than 1.4 one-token steps
    assert pick_segment([STEEP] * 4, most=16) == 1  # rows cost in proportion: no more than one
    # the dearest stage decides: one stage with a steep curve holds every segment small
    assert pick_segment([FLAT, FLAT, STEEP], most=16) == 1
    assert pick_segment([((1, 5.0), (2, 50.0))], most=16) == 1


def test_in_flight_fills_the_ring_without_queueing() -> None:
    slow = 1 / 0.35 * 1.3  # a capped edge device
    edge5 = RingCosts((scaled(FLAT, slow),) * 4, links_ms=5 * 3.0, source=scaled(((1, 3.3), (8, 4.0)), slow))
    t = tune(edge5, TreeParams(top_k=4), AUTO)
    assert (t.tree.segment, t.tree.in_flight, t.tree.expand) == (8, 4, 32)  # edge-5's best by hand
    assert t.trip_ms == pytest.approx(trip(edge5, 8)[0], abs=0.01) and t.chosen == ("segment", "in_flight", "expand")
    assert "segment 8" in t.describe() and "in_flight 4" in t.describe()
    # slow links: more segments fit in a trip
    wifi = RingCosts(edge5.stages, links_ms=5 * 40.0, source=edge5.source)
    assert tune(wifi, TreeParams(top_k=4), AUTO).tree.in_flight == 7
    # one stage three times slower than the others: it sets the pace, fewer segments in flight
    lopsided = RingCosts(edge5.stages[:3] + (scaled(edge5.stages[3], 3.0),), edge5.links_ms, edge5.source)
    assert tune(lopsided, TreeParams(top_k=4), AUTO).tree.in_flight == 2


def test_only_auto_settings_change() -> None:
    costs = RingCosts((FLAT,) * 2, 1.0, ())
    t = tune(costs, TreeParams(top_k=4, segment=5, expand=7, in_flight=9), ("in_flight",))
    assert (t.tree.segment, t.tree.expand) == (5, 7) and t.tree.in_flight == 2  # (2 x 13.9 + 1) / 13.9
    with pytest.raises(ValueError, match="only segment, in_flight, expand"):
        tune(costs, TreeParams(), ("depth",))
    assert fallback(TreeParams(top_k=2, in_flight=9), AUTO, 3) == TreeParams(top_k=2, segment=4, expand=12,
                                                                             in_flight=3)


def test_topology_tree_auto_and_explicit() -> None:
    base = {"cluster": "c", "model": {"target": "default"},
            "nodes": [{"name": "s", "host": "127.0.0.1", "port": 7700, "role": "source"},
                      {"name": "a", "host": "127.0.0.1", "port": 7701, "role": "stage", "layers": "auto"}]}
    topo = Topology.from_dict(base)
    assert topo.decoding.tree.auto == AUTO  # the default: chosen for the ring
    chosen = TreeParams(segment=6, expand=18, in_flight=3)
    assert topo.decoding.tree.params(chosen) == TreeParams(segment=6, expand=18, in_flight=3)
    fixed = Topology.from_dict(dict(base, decoding={"tree": {"segment": 8, "expand": 32, "in_flight": 2}}))
    assert fixed.decoding.tree.auto == () and fixed.decoding.tree.params(chosen).segment == 8
