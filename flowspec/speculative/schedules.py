"""What makes the four strategies different: one small schedule object each.

A :class:`~flowspec.speculative.strategies.Speculator` holds the mechanics every strategy shares
(the draft tree, verification, tree updates, segments and their bookkeeping); its schedule
decides what to draft (``plan``), what the next segments carry (``fill``), when a returned
segment may be verified (``may_verify``) and whether drafting waits until the ring has been
fed (``sends_first``). Schedules are pure and deterministic like the rest of the algorithm;
each Speculator has its own instance, so a schedule may keep per-request state.

``plan``, ``returned`` and ``fill`` are stepped (generators, see ``Steps``): where they draft
they yield the drafter call and take its proposals back, so a driver can serve the calls of
several requests together; ``yield from ()`` marks one that never drafts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .drafters.base import Steps
from .params import STRATEGIES, TreeParams
from .tree import Node

if TYPE_CHECKING:
    from .strategies import Send, Speculator


class Schedule:
    """The default: plan, then send segments of unsent nodes while the ring has room."""

    drafts = True  # whether the strategy uses the drafter at all
    sends_first = False  # True: respond() sends only what is drafted; think() drafts afterwards

    def max_in_flight(self, tree: TreeParams) -> int:
        """Segments this strategy keeps in the ring at once, at most."""
        return max(1, tree.in_flight)

    @classmethod
    def cache_reserve(cls, tree: TreeParams) -> int:
        """KV cache rows a request may hold beyond its accepted tokens (speculative nodes)."""
        return tree.total + tree.segment * (tree.in_flight + 1)

    def may_verify(self, s: Speculator) -> bool:
        """Whether the returned segments may be verified now."""
        return True

    def returned(self, s: Speculator) -> Steps[None]:
        """A returned segment has been verified (and the request is not done)."""
        yield from ()

    def plan(self, s: Speculator) -> Steps[None]:
        """Decide which nodes exist before filling the ring."""
        yield from ()

    def pick(self, s: Speculator, unsent: list[Node]) -> list[Node]:
        """The nodes of the next segment, from the unsent ones in score order."""
        return unsent[: s.p.segment]

    def fill(self, s: Speculator, plan: bool = True) -> Steps[list[Send]]:
        """Segments of unsent nodes while the ring has room; plan=False sends only what is drafted."""
        sends: list[Send] = []
        if s.done:
            return sends
        while s.in_flight < s.share:
            nodes = self.pick(s, s.tree.unsent())
            if not nodes:
                break
            sends.append(s._send(s._segment(nodes)))
            if plan:
                yield from s._plan()
        return sends


class Autoregressive(Schedule):
    """One token per ring trip: the root alone, never a draft."""

    drafts = False

    @classmethod
    def cache_reserve(cls, tree: TreeParams) -> int:
        return 2  # the root in flight and the next one

    def max_in_flight(self, tree: TreeParams) -> int:
        return 1


class Chunked(Schedule):
    """Chunk-PP: one whole EAGLE-2 tree per round, cut into chunks that are sent back to
    back and verified only when all of them are back."""

    def __init__(self) -> None:
        self.round_open = False  # a round is in the ring

    def may_verify(self, s: Speculator) -> bool:
        return s.in_flight == 0

    def returned(self, s: Speculator) -> Steps[None]:
        if s.in_flight == 0:
            self.round_open = False
        yield from ()

    def plan(self, s: Speculator) -> Steps[None]:
        if self.round_open or s.tree[s.tree.root].known():
            return
        yield from s._grow_steps(s.p.total, s.p.top_k, s.p.depth)

    def fill(self, s: Speculator, plan: bool = True) -> Steps[list[Send]]:
        yield from ()
        if s.done or self.round_open:
            return []
        unsent = s.tree.unsent()
        if not unsent:
            return []
        sends = [s._send(s._segment(unsent[a : a + s.p.segment])) for a in range(0, len(unsent), s.p.segment)]
        self.round_open = True
        return sends


class PipeDec(Schedule):
    """One new tree level per segment; levels stream through the ring and are verified as
    they come back."""

    def plan(self, s: Speculator) -> Steps[None]:
        tree = s.tree
        if any(not n.sent for n in tree) or len(tree) - 1 >= s.p.total:
            return
        deepest = max(tree.depth(n.id) for n in tree)
        if deepest >= s.p.depth:
            return
        level = sorted((n for n in tree if tree.depth(n.id) == deepest and not n.expanded), key=Node.sort_key)
        new = yield from s._draft_level_steps(level[: s.p.top_k], s.p.top_k)
        for n in new[s.p.top_k :]:  # the level keeps its best top_k nodes
            del tree[n.parent].children[n.token]
            del tree.nodes[n.id]
        s.stats.drafted += len(new[: s.p.top_k])

    def pick(self, s: Speculator, unsent: list[Node]) -> list[Node]:
        if not unsent:
            return unsent
        depth = s.tree.depth(unsent[0].id)  # one level (the root travels with the first)
        return [n for n in unsent if s.tree.depth(n.id) <= depth + (1 if depth == 0 else 0)]


class FlowSpec(Schedule):
    """Segments in score order, step-wise verification as each returns, and dynamic
    expansion from the new frontier; a returning segment is answered from nodes drafted
    before ("send first, think later")."""

    sends_first = True

    def returned(self, s: Speculator) -> Steps[None]:
        """Where the target's token matched no draft, the new root travels with its subtree,
        drafted before it is sent, so a round's first segment can accept more than the root's
        token when it comes back. With several segments of its own in flight the root takes
        one level (one head pass): deeper levels follow in the next segments, drafted by
        ``plan`` while the ring works, and drafted with the root they would delay the whole
        round (tools/simulate_ring.py on edge-5: one level 1.92x autoregressive, none 1.80x,
        two 1.77x). A request with one segment in the ring (its tree's in_flight, or its share
        when others use the ring) sends nothing else before this segment returns, so its
        segment takes the best nodes of ``SHARED_LEVELS`` levels (see ``plan``)."""
        root = s.tree[s.tree.root]
        if s.p.segment > 1 and not root.sent and not root.children:
            levels = min(s.p.depth, SHARED_LEVELS) if s.share == 1 else 1
            yield from s._grow_steps(min(s.p.segment - 1, s.p.total), s.p.top_k, levels)

    def plan(self, s: Speculator) -> Steps[None]:
        """Expand the tree from its frontier while the ring works, so that returning segments
        find their successors drafted. Not for a request that shares the ring with one
        segment of its own: what it drafts meanwhile is used only where the returning
        segment is accepted to its end (the round drafts from its new root otherwise,
        ``returned``), and the source, which drafts for every request, is then busy with
        the others' rounds. Alone, the source has nothing else to do while the ring works."""
        if s.share == 1 and s.shared:
            return
        unsent = sum(1 for n in s.tree if not n.sent)
        live = len(s.tree) - 1
        if unsent < s.p.segment and live < s.p.total:
            yield from s._grow_steps(min(s.p.expand, s.p.total - live), s.p.top_k, s.p.depth)


# Levels below a new root drafted before it is sent, for a request with one segment in the
# ring. In memory (10 MT-bench turns x 128 tokens, the bundled head, edge-5's tree: segments
# of 8, top_k 4, one segment in flight; tokens per segment / head passes per segment):
# before, one level with expansions while the ring works 1.74 / 3.65; two levels and no
# expansion 1.96 / 2.0; three 2.03 / 3.0; four 2.05 / 3.7 (with expansions 2.10 / 6.0).
SHARED_LEVELS = 2


SCHEDULES: dict[str, type[Schedule]] = {
    "autoregressive": Autoregressive, "chunked": Chunked, "pipedec": PipeDec, "flowspec": FlowSpec}
assert tuple(SCHEDULES) == STRATEGIES, "every strategy name needs a schedule"
