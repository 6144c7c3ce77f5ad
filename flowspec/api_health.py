"""``GET /health``'s body: the ring as it is now, read from the source's own status.

The source's status carries the ring plan (who sits where: the topology's order, or a spare
in a dead stage's place; runtime/ring_plan.py), the spares connected to it, the nodes
reported dead since the ring broke, and the last formed ring's FORM entries (the layers of
each position: a spare serves its place's layers). So:

* ``nodes``: the ring in the plan's order, the source first. A spare that took a stage's
  place is a ``stage`` there, with ``in_place_of`` naming the file's stage whose layers it
  serves. ``status`` is ``up`` on a formed ring; on a broken one ``unreachable`` for a node
  reported dead (or the source's successor when the source has no link to it), ``not
  connected`` for the source's predecessor when it has not connected, ``up`` for a
  neighbour of the source whose link is up, else ``unknown``.
* ``spares``: every other node of the file, in file order: declared spares, and stages
  whose place a spare took. ``waiting`` when it is connected to the source (ready to take a
  place), else ``not connected``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .runtime.ring_plan import RingPlan

if TYPE_CHECKING:
    from .config import Topology
    from .runtime.source_node import SourceNode


def ring_health(node: "SourceNode", topo: "Topology") -> dict[str, Any]:
    """The ring's status: formed or not, the nodes in ring order and the spares."""
    st = node.status()
    formed = bool(st.get("formed"))
    plan = RingPlan.from_meta(topo, st.get("plan")) or RingPlan.initial(topo)
    # the last formed ring, one entry per position: a position keeps its layers whoever holds it
    formed_ring = list(st.get("ring") or [])
    layers = ([r.get("layers") for r in formed_ring] if len(formed_ring) == len(plan.order) - 1 else [])
    down = set(st.get("down") or [])
    links = _Links(plan.successor(plan.order[0]), node.links.downstream is not None,
                   plan.predecessor(plan.order[0]), node.links.upstream is not None)
    nodes: list[dict[str, Any]] = []
    for i, name in enumerate(plan.order):
        spec, slot = topo.node(name), plan.slot_of(name)
        entry: dict[str, Any] = {"name": name, "role": "source" if spec.is_source else "stage",
                                 "address": f"{spec.host}:{spec.port}"}
        if slot != name:
            entry["in_place_of"] = slot
        entry["status"] = "up" if spec.is_source or formed else links.status(name, down)
        if 0 < i <= len(layers):
            entry["layers"] = layers[i - 1]
        nodes.append(entry)
    connected = set(st.get("spares") or [])
    spares = [{"name": n.name, "role": "spare", "address": f"{n.host}:{n.port}",
               "status": "waiting" if n.name in connected else "not connected"}
              for n in topo.nodes if n.name not in plan]
    return {"status": "ok" if formed else "unavailable", "formed": formed, "error": st.get("error"),
            "cluster": st.get("cluster"), "model": str(topo.model.target), "busy": st.get("busy"),
            "active": st.get("active"), "max_active": st.get("max_active"), "waiting": st.get("waiting"),
            "epoch": plan.epoch, "nodes": nodes, "spares": spares}


@dataclass(frozen=True)
class _Links:
    """The source's own links: to its successor and from its predecessor."""

    succ: str
    down_ok: bool
    pred: str
    up_ok: bool

    def status(self, name: str, down: set[str]) -> str:
        """A node's status on a ring that is not formed."""
        if name in down or (name == self.succ and not self.down_ok):
            return "unreachable"
        if name == self.pred and not self.up_ok:
            return "not connected"
        return "up" if name in (self.succ, self.pred) else "unknown"
