"""The ring's order as it is now: the topology's own, or with spares in dead stages' places.

Every node starts from the file's order (epoch 0). Only the source makes a new plan: when a
spare takes a dead stage's place (failover.py) it puts the spare's name at that position
and raises the epoch. Nodes learn a plan from the RING frame the source sends along the
ring, from the FORM frame, and from each other's HELLO and REJECT frames at every
handshake; a node always keeps the plan with the highest epoch it has seen. So a node that
was restarted (epoch 0) catches up at its first handshake, and a stage whose place was
given away learns it the moment it knocks on its old successor's door.

A position keeps its layers: the node at position i serves the layers of the file's i-th
stage (its *slot*), whoever it is."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import Topology
from .protocol import ProtocolError


@dataclass(frozen=True)
class RingPlan:
    """Who sits where in the ring."""

    epoch: int  # 0: the topology file's order; raised by the source at every failover
    order: tuple[str, ...]  # node names in ring order, the source first
    slots: tuple[str, ...]  # the file's own node at each position: whose layers that position serves

    @classmethod
    def initial(cls, topo: Topology) -> "RingPlan":
        names = (topo.source.name,) + tuple(n.name for n in topo.stages)
        return cls(0, names, names)

    def __contains__(self, name: object) -> bool:
        return name in self.order

    def successor(self, name: str) -> str:
        i = self.order.index(name)
        return self.order[(i + 1) % len(self.order)]

    def predecessor(self, name: str) -> str:
        i = self.order.index(name)
        return self.order[(i - 1) % len(self.order)]

    def slot_of(self, name: str) -> str:
        """The file's stage whose layers `name` serves in this plan."""
        return self.slots[self.order.index(name)]

    def replaced(self, dead: str, spare: str, epoch: int) -> "RingPlan":
        """This plan with `spare` at `dead`'s position, as epoch `epoch`."""
        if dead not in self.order or spare in self.order or dead == self.order[0] or epoch <= self.epoch:
            raise ValueError(f"cannot put {spare!r} in the place of {dead!r} (epoch {epoch}) in {self}")
        return RingPlan(epoch, tuple(spare if n == dead else n for n in self.order), self.slots)

    def as_meta(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "order": list(self.order)}

    @classmethod
    def from_meta(cls, topo: Topology, meta: Any) -> "RingPlan | None":
        """The plan a peer sent (None when it sent none); ProtocolError when it cannot be one
        of this topology: the source first, every position filled by a distinct node of the
        file that is not the source."""
        if meta is None:
            return None
        base = cls.initial(topo)
        if not isinstance(meta, dict):
            raise ProtocolError(f"a ring plan must be a mapping, not {type(meta).__name__}")
        epoch, order = meta.get("epoch"), meta.get("order")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ProtocolError(f"a ring plan's epoch must be an integer >= 0, not {epoch!r}")
        names = {n.name for n in topo.nodes}
        if (not isinstance(order, list) or len(order) != len(base.order) or order[:1] != [base.order[0]]
                or len(set(map(str, order))) != len(order)
                or not all(isinstance(n, str) and n in names for n in order[1:])
                or base.order[0] in order[1:]):
            raise ProtocolError(f"ring plan {str(order)[:200]} does not fit the topology (the source "
                                f"{base.order[0]!r}, then {len(base.order) - 1} distinct other nodes of the file); "
                                "is every node running the same topology file?")
        return cls(epoch, tuple(order), base.slots)

    def __str__(self) -> str:
        return " -> ".join(self.order) + f" (epoch {self.epoch})"
