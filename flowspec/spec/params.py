"""What a decoding request may set about the algorithm, without torch: the strategy names
and the shape of the draft tree, with the bounds a request may give each setting."""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("autoregressive", "chunked", "pipedec", "flowspec")
# Where the target's token after each returned row is chosen: at the source (it holds the
# lm_head) or at the last stage (which then returns token ids with the hidden states).
VERIFY_AT = ("source", "last_stage")


@dataclass(frozen=True)
class TreeParams:
    """Shape of the draft tree and of the stream of segments."""

    depth: int = 5  # levels below the root a draft may reach
    top_k: int = 8  # children per node, and width of each drafted level
    total: int = 64  # nodes in a round's tree (chunked) / live unverified nodes (flowspec)
    segment: int = 16  # nodes per segment
    expand: int = 32  # nodes added per dynamic expansion (flowspec)
    in_flight: int = 3  # segments in the ring at once (pipedec, flowspec)


# Inclusive bounds of each TreeParams field where a request may set it (a tuning run of
# `flowspec bench`); the request's token budget (max_context) bounds them further.
TREE_LIMITS: dict[str, tuple[int, int]] = {
    "depth": (1, 32), "top_k": (1, 64), "total": (1, 4096), "segment": (1, 512),
    "expand": (1, 4096), "in_flight": (1, 64),
}
