"""Decoding strategies as sans-I/O state machines with one interface.

A strategy never touches a socket. The driver (the in-memory ring in tests, the source
node over TCP) calls ``start()`` and then ``on_result()`` for every segment that comes
back around the ring, in order, and sends what they return: a tree update (commit ids,
drop ids) followed by a segment, in band on the same FIFO stream. Because a strategy
reacts only to results, in order, a run is deterministic whatever the timing.

* ``autoregressive``: one token per ring trip.
* ``chunked`` (Chunk-PP): one whole draft tree per round, cut into chunks that are sent
  back to back and verified when all are back.
* ``pipedec``: one tree level per segment; levels stream through the pipeline and are
  verified as they come back.
* ``flowspec``: segments ordered by draft score, step-wise verification as each one
  returns, in-band pruning, and dynamic expansion from the new frontier so the ring never
  runs dry.

The ``Speculator`` holds what they share; each strategy's own choices (what to draft,
what a segment carries, when to verify) are its schedule in ``schedules.py``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence, TypeVar

import torch

from ..model.stage import Segment
from .drafters.base import DraftCall, Drafter, DraftView, NoDrafter, Steps
from .logprobs import TokenLogprob, from_wire, token_logprob
from .params import STRATEGIES, TREE_LIMITS, TreeParams  # noqa: F401 -- STRATEGIES, TREE_LIMITS re-exported
from .sampling import SamplingParams
from .schedules import SCHEDULES
from .stats import Stats
from .tree import DraftTree, Node
from .verify import accept_deterministic

T = TypeVar("T")


@dataclass
class Send:
    """What the driver sends next: an update, then (optionally) a segment, on the same stream."""

    commit: list[int]  # node ids that join the committed prefix, in order
    drop: list[int]  # node ids whose KV entries are discarded
    segment: Segment | None  # new nodes to run, or None for an update alone


class Speculator:
    """One request, decoded by one strategy."""

    def __init__(
        self,
        strategy: str,
        head: Callable[[torch.Tensor], torch.Tensor],
        drafter: Drafter | None,
        prompt: Sequence[int],
        max_new_tokens: int,
        eos_ids: Sequence[int] = (),
        sampling: SamplingParams = SamplingParams(),
        tree: TreeParams = TreeParams(),
        prefill_chunk: int = 256,
        logprobs: int | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        if not prompt:
            raise ValueError("the prompt is empty")
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        self.strategy = strategy
        self.schedule = SCHEDULES[strategy]()  # what this strategy drafts, sends and verifies when
        self.head = head
        self.drafter: Drafter = drafter if self.schedule.drafts and drafter is not None else NoDrafter()
        self.prompt = list(prompt)
        self.max_new_tokens = max_new_tokens
        self.eos = set(eos_ids)
        self.sampling = sampling
        self.p = tree
        self.prefill_chunk = prefill_chunk
        self.tree = DraftTree()
        self.output: list[int] = []
        # None: no log-probabilities recorded (the default costs nothing); n >= 0: the target's
        # log-probability of every accepted token, with its n most likely alternatives
        self.logprobs = logprobs
        self.token_logprobs: list[TokenLogprob] = []  # one per token of `output`, when recorded
        self.stats = Stats()
        self._round_depth = 0  # drafted tokens accepted so far in the current round
        self.done = False
        self.in_flight = 0
        self._sent: set[int] = set()
        self._to_commit: list[int] = []
        self._to_drop: list[int] = []
        self._chain_ids: list[int] = []
        self._chain_tokens: list[int] = []
        self._hidden: dict[int, torch.Tensor] = {}  # target features of accepted nodes (feature drafters)
        self._prompt_ids: set[int] = set()
        self._max_in_flight = self.schedule.max_in_flight(tree)
        self.share = self._max_in_flight  # this request's share of the ring (see limit_in_flight)
        self.shared = False  # other requests use the ring, and the source's time, now (see limit_in_flight)
        # prompt chunks in the ring at once while the prompt goes out; None = all at once (alone)
        self._prefill_window: int | None = None
        self._prefill_left: deque[Segment] = deque()  # prompt chunks not sent yet
        self._prefilling = False  # the prompt's last chunk (with the root) is not sent yet
        self.drafter.begin(self.prompt)

    def limit_in_flight(self, n: int, shared: bool | None = None) -> None:
        """At most n of this request's segments in the ring at once (its share when other
        requests fill the ring too); the tree's own in_flight stays the upper bound. The
        output does not depend on it: only how far ahead the request speculates.
        `shared`: whether other requests use the ring now (None: whether n is below the
        tree's in_flight); a shared request with one segment drafts only when it returns
        (see schedules.FlowSpec).

        A request that shares the ring (n below its tree's in_flight) also sends its prompt
        n chunks at a time, the next as one comes back, so that a long prefill does not
        hold back the segments of the others; alone, it sends every chunk at once."""
        self.share = max(1, min(n, self._max_in_flight))
        self.shared = n < self._max_in_flight if shared is None else shared
        self._prefill_window = max(1, n) if n < self.p.in_flight else None

    # ----------------------------------------------------------------- driver API
    def start(self) -> list[Send]:
        """Prefill segments for the prompt, then the first speculative segments."""
        ids = self.tree.take_ids(len(self.prompt) - 1)
        ids.append(self.tree.set_root(self.prompt[-1], ids[-1] if ids else -1, len(self.prompt) - 1).id)
        self._chain_ids = list(ids)
        self._chain_tokens = list(self.prompt)
        self._prompt_ids = set(ids[:-1])
        self._to_commit = list(ids)
        for a in range(0, len(ids), self.prefill_chunk):
            chunk = ids[a : a + self.prefill_chunk]
            self._prefill_left.append(
                Segment(chunk, [i - 1 if i > ids[0] else -1 for i in chunk], list(range(a, a + len(chunk))),
                        tokens=torch.tensor(self.prompt[a : a + len(chunk)]),
                        score_from=len(chunk) - 1 if a + len(chunk) == len(ids) else None))  # the root's row
        self._prefilling = True
        return self._alone(self._prefill_steps())

    def _prefill_steps(self) -> Steps[list[Send]]:
        """The prompt's next chunks, as many as the prefill window allows; once the last one
        (with the root) is out, the first speculative segments follow it."""
        sends = []
        while self._prefill_left and (self._prefill_window is None or self.in_flight < self._prefill_window):
            sends.append(self._send(self._prefill_left.popleft()))
        if self._prefill_left:
            return sends
        self._prefilling = False
        self.tree[self.tree.root].sent = True
        yield from self._plan()
        return sends + (yield from self._fill())

    def on_result(self, node_ids: Sequence[int], hidden: torch.Tensor,
                  targets: Sequence[int] | None = None, target_lps: Sequence[Any] | None = None) -> list[Send]:
        """A segment came back from the last stage: verify, prune, expand, send more.

        The same as ``respond()`` followed by ``think()``; a driver that can send in between
        (the source node) calls the two halves itself, so the ring is fed before drafting."""
        return self.respond(node_ids, hidden, targets=targets, target_lps=target_lps) + self.think()

    def rows_to_score(self, node_ids: Sequence[int], targets: Sequence[int] | None = None) -> list[int]:
        """Rows of a returned segment whose target token is still unknown: what ``respond``
        would run through the lm_head now (rows whose token the last stage chose, `targets`
        >= 0, need none). A driver with several results at hand (of this request or of
        others) may score all their rows in one lm_head pass and hand the logits to
        ``respond``; results still to come only lose rows, never gain any."""
        if self.done:
            return []
        tree = self.tree
        return [i for i, n in enumerate(node_ids) if n in tree and not tree[n].known()
                and (targets is None or targets[i] < 0)]

    def respond(self, node_ids: Sequence[int], hidden: torch.Tensor,
                scored: Mapping[int, torch.Tensor] | None = None,
                targets: Sequence[int] | None = None, target_lps: Sequence[Any] | None = None) -> list[Send]:
        """First half of on_result: verify, prune, and send what is already drafted.

        flowspec answers a returning segment from the nodes drafted ahead ("send first,
        think later"); the other strategies plan here as well (their ``think`` is empty).
        `targets`: the target's token after each row where the last stage chose it (-1
        elsewhere); `scored` maps node ids to target logits computed beforehand (see
        ``rows_to_score``); rows with neither go through the lm_head here."""
        return self._alone(self.respond_steps(node_ids, hidden, scored, targets, target_lps))

    def respond_steps(self, node_ids: Sequence[int], hidden: torch.Tensor,
                      scored: Mapping[int, torch.Tensor] | None = None,
                      targets: Sequence[int] | None = None,
                      target_lps: Sequence[Any] | None = None) -> Steps[list[Send]]:
        """``respond``, stepped: what it drafts is asked of the driver (see ``think_steps``).
        `target_lps`: with `targets`, the last stage's logprob of each chosen token (the wire
        form of :func:`~.logprobs.wire`, None where none was chosen), when the request asked."""
        self.in_flight -= 1
        if self.done:
            return []
        t0 = time.perf_counter()
        if self.drafter.needs_hidden:  # prompt tokens' features, for feature drafters
            for i, n in enumerate(node_ids):
                if n in self._prompt_ids:
                    self._hidden[n] = hidden[i]
        if targets is not None:
            if len(targets) != len(node_ids):
                raise ValueError(f"{len(targets)} target tokens came back for {len(node_ids)} rows")
            for i, n in enumerate(node_ids):
                if targets[i] >= 0 and n in self.tree and not self.tree[n].known():
                    node = self.tree[n]
                    node.target = int(targets[i])
                    if target_lps is not None and target_lps[i] is not None:
                        node.target_lp = from_wire(node.target, target_lps[i])
                    self.stats.chosen_at_last_stage += 1
                    if self.drafter.needs_hidden:
                        node.hidden = hidden[i]
        rows = self.rows_to_score(node_ids)
        if rows:
            known = scored or {}
            missing = [i for i in rows if node_ids[i] not in known]
            fresh = dict(zip(missing, self.head(hidden[missing]))) if missing else {}
            for i in rows:
                node = self.tree[node_ids[i]]
                node.logits = fresh[i] if i in fresh else known[node_ids[i]]
                if self.drafter.needs_hidden:
                    node.hidden = hidden[i]
        advanced = self._verify()
        self.stats.verify_s += time.perf_counter() - t0
        if advanced:
            self.stats.verifications += 1
        if self.done:
            return []
        if self._prefilling:  # a prompt chunk came back: the next goes out
            return (yield from self._prefill_steps())
        yield from self.schedule.returned(self)
        if self.schedule.sends_first:
            return (yield from self._fill(plan=False))
        yield from self._plan()
        return (yield from self._fill())

    def think(self) -> list[Send]:
        """Second half of on_result: expand the tree from the new frontier (drafting) and send
        what fits into the ring; what does not fit waits, drafted, for the next ``respond``."""
        return self._alone(self.think_steps())

    def think_steps(self) -> Steps[list[Send]]:
        """``think``, stepped: a generator that yields a ``DraftCall`` each time the expansion
        needs children (one tree level), takes the proposals back, and returns the sends. A
        driver may advance several requests' expansions level by level and serve all their
        calls in shared drafter passes (speculative/drafting.py); the tree grows exactly as it does
        alone. Nothing else may touch this request until the generator has returned."""
        if self.done or not self.schedule.sends_first or self._prefilling:
            return []
        yield from self._plan()
        return (yield from self._fill())

    def _alone(self, steps: Steps[T]) -> T:
        """Run a stepped expansion, each call served by this request's drafter alone."""
        try:
            call = next(steps)
            while True:
                t0 = time.perf_counter()
                props = call.drafter.propose(call.view, call.frontier, call.k)
                call.seconds = time.perf_counter() - t0
                call = steps.send(props)
        except StopIteration as stop:
            return stop.value

    # ------------------------------------------------------------- verification
    def _verify(self) -> bool:
        """Walk from the root along accepted children while the target's logits are known."""
        advanced = False
        if not self.schedule.may_verify(self):
            return False  # e.g. Chunk-PP verifies a round only when all its chunks are back
        while not self.done:
            root = self.tree[self.tree.root]
            if root.target is not None:  # chosen at the last stage, by the same rule
                tok, child = root.target, root.children.get(root.target)
            elif root.logits is not None:
                tok, child = accept_deterministic(root.logits, root.children, self.sampling, root.position + 1)
            else:
                break
            advanced = True
            self.output.append(tok)
            if self.logprobs is not None:
                if root.logits is not None:
                    self.token_logprobs.append(token_logprob(root.logits, tok, self.logprobs))
                elif root.target_lp is not None:  # computed where the token was chosen
                    self.token_logprobs.append(root.target_lp)
                else:
                    raise RuntimeError("this token was chosen at the last stage without its logprob "
                                       "(a stage of an older version?)")
            self.stats.step(self._round_depth, child is not None)
            if child is not None:
                pruned_sent, pruned = self.tree.advance(child)
                self.stats.accepted_drafts += 1
                self._round_depth += 1
                new = self.tree[child]
            else:
                if root.children:
                    self.stats.ends_missed += 1
                else:
                    self.stats.ends_undrafted += 1
                new, pruned_sent, pruned = self.tree.replace_root(tok)
                self.stats.rounds += 1
                self._round_depth = 0
            self._hidden_keep(root)
            self.stats.pruned += pruned
            self.stats.pruned_sent += len(pruned_sent)
            self._to_drop.extend(pruned_sent)
            self._chain_ids.append(new.id)
            self._chain_tokens.append(tok)
            self._to_commit.append(new.id)
            if tok in self.eos or len(self.output) >= self.max_new_tokens:
                self.done = True
                if child is not None:
                    self.stats.rounds += 1
        self.stats.new_tokens = len(self.output)
        return advanced

    def _hidden_keep(self, node: Node) -> None:
        if self.drafter.needs_hidden and node.hidden is not None:
            self._hidden[node.id] = node.hidden

    # ---------------------------------------------------------------- drafting
    def _view(self) -> DraftView:
        return DraftView(self._chain_ids, self._chain_tokens, self.tree, self._hidden)

    def _draft_level(self, frontier: list[Node], width: int) -> list[Node]:
        """Children of the frontier; the best `width` new nodes are returned (all are kept)."""
        return self._alone(self._draft_level_steps(frontier, width))

    def _draft_level_steps(self, frontier: list[Node], width: int) -> Steps[list[Node]]:
        view = self._view()
        frontier = [n for n in frontier if self.drafter.ready(view, n)]
        if not frontier:
            return []
        call = DraftCall(self.drafter, view, frontier, self.p.top_k)
        props = yield call
        self.stats.draft_s += call.seconds
        new: list[Node] = []
        for node, plist in zip(frontier, props):
            node.expanded = True
            for tok, lp in plist:
                c = self.tree.add_child(node.id, tok, lp)
                if c is not None:
                    new.append(c)
        new.sort(key=Node.sort_key)
        return new

    def _grow(self, budget: int, width: int, max_depth: int) -> int:
        """Add up to `budget` nodes the EAGLE-2 way: from the best `width` unexpanded nodes,
        draft level by level down to `max_depth`, each level expanding the best `width` of the
        previous level's new nodes; then keep the best `budget` new nodes by cumulative score.
        A child never scores above its parent and sorts after it on ties, so the kept nodes
        form a tree; a parent whose children were all dropped may be expanded again later."""
        return self._alone(self._grow_steps(budget, width, max_depth))

    def _grow_steps(self, budget: int, width: int, max_depth: int) -> Steps[int]:
        pool: list[Node] = []
        frontier = self.tree.frontier(width, max_depth)
        while frontier:
            new = yield from self._draft_level_steps(frontier, width)
            if not new:
                again = self.tree.frontier(width, max_depth)
                if [n.id for n in again] == [n.id for n in frontier]:
                    break  # no frontier node is ready (the drafter waits, e.g. for hidden states)
                frontier = again
                continue
            pool.extend(new)
            frontier = [n for n in new if self.tree.depth(n.id) < max_depth][:width]
            # nothing drafted below the frontier scores above its best node: once `budget` pool
            # nodes do, deeper levels cannot change the kept set (this saves most of the draft
            # time of small expansions when the drafter is unsure)
            if frontier and len(pool) >= budget:
                bound = frontier[0].score
                if sum(1 for n in pool if n.score > bound) >= budget:
                    break
        pool.sort(key=Node.sort_key)
        for n in reversed(pool[budget:]):  # worst first: children go before their parents
            parent = self.tree[n.parent]
            del parent.children[n.token]
            del self.tree.nodes[n.id]
            if not parent.children:
                parent.expanded = False
        added = min(len(pool), budget)
        self.stats.drafted += added
        return added

    def _plan(self) -> Steps[None]:
        """Decide which nodes exist before filling the ring (the schedule's choice)."""
        if not self.done:
            yield from self.schedule.plan(self)

    def _fill(self, plan: bool = True) -> Steps[list[Send]]:
        """Segments of unsent nodes while the ring has room; plan=False sends only what is drafted."""
        return self.schedule.fill(self, plan)

    def _segment(self, nodes: list[Node]) -> Segment:
        for n in nodes:
            n.sent = True
            if n.id != self.tree.root:
                self.stats.verified += 1
        return Segment([n.id for n in nodes], [n.parent for n in nodes], [n.position for n in nodes],
                       tokens=torch.tensor([n.token for n in nodes]), score_from=0)

    def _send(self, seg: Segment) -> Send:
        """The update goes first, so it may only commit nodes of segments sent earlier."""
        update = Send(self._commit_ready(), self._take_drops(), seg)
        self._sent.update(seg.node_ids)
        self.in_flight += 1
        self.stats.segments_sent += 1
        return update

    def _commit_ready(self) -> list[int]:
        """The accepted ids that every stage has already seen, in order."""
        n = 0
        while n < len(self._to_commit) and self._to_commit[n] in self._sent:
            n += 1
        out, self._to_commit = self._to_commit[:n], self._to_commit[n:]
        return out

    def _take_drops(self) -> list[int]:
        out, self._to_drop = self._to_drop, []
        return out

    def result_stats(self) -> dict[str, Any]:
        return self.stats.as_dict()

