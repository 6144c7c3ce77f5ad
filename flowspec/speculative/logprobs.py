"""The target's log-probabilities of the tokens a request accepts (OpenAI ``logprobs``).

They come from the logits the source verifies with (the target's lm_head over the final
hidden state of the token before), never from the drafter: the value is what the target
model alone would report at that position. It is the log-softmax of the model's **raw**
logits (temperature 1, no top-k / top-p), whatever the request samples with -- the model's
own distribution, as vLLM reports by default; at temperature 0 the chosen token is its
argmax. Recording them is opt-in per request, so a request that does not ask costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .params import MAX_TOP_LOGPROBS  # noqa: F401 -- re-exported; declared with the request's other bounds


@dataclass(frozen=True)
class TokenLogprob:
    """One accepted token and the target's view of its position."""

    token: int  # the token id chosen at this position
    logprob: float  # the target's log-probability of it (log-softmax of the raw logits)
    top: tuple[tuple[int, float], ...] = ()  # the n most likely (token id, log-probability), most likely first

    def as_dict(self) -> dict[str, Any]:
        return {"token": self.token, "logprob": self.logprob, "top": [list(t) for t in self.top]}


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The log-probability of `token` under `logits` (one row, the vocabulary) and the `top`
    most likely tokens (0: none), in float32 whatever the logits' dtype."""
    lp = torch.log_softmax(logits.float().reshape(-1), dim=-1)
    best: tuple[tuple[int, float], ...] = ()
    if top > 0:
        vals, ids = torch.topk(lp, min(top, lp.numel()))
        best = tuple(zip(ids.tolist(), vals.tolist()))
    return TokenLogprob(int(token), float(lp[token]), best)


def wire(lp: TokenLogprob) -> list[Any]:
    """A token's logprob as the last stage returns it with the token: [logprob, [[id, logprob], ...]]."""
    return [lp.logprob, [list(t) for t in lp.top]]


def from_wire(token: int, v: list[Any]) -> TokenLogprob:
    """The inverse of :func:`wire` (checked by the protocol)."""
    return TokenLogprob(int(token), float(v[0]), tuple((int(i), float(x)) for i, x in v[1]))
