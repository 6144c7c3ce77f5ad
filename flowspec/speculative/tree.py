"""The draft tree: stable node ids, parents, positions, cumulative draft scores.

The root is the last accepted token. Every other node is a drafted continuation with a
score, the cumulative draft log-probability of its path below the root. A child never
scores higher than its parent, so ordering by (score desc, position asc, id asc) is
topological: any prefix of that order can be sent as a segment whose ancestors come first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

import torch


@dataclass(eq=False)
class Node:
    id: int  # stable id, unique within a request
    token: int  # token id
    parent: int  # parent node id (-1: first token of the sequence)
    position: int  # sequence position
    score: float  # cumulative draft log-probability (the same for accepted nodes)
    children: dict[int, int] = field(default_factory=dict)  # child token -> child id
    sent: bool = False  # has been sent into the ring
    expanded: bool = False  # the drafter has proposed its children
    logits: torch.Tensor | None = None  # the target's logits after this node, once back
    target: int | None = None  # the target's token after this node, when the last stage chose it
    target_lp: Any = None  # its TokenLogprob, when the last stage chose it and the request wants logprobs
    hidden: torch.Tensor | None = None  # the target's final hidden state, once back

    def sort_key(self) -> tuple[float, int, int]:
        return (-self.score, self.position, self.id)

    def known(self) -> bool:
        """Whether the target's token after this node is known (its logits, or the token itself)."""
        return self.logits is not None or self.target is not None


class DraftTree:
    """Live nodes: the root (last accepted token) and its drafted descendants."""

    def __init__(self, first_id: int = 0) -> None:
        self.nodes: dict[int, Node] = {}
        self.root: int = -1
        self._next_id = first_id

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, nid: int) -> bool:
        return nid in self.nodes

    def __getitem__(self, nid: int) -> Node:
        return self.nodes[nid]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes.values())

    def take_ids(self, n: int) -> list[int]:
        """Reserve n fresh ids (for prompt tokens)."""
        ids = list(range(self._next_id, self._next_id + n))
        self._next_id += n
        return ids

    def set_root(self, token: int, parent: int, position: int, nid: int | None = None) -> Node:
        """Start a tree at an accepted token that is not a drafted child (prompt end, bonus)."""
        if nid is None:
            nid = self.take_ids(1)[0]
        node = Node(nid, token, parent, position, 0.0)
        self.nodes[nid] = node
        self.root = nid
        return node

    def add_child(self, parent: int, token: int, logp: float) -> Node | None:
        """Add a drafted child; None when the parent already has a child with that token."""
        p = self.nodes[parent]
        if token in p.children:
            return None
        lp = float(logp)
        if not lp <= 0.0:  # a child never scores above its parent (keeps unsent() topological)
            lp = 0.0 if lp > 0.0 else float("-inf")  # NaN: last
        nid = self.take_ids(1)[0]
        node = Node(nid, token, parent, p.position + 1, p.score + lp)
        p.children[token] = nid
        self.nodes[nid] = node
        return node

    def subtree(self, nid: int) -> list[int]:
        out, stack = [], [nid]
        while stack:
            n = stack.pop()
            out.append(n)
            stack.extend(self.nodes[n].children.values())
        return out

    def depth(self, nid: int) -> int:
        return self.nodes[nid].position - self.nodes[self.root].position

    def path(self, nid: int) -> list[int]:
        """Tokens from the root's first child down to nid (empty for the root)."""
        toks = []
        while nid != self.root:
            n = self.nodes[nid]
            toks.append(n.token)
            nid = n.parent
        return toks[::-1]

    def advance(self, child: int) -> tuple[list[int], int]:
        """Make a child of the root the new root; prune everything outside its subtree.

        Returns (ids of pruned nodes that were already sent, count of all pruned nodes).
        The old root leaves the tree (it is accepted, not pruned)."""
        old = self.nodes.pop(self.root)
        assert self.nodes[child].parent == old.id
        sent, count = [], 0
        for tok, c in old.children.items():
            if c == child:
                continue
            for n in self.subtree(c):
                node = self.nodes.pop(n)
                count += 1
                if node.sent:
                    sent.append(n)
        self.root = child
        return sent, count

    def replace_root(self, token: int) -> tuple[Node, list[int], int]:
        """The target's token is not among the root's children: prune the whole tree below
        the root and start a new one at a fresh node for that token."""
        old = self.nodes[self.root]
        sent, count = [], 0
        for c in old.children.values():
            for n in self.subtree(c):
                node = self.nodes.pop(n)
                count += 1
                if node.sent:
                    sent.append(n)
        del self.nodes[old.id]
        new = self.set_root(token, old.id, old.position + 1)
        return new, sent, count

    def unsent(self) -> list[Node]:
        """Unsent nodes in topological score order."""
        return sorted((n for n in self.nodes.values() if not n.sent), key=Node.sort_key)

    def frontier(self, width: int, max_depth: int) -> list[Node]:
        """The best `width` unexpanded nodes whose depth allows children."""
        cands = [n for n in self.nodes.values()
                 if not n.expanded and n.position - self.nodes[self.root].position < max_depth]
        cands.sort(key=Node.sort_key)
        return cands[:width]
