"""Adversarial drafters for the strategy tests.

* ``ReferenceModel``: the target's own choice of next token for any context, computed by a
  separate single-stage ``LocalPipeline`` (cached per context);
* ``Oracle``: always right (the target's true choice first), optionally with wrong siblings;
* ``AlwaysWrong``: peeks at the reference continuation and never proposes the target's choice;
* ``RandomDrafter``: seeded random tokens and log-probabilities (duplicates included);
* ``ZeroLogprob``: every child scores 0, so the whole tree is one big tie;
* ``FixedDrafter``: the same proposals everywhere (tokens given by a function of the context);
* ``NotReadyDrafter``: a wrapper whose ``ready()`` says no for some or all nodes.

Every drafter proposes log-probabilities <= 0 (a child never scores above its parent), and
everything is deterministic: proposals depend only on the context and a seed.
"""

from __future__ import annotations

import hashlib
import random
import struct
from pathlib import Path
from typing import Callable, Sequence

import torch

from flowspec.model.pipeline import LocalPipeline
from flowspec.model.stage import Segment
from flowspec.speculative.drafters.base import Drafter, DraftView
from flowspec.speculative.drafters.lookup import LookupDrafter
from flowspec.speculative.sampling import SamplingParams, choose_token
from flowspec.speculative.tree import Node

Proposal = list[tuple[int, float]]


def context_rng(seed: int, context: Sequence[int]) -> random.Random:
    """A random generator keyed by (seed, context): the same context, the same numbers."""
    h = hashlib.blake2b(struct.pack("<q", seed) + struct.pack(f"<{len(context)}q", *context), digest_size=8)
    return random.Random(int.from_bytes(h.digest(), "little"))


class ReferenceModel:
    """The target's choice at the end of any context, from an independent single-stage pipeline.

    ``begin(prompt)`` commits prompt[:-1]; each query runs the rest of the context as a chain
    of uncommitted nodes and drops it again, so a query costs only its suffix. Results are
    cached per context."""

    def __init__(self, folder: str | Path, sampling: SamplingParams = SamplingParams(),
                 max_context: int = 2048) -> None:
        self.pipe = LocalPipeline.load(folder, 1, dtype="float32", max_context=max_context)
        self.vocab = self.pipe.cfg.vocab_size
        self.sampling = sampling
        self._prefix: list[int] = []
        self._next_id = 0
        self._logits: dict[tuple[int, ...], torch.Tensor] = {}
        self.queries = 0  # model calls (cache misses)

    def begin(self, prompt: Sequence[int]) -> None:
        prompt = list(prompt)
        if prompt[:-1] == self._prefix and self._next_id:
            return
        self.pipe.reset()
        self._prefix = prompt[:-1]
        ids = list(range(len(self._prefix)))
        if ids:
            self.pipe.run(Segment(ids, [i - 1 for i in ids], ids, tokens=torch.tensor(self._prefix)))
            self.pipe.apply_update(ids, [])
        self._next_id = len(ids) + 1_000_000

    def logits(self, context: Sequence[int]) -> torch.Tensor:
        key = tuple(context)
        got = self._logits.get(key)
        if got is not None:
            return got
        self.queries += 1
        n = len(self._prefix)
        if list(key[:n]) != self._prefix or len(key) <= n:
            self.begin(list(key))  # a context outside the committed prefix: start again from it
            n = len(self._prefix)
        suffix = list(key[n:])
        ids = list(range(self._next_id, self._next_id + len(suffix)))
        self._next_id += len(suffix)
        parents = [n - 1 if n else -1] + ids[:-1]
        out = self.pipe.run(Segment(ids, parents, list(range(n, n + len(suffix))), tokens=torch.tensor(suffix)))
        self.pipe.apply_update([], ids[:1])  # drops the whole chain
        got = out.logits[-1].clone()
        self._logits[key] = got
        return got

    def choice(self, context: Sequence[int]) -> int:
        """The token the target picks after `context` (at position len(context))."""
        return choose_token(self.logits(context), self.sampling, len(context))


class Oracle(Drafter):
    """Always right: the target's own choice first (log-prob -0.01), then `wrong` siblings
    that are never the target's choice, scored far lower."""

    name = "oracle"

    def __init__(self, ref: ReferenceModel, wrong: int = 0) -> None:
        self.ref = ref
        self.wrong = wrong
        self.proposed = 0

    def begin(self, prompt: list[int]) -> None:
        self.ref.begin(prompt)

    def propose(self, view: DraftView, frontier: list[Node], k: int) -> list[Proposal]:
        out = []
        for node in frontier:
            ctx = view.context(node)
            right = self.ref.choice(ctx)
            props = [(right, -0.01)]
            for i in range(min(self.wrong, k - 1)):
                props.append(((right + 1 + i) % self.ref.vocab, -3.0 - i))
            out.append(props[:k])
            self.proposed += len(out[-1])
        return out


