"""A request's counters: what it sent, drafted, verified and pruned, why its rounds ended.

``Stats.as_dict`` is what a request reports (the API's ``flowspec`` field, the bench's
records, ``/metrics``); the bench sums these counters over requests (``bench/summary.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEPTHS_KEPT = 16  # acceptance by depth in a round: depths counted apart, the last one gathers the rest


@dataclass
class Stats:
    """Per-request counters."""

    new_tokens: int = 0
    segments_sent: int = 0  # ring trips started
    verifications: int = 0  # returned segments that advanced the accepted path
    rounds: int = 0  # draft-and-verify rounds: each ends with a token that was not drafted
    drafted: int = 0  # nodes the drafter proposed and the tree kept
    verified: int = 0  # drafted nodes sent through the target
    pruned: int = 0  # drafted nodes discarded (sent or not)
    pruned_sent: int = 0  # of which had been sent (wasted ring work)
    accepted_drafts: int = 0  # drafted nodes accepted
    # why rounds ended (the request's last round, cut by its end, is neither):
    ends_missed: int = 0  # the token had drafted children, none of them the target's next token
    ends_undrafted: int = 0  # the token had no drafted children yet (the tree had not grown to it)
    # acceptance by depth in a round: [d] counts the verified tokens that had d drafted tokens
    # accepted before them in their round, and of those, the ones whose target's next token
    # was a drafted child (the last index gathers the deeper ones)
    depth_steps: list[int] = field(default_factory=list)
    depth_accepted: list[int] = field(default_factory=list)
    chosen_at_last_stage: int = 0  # rows whose target token the last stage chose (decoding.verify)
    draft_s: float = 0.0  # source time spent drafting
    verify_s: float = 0.0  # source time spent in the lm_head and acceptance

    def step(self, depth: int, accepted: bool) -> None:
        """A verified token at `depth` in its round: its target's next token was a drafted child or not."""
        d = min(depth, DEPTHS_KEPT - 1)
        while len(self.depth_steps) <= d:
            self.depth_steps.append(0)
            self.depth_accepted.append(0)
        self.depth_steps[d] += 1
        self.depth_accepted[d] += int(accepted)

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["depth_steps"] = list(self.depth_steps)
        d["depth_accepted"] = list(self.depth_accepted)
        d["draft_s"] = round(self.draft_s, 4)
        d["verify_s"] = round(self.verify_s, 4)
        d["mean_accepted"] = round(self.new_tokens / self.verifications, 3) if self.verifications else 0.0
        d["tau"] = round(self.new_tokens / self.rounds, 3) if self.rounds else 0.0
        return d
