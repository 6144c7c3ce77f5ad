"""What a decoding request may set about the algorithm, without torch: the strategy names,
the shape of the draft tree and the target's sampling settings, with the bounds of each
field declared next to it (:mod:`.bounds`). :mod:`.request` gathers them into one request.
Also how a drafter is named (:func:`split_drafter`), read here for the topology and every
command line alike."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .bounds import FieldError, Integer, Number, allows, show, suggest

STRATEGIES = ("autoregressive", "chunked", "pipedec", "flowspec")
# Where the target's token after each returned row is chosen: at the source (it holds the
# lm_head), at the last stage (which then returns token ids with the hidden states), or
# auto: at the last stage while other requests share the ring, at the source when alone.
VERIFY_AT = ("source", "last_stage", "auto")


def head_at_last_stage(verify: str) -> bool:
    """Whether a ring whose decoding.verify is `verify` loads the lm_head on its last stage."""
    return verify != "source"


def verify_here(verify: str, shared: bool) -> str:
    """Where a segment of a request with this `verify` gets its tokens chosen: "source" or
    "last_stage" (auto: the last stage while the request shares the ring with others; alone,
    the source, whose lm_head scores only the rows still alive when they come back)."""
    if verify == "auto":
        return "last_stage" if shared else "source"
    return verify
SEED_MIN, SEED_MAX = -(1 << 63), (1 << 63) - 1  # a seed is hashed as a signed 64-bit integer
MAX_TOP_LOGPROBS = 20  # most likely alternatives a request may ask for per token (OpenAI's bound)
# Where draft tokens come from: none; lookup (n-grams of the prompt); eagle (a feature head: the
# bundled one, or eagle:PATH); model (a smaller LM with the target's tokenizer: model:PATH)
DRAFTERS = ("none", "lookup", "eagle", "model")
DRAFTER_FORMS = "none, lookup, eagle, eagle:PATH, model:PATH"  # every way a drafter is written


@dataclass(frozen=True)
class TreeParams:
    """Shape of the draft tree and of the stream of segments. The bounds are those a topology
    or a request (a tuning run of `flowspec bench`) may give; a request's token budget
    (max_context) bounds them further."""

    depth: int = field(default=5, metadata=allows(Integer(1, 32)))  # levels below the root a draft may reach
    top_k: int = field(default=8, metadata=allows(Integer(1, 64)))  # children per node, and width of each drafted level
    # nodes in a round's tree (chunked) / live unverified nodes (flowspec)
    total: int = field(default=64, metadata=allows(Integer(1, 4096)))
    segment: int = field(default=16, metadata=allows(Integer(1, 512)))  # nodes per segment
    expand: int = field(default=32, metadata=allows(Integer(1, 4096)))  # nodes added per dynamic expansion (flowspec)
    # segments in the ring at once (pipedec, flowspec)
    in_flight: int = field(default=3, metadata=allows(Integer(1, 64)))


# Inclusive bounds of each TreeParams field, as (lo, hi): read from the fields' rules
TREE_LIMITS: dict[str, tuple[int, int]] = {
    f.name: (f.metadata["allows"].lo, f.metadata["allows"].hi) for f in dataclasses.fields(TreeParams)
}


@dataclass(frozen=True)
class SamplingParams:
    """How the target's next token is chosen (:mod:`.sampling` does it)."""

    # 0 = greedy; > 0 = sample from softmax(logits / temperature); at most 2, as in OpenAI's API
    temperature: float = field(default=0.0, metadata=allows(Number(0.0, 2.0)))
    # nucleus: keep the smallest set of tokens whose mass reaches top_p
    top_p: float = field(default=1.0, metadata=allows(Number(0.0, 1.0, lo_open=True)))
    # keep the k most likely tokens (0 = all); a ring also caps it at its vocabulary
    top_k: int = field(default=0, metadata=allows(Integer(0)))
    # seed of the per-position random numbers
    seed: int = field(default=0, metadata=allows(Integer(SEED_MIN, SEED_MAX)))

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def split_drafter(text: Any) -> tuple[str, str | None]:
    """A drafter as written (:data:`DRAFTER_FORMS`; spaces around the kind and the path are
    ignored) as (kind, path); path None = no file (for eagle: the bundled head). Raises
    FieldError("", reason), the reason saying what is allowed."""
    if not isinstance(text, str) or not text.strip():
        raise FieldError("", f"must be one of {DRAFTER_FORMS}, not {show(text)}")
    kind, sep, path = (part.strip() for part in text.strip().partition(":"))
    if kind not in DRAFTERS:
        raise FieldError("", f"unknown drafter {show(text)}{suggest(kind, DRAFTERS)}; allowed: {DRAFTER_FORMS}")
    if kind in ("none", "lookup") and sep:
        raise FieldError("", f"{kind!r} takes no path; allowed: {DRAFTER_FORMS}")
    if not path and (sep or kind == "model"):
        raise FieldError("", f"{show(text)} needs a path after ':'; allowed: {DRAFTER_FORMS}")
    return kind, path or None

