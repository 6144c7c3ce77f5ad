"""The drafter interface every strategy uses."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from ..tree import DraftTree, Node


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


class NoDrafter(Drafter):
    """Proposes nothing: speculation degenerates to one token per round."""

    name = "none"

    def propose(self, view: DraftView, frontier: list[Node], k: int) -> list[list[tuple[int, float]]]:
        return [[] for _ in frontier]
