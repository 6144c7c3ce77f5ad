"""The source's check of a FORM reply (runtime/formation.py): what makes a ring usable."""

from __future__ import annotations

import copy
from typing import Any

from flowspec.config import Topology
from flowspec.runtime.formation import ring_problem

from test_config import base


def ring(*layers: tuple[int, int], caches: int = 4, lm_head: bool = False) -> list[dict[str, Any]]:
    """A FORM reply as the stages build it, stage1..stageN with these half-open layer ranges."""
    out = [{"name": f"stage{i + 1}", "address": "127.0.0.1:0", "layers": list(r), "caches": caches,
            "lm_head": False} for i, r in enumerate(layers)]
    out[-1]["lm_head"] = lm_head
    return out


GOOD = ((0, 10), (10, 20), (20, 30))


def test_a_ring_that_covers_the_model_in_order_is_accepted() -> None:
    assert ring_problem(Topology.from_dict(base()), 30, ring(*GOOD)) is None


def test_each_kind_of_bad_ring_is_named() -> None:
    topo = Topology.from_dict(base())
    assert "malformed" in str(ring_problem(topo, 30, [{"name": "stage1", "layers": "0-9"}]))
    swapped = ring(*GOOD)
    swapped[0]["name"], swapped[1]["name"] = "stage2", "stage1"
    assert "passes through ['stage2', 'stage1', 'stage3']" in str(ring_problem(topo, 30, swapped))
    assert "leave a gap: node 'stage1' has layers 0-9 but node 'stage2' has layers 11-19" in str(
        ring_problem(topo, 30, ring((0, 10), (11, 20), (20, 30))))
    assert "overlap" in str(ring_problem(topo, 30, ring((0, 10), (9, 20), (20, 30))))
    assert "the stages end at layer 29 (node 'stage3') but the model has 32 layers" in str(
        ring_problem(topo, 32, ring(*GOOD)))
    assert "fewer KV caches than decoding.max_active (4) asks for: stage1 (2)" in str(
        ring_problem(topo, 30, ring(*GOOD, caches=2)))


def test_verify_at_the_last_stage_needs_its_lm_head() -> None:
    """A stage started from another topology file (verify: source) would leave every row
    unchosen: the source refuses the ring and says why, instead of serving it half-formed."""
    d = copy.deepcopy(base())
    d["decoding"] = {"verify": "last_stage"}
    topo = Topology.from_dict(d)
    assert ring_problem(topo, 30, ring(*GOOD, lm_head=True)) is None
    msg = str(ring_problem(topo, 30, ring(*GOOD)))
    assert "decoding.verify is last_stage, but the last stage 'stage3' holds no lm_head" in msg
    assert "same topology file" in msg