class AlwaysWrong(Drafter):
    """Never the target's choice: it peeks at the reference sequence (prompt + the target's
    own continuation) and proposes k confident tokens that differ from the next one.

    Off the reference path (below a wrong node) nothing can be accepted anyway, so any token
    goes there. A context on the path but beyond the reference is a setup error."""

    name = "always-wrong"

    def __init__(self, reference: Sequence[int], vocab: int) -> None:
        self.reference = list(reference)
        self.vocab = vocab

    def propose(self, view: DraftView, frontier: list[Node], k: int) -> list[Proposal]:
        out = []
        for node in frontier:
            ctx = view.context(node)
            n = len(ctx)
            if ctx == self.reference[:n]:
                if n >= len(self.reference):
                    raise AssertionError(f"AlwaysWrong needs a reference longer than {n} tokens")
                avoid = self.reference[n]
            else:
                avoid = -1
            # near tokens first (plausible in repetitive output), all confident
            cands = [t for t in dict.fromkeys(reversed(ctx[-8:])) if t != avoid]
            cands += [(max(avoid, 0) + 1 + i) % self.vocab for i in range(k + 1)]
            cands = [t for t in dict.fromkeys(cands) if t != avoid][:k]
            out.append([(t, -0.001 * i) for i, t in enumerate(cands)])
        return out


class RandomDrafter(Drafter):
    """Seeded random children: 0..k of them, tokens from the vocabulary or from the context
    (duplicates possible), random log-probabilities in [-6, 0], best first."""

    name = "random"

    def __init__(self, vocab: int, seed: int = 0, from_context: float = 0.5) -> None:
        self.vocab, self.seed, self.from_context = vocab, seed, from_context

    def propose(self, view: DraftView, frontier: list[Node], k: int) -> list[Proposal]:
        out = []
        for node in frontier:
            ctx = view.context(node)
            rng = context_rng(self.seed, ctx)
            m = rng.randint(0, k)
            toks = [rng.choice(ctx) if rng.random() < self.from_context else rng.randrange(self.vocab)
                    for _ in range(m)]
            lps = sorted((-6.0 * rng.random() for _ in range(m)), reverse=True)
            if m and rng.random() < 0.2:
                lps[0] = 0.0
            out.append(list(zip(toks, lps)))
        return out


class ZeroLogprob(Drafter):
    """Ties everywhere: the inner drafter's tokens padded with tokens from the context, in a
    context-keyed shuffled order, every one with log-probability 0."""

    name = "zero-logprob"

    def __init__(self, inner: Drafter | None = None, seed: int = 0) -> None:
        self.inner = inner or LookupDrafter()
        self.seed = seed

    def begin(self, prompt: list[int]) -> None:
        self.inner.begin(prompt)

    def propose(self, view: DraftView, frontier: list[Node], k: int) -> list[Proposal]:
        props = self.inner.propose(view, frontier, k)
        out = []
        for node, plist in zip(frontier, props):
            ctx = view.context(node)
            toks = list(dict.fromkeys([t for t, _ in plist] + list(reversed(ctx[-2 * k :]))))[:k]
            context_rng(self.seed, ctx).shuffle(toks)
            out.append([(t, 0.0) for t in toks])
        return out


class FixedDrafter(Drafter):
    """Children given by a function of the context: tokens(context) -> [(token, logp)]."""

    name = "fixed"

    def __init__(self, tokens: Callable[[list[int]], Proposal]) -> None:
        self.tokens = tokens

    def propose(self, view: DraftView, frontier: list[Node], k: int) -> list[Proposal]:
        return [self.tokens(view.context(n))[:k] for n in frontier]


class NotReadyDrafter(Drafter):
    """Wraps a drafter; ``ready()`` is False for every node (or for nodes the predicate rejects),
    like a feature drafter that waits for hidden states."""

    name = "not-ready"

    def __init__(self, inner: Drafter, predicate: Callable[[DraftView, Node], bool] | None = None) -> None:
        self.inner = inner
        self.predicate = predicate or (lambda view, node: False)

    def begin(self, prompt: list[int]) -> None:
        self.inner.begin(prompt)

    def ready(self, view: DraftView, node: Node) -> bool:
        return self.predicate(view, node)

    def propose(self, view: DraftView, frontier: list[Node], k: int) -> list[Proposal]:
        return self.inner.propose(view, frontier, k)
