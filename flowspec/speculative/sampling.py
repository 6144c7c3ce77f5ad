"""Target-side token choice: greedy, or sampling with temperature, top-k and top-p.

Randomness is keyed by (seed, position): the uniform number that decides the token at
sequence position k is the same whatever the strategy, the ring or the timing, so a
seeded run is reproducible and every strategy samples exactly the same text as plain
autoregressive sampling with the same seed.
"""

from __future__ import annotations

import hashlib
import struct

import torch

from .params import SEED_MAX, SEED_MIN, SamplingParams

__all__ = ["SEED_MAX", "SEED_MIN", "SamplingParams", "choose_token", "position_uniform", "sample_from",
           "target_probs"]  # SamplingParams and the seed bounds are declared in params.py (no torch)


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution sampling draws from: temperature, then top-k, then top-p (float64)."""
    x = logits.double() / params.temperature
    if params.top_k and params.top_k < x.numel():
        kth = torch.topk(x, params.top_k).values[-1]
        x = torch.where(x < kth, torch.full_like(x, float("-inf")), x)
    p = torch.softmax(x, dim=-1)
    if params.top_p < 1.0:
        sp, idx = torch.sort(p, descending=True)
        cum = torch.cumsum(sp, 0)
        cut = (cum - sp) >= params.top_p  # tokens entirely beyond the nucleus
        sp = torch.where(cut, torch.zeros_like(sp), sp)
        p = torch.zeros_like(p).scatter(0, idx, sp)
        p = p / p.sum()
    return p


def position_uniform(seed: int, position: int, draw: int = 0) -> float:
    """A uniform number in [0, 1) that depends only on (seed, position, draw)."""
    h = hashlib.blake2b(struct.pack("<qqq", seed, position, draw), digest_size=8).digest()
    return (int.from_bytes(h, "little") >> 11) / float(1 << 53)


def sample_from(p: torch.Tensor, u: float) -> int:
    """Inverse-CDF sample of a probability vector with the uniform number u."""
    cum = torch.cumsum(p, 0)
    idx = int(torch.searchsorted(cum, torch.tensor(u * float(cum[-1]), dtype=cum.dtype), right=True))
    idx = min(idx, p.numel() - 1)
    while p[idx] <= 0 and idx > 0:  # never land on a zero-probability token through rounding
        idx -= 1
    return idx


def choose_token(logits: torch.Tensor, params: SamplingParams, position: int) -> int:
    """The target's token at `position` given its logits there: argmax, or a seeded sample."""
    if params.greedy:
        return int(torch.argmax(logits))
    return sample_from(target_probs(logits, params), position_uniform(params.seed, position))
