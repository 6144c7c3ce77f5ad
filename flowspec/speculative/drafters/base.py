"""The drafter interface every strategy uses."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Generator, Sequence, TypeVar

import torch

from ..tree import DraftTree, Node

Proposals = list[list[tuple[int, float]]]  # per frontier node: (token, log-probability) children, best first
T = TypeVar("T")
# A stepped expansion: it yields a DraftCall whenever it needs children, takes their proposals
# back, and returns its result (see Speculator.think_steps and speculative/drafting.py).
Steps = Generator["DraftCall", Proposals, T]


@dataclass
class DraftView:
    """What a drafter may read: the accepted sequence and the live draft tree."""

    chain_ids: list[int]  # node ids of every accepted token (prompt first), the root last
    chain_tokens: list[int]  # their tokens
    tree: DraftTree  # live tree; tree.root == chain_ids[-1]
    hidden: dict[int, torch.Tensor]  # the target's final hidden state per accepted node id, where known

    def context(self, node: Node) -> list[int]:
        """Every token from the start of the sequence up to and including `node`."""
        return self.chain_tokens + self.tree.path(node.id)


def uncomputed_path(tree: DraftTree, frontier: list[Node], computed: Callable[[Node], bool]) -> list[Node]:
    """The nodes a drafter must still run before it can propose children of `frontier`: each
    frontier node and its ancestors up to (not including) the first one `computed` accepts,
    every node once, in the order they are found (a node before its ancestors)."""
    need: dict[int, Node] = {}
    for f in frontier:
        n = f
        while not computed(n):
            need[n.id] = n
            n = tree[n.parent]
    return list(need.values())


@dataclass
class DraftCall:
    """One request's need for children: the arguments of ``Drafter.propose``, with the drafter
    (the request's own state) that serves them. A request's expansion yields these one at a
    time (``Speculator.think_steps``), so a driver may serve several requests' calls together."""

    drafter: "Drafter"  # the request's drafter
    view: DraftView  # its accepted sequence and live tree
    frontier: list[Node]  # the nodes whose children are wanted
    k: int  # children per node, at most
    seconds: float = 0.0  # drafting time charged to this call (set by whoever serves it)


@dataclass
class PassCount:
    """Drafter passes (a forward over the drafter's weights) spent on a set of calls."""

    run: int = 0  # passes run
    alone: int = 0  # passes the same calls would have run one by one

    def add(self, other: "PassCount") -> None:
        self.run += other.run
        self.alone += other.alone


class Drafter(ABC):
    """Proposes children with draft log-probabilities for frontier nodes of the tree."""

    name: str = "drafter"
    needs_hidden: bool = False  # needs the target's final hidden states of accepted tokens

    def begin(self, prompt: list[int]) -> None:
        """A new request starts; forget the previous one."""

    def spawn(self) -> "Drafter":
        """A drafter for another request decoded at the same time: the same weights, its own
        per-request state. Drafters that keep state between calls (caches) must override
        this; a stateless one is its own spawn."""
        return self

    def ready(self, view: DraftView, node: Node) -> bool:
        """Whether children of `node` can be proposed now (feature drafters wait for hidden states)."""
        return True

    @abstractmethod
    def propose(self, view: DraftView, frontier: list[Node], k: int) -> list[list[tuple[int, float]]]:
        """Up to k (token, log-probability) children for each frontier node, best first."""

    def batch_key(self) -> object | None:
        """Drafters whose keys are the same object (not None) serve their calls together in
        one ``propose_together`` (per-request states over the same weights); None: alone."""
        return None

    @classmethod
    def propose_together(cls, calls: Sequence[DraftCall]) -> tuple[list[Proposals | Exception], PassCount]:
        """Every call's proposals, as each call's own ``propose`` returns them (up to float
        rounding), or the exception that call met; the calls share one ``batch_key``. This
        default serves them one by one."""
        out: list[Proposals | Exception] = []
        for c in calls:
            try:
                out.append(c.drafter.propose(c.view, c.frontier, c.k))
            except Exception as e:  # noqa: BLE001 -- it stays with its own call
                out.append(e)
        return out, PassCount()


class NoDrafter(Drafter):
    """Proposes nothing: speculation degenerates to one token per round."""

    name = "none"

    def propose(self, view: DraftView, frontier: list[Node], k: int) -> list[list[tuple[int, float]]]:
        return [[] for _ in frontier]
