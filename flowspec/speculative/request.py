"""A decoding request: what a client may ask of the algorithm, defined and checked once.

:class:`DecodeRequest` holds every setting of one answer except its prompt (strategy, token
budget, sampling, draft-tree changes, stop strings, where to verify, logprobs), each field
with its rule next to it (:mod:`.bounds`; the sampling and tree bounds are those of
:class:`~.params.SamplingParams` and :class:`~.params.TreeParams`). :func:`check_decode` turns
plain data into one, or raises :class:`~.bounds.FieldError` naming the field
("temperature: must be a number in [0, 2], not 5").

Every front end is an adapter over it: the topology's ``decoding`` section (defaults, errors
at ``decoding.<field>``), the HTTP API (OpenAI names such as ``max_tokens``, errors with that
``param``), the binary clients' requests and the chat. The source adds only what depends on
its ring: the prompt, the context budget, the vocabulary.
No torch here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from .bounds import Changes, FieldError, Integer, OneOf, Texts, allows, rule_of
from .params import MAX_TOP_LOGPROBS, STRATEGIES, VERIFY_AT, SamplingParams, TreeParams

__all__ = ["DecodeRequest", "FieldError", "MAX_STOPS", "check_decode", "check_field"]

MAX_STOPS = 4  # stop strings per request (OpenAI's bound)


def _sampling(name: str) -> Any:
    """A field declared as SamplingParams declares it: the same default and rule."""
    f = next(f for f in dataclasses.fields(SamplingParams) if f.name == name)
    return field(default=f.default, metadata=f.metadata)


@dataclass(frozen=True)
class DecodeRequest:
    """How one answer is decoded; the prompt is not part of it."""

    strategy: str = field(default="flowspec", metadata=allows(OneOf(STRATEGIES, "strategy")))  # how the ring speculates
    max_new_tokens: int = field(default=128, metadata=allows(Integer(1)))  # the most tokens the answer may have
    temperature: float = _sampling("temperature")  # SamplingParams.temperature (0 = greedy)
    top_p: float = _sampling("top_p")  # SamplingParams.top_p
    top_k: int = _sampling("top_k")  # SamplingParams.top_k (0 = all)
    # SamplingParams.seed; None = a random seed drawn for the request
    seed: int | None = field(default=None, metadata=allows(dataclasses.replace(
        rule_of(SamplingParams, "seed"), null="random")))
    # this request's changes to the ring's draft tree (TreeParams fields, e.g. {"in_flight": 6})
    tree: Mapping[str, int] = field(default_factory=dict, metadata=allows(Changes(TreeParams)))
    stop: tuple[str, ...] = field(default=(), metadata=allows(Texts(MAX_STOPS)))  # the answer ends before the first
    # where the target's tokens are chosen: the source (its lm_head) or the last stage
    verify: str = field(default="source", metadata=allows(OneOf(VERIFY_AT, "verify")))
    # None: no logprobs; n: the target's logprob of each token with its n most likely alternatives
    logprobs: int | None = field(default=None, metadata=allows(Integer(
        0, MAX_TOP_LOGPROBS, note="the most likely alternatives to report with each token")))

    def sampling(self, random_seed: int) -> SamplingParams:
        """The target's sampling settings; `random_seed` stands in when the request has no seed."""
        return SamplingParams(self.temperature, self.top_p, self.top_k,
                              self.seed if self.seed is not None else random_seed)


FIELDS = tuple(f.name for f in dataclasses.fields(DecodeRequest))  # every field a request may set


def check_field(name: str, value: Any) -> Any:
    """One field of a request checked alone (the chat's slash commands): the checked value,
    or FieldError naming `name`."""
    try:
        return rule_of(DecodeRequest, name).read(value)
    except FieldError as e:
        raise e.within(name) from None


def check_decode(data: Mapping[str, Any], defaults: DecodeRequest | None = None, *, null_is_default: bool = True,
                 caps: Mapping[str, tuple[int, str]] | None = None) -> DecodeRequest:
    """The request `data` asks for: each field of DecodeRequest read from `data` by its rule,
    the others from `defaults` (the built-in ones when None). Keys that are not fields are
    left to the caller (the prompt, its own settings).

    null_is_default: a null value means "not given" (JSON clients send nulls); False where
    null is a value of its own (a topology's ``seed: null``) or wrong (``temperature: null``).
    caps: lower upper bounds that the serving ring sets, ``{"max_new_tokens": (2048,
    "model.max_context")}``; they hold for the defaults too. Raises FieldError naming the
    field ("tree.depth", "stop[0]")."""
    base = defaults if defaults is not None else DecodeRequest()
    values: dict[str, Any] = {}
    for f in dataclasses.fields(DecodeRequest):
        rule = f.metadata["allows"]
        v = data.get(f.name)
        if f.name not in data or (v is None and null_is_default):
            v = getattr(base, f.name)
        else:
            try:
                v = rule.read(v)
            except FieldError as e:
                raise e.within(f.name) from None
        cap = (caps or {}).get(f.name)
        if cap is not None and v is not None:
            try:
                rule.capped(*cap).read(v)
            except FieldError as e:
                raise e.within(f.name) from None
        values[f.name] = v
    return DecodeRequest(**values)
