"""Acceptance rules: which drafted child of an accepted node the target agrees with.

Two rules, both exactly lossless:

* ``accept_deterministic``: for drafts chosen deterministically (EAGLE-2 top-k trees,
  prompt lookup), draw the target's token x with the seeded per-position number and
  accept the child whose token is x; if none, x is the bonus token. With a point-mass
  draft distribution this *is* SpecInfer's multi-candidate rule (accept each candidate
  with probability p/q, else move to the residual), and it reaches the same acceptance,
  p(candidates), while keeping every strategy's sampled text identical.
* ``accept_multi_candidate``: SpecInfer/EAGLE recursive rejection sampling for
  candidates that were *sampled* from a draft distribution q, one candidate after the
  other, each rejection replacing p by norm(max(p - q, 0)).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .logprobs import token_logprob, wire
from .sampling import SamplingParams, choose_token, position_uniform, sample_from


def accept_deterministic(
    logits: torch.Tensor, children: dict[int, int], params: SamplingParams, position: int
) -> tuple[int, int | None]:
    """(token, accepted child id or None) for the target's choice at `position`."""
    x = choose_token(logits, params, position)
    return x, children.get(x)


def target_tokens(logits: torch.Tensor, positions: Sequence[int], params: SamplingParams) -> list[int]:
    """The target's token after each row: rows of `logits` [n, vocab] are the target's logits
    after the tokens at `positions`, so row i decides position positions[i] + 1 (argmax, or
    the seeded draw there: the choice ``accept_deterministic`` makes, wherever it runs)."""
    if params.greedy:
        return torch.argmax(logits, dim=-1).tolist()
    return [choose_token(row, params, p + 1) for row, p in zip(logits, positions)]


def choose_rows(head: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, positions: Sequence[int],
                rows: Sequence[int], params: SamplingParams, logprobs: int | None = None
                ) -> tuple[list[int], list[Any] | None]:
    """What a last stage that verifies returns beside the hidden states: the target's token
    after each of `rows` (one lm_head pass over them), -1 for every other row; and, when
    `logprobs` is given, each chosen token's logprob with that many alternatives (the wire
    form of :func:`~.logprobs.wire`, None for every other row)."""
    out = [-1] * len(positions)
    lps: list[Any] | None = None if logprobs is None else [None] * len(positions)
    if rows:
        logits = head(hidden[list(rows)])
        for j, (r, t) in enumerate(zip(rows, target_tokens(logits, [positions[r] for r in rows], params))):
            out[r] = t
            if lps is not None:
                lps[r] = wire(token_logprob(logits[j], t, logprobs or 0))
    return out, lps


def accept_multi_candidate(
    p: torch.Tensor,
    candidates: Sequence[int],
    q: Sequence[torch.Tensor],
    seed: int,
    position: int,
) -> tuple[int, int | None]:
    """Recursive rejection sampling over sibling candidates.

    p: target distribution at the parent. candidates[i]: token of the i-th child, drawn
    from q[i] (the draft distribution it was sampled from, with earlier candidates
    removed when sampling without replacement). Returns (token, index of the accepted
    candidate or None when the token comes from the final residual)."""
    p = p.double().clone()
    for i, (tok, qi) in enumerate(zip(candidates, q)):
        qi = qi.double()
        ratio = float(p[tok] / qi[tok]) if qi[tok] > 0 else 0.0
        if position_uniform(seed, position, draw=1 + i) < ratio:
            return tok, i
        p = torch.clamp(p - qi, min=0.0)
        s = float(p.sum())
        if s <= 0:  # only when q == p up to rounding, where the candidate is accepted surely
            return tok, i
        p = p / s
    return sample_from(p, position_uniform(seed, position, draw=0)), None
