"""Prompt lookup: propose what followed the latest earlier occurrence of the current n-gram."""

from __future__ import annotations

import math
from collections import Counter

from ..tree import Node
from .base import Drafter, DraftView


class LookupDrafter(Drafter):
    """n-gram match over prompt and output; no weights at all."""

    name = "lookup"

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, window: int = 4096) -> None:
        self.max_ngram = max_ngram  # longest suffix to match
        self.min_ngram = min_ngram  # shortest suffix to match
        self.window = window  # only the last `window` tokens are searched

    def propose(self, view: DraftView, frontier: list[Node], k: int) -> list[list[tuple[int, float]]]:
        return [self._next_tokens(view.context(n)[-self.window :], k) for n in frontier]

    def _next_tokens(self, ctx: list[int], k: int) -> list[tuple[int, float]]:
        for n in range(min(self.max_ngram, len(ctx) - 1), self.min_ngram - 1, -1):
            suffix = ctx[-n:]
            follow: Counter[int] = Counter()
            order: list[int] = []
            for i in range(len(ctx) - n - 1, -1, -1):  # most recent match first
                if ctx[i : i + n] == suffix:
                    t = ctx[i + n]
                    if t not in follow:
                        order.append(t)
                    follow[t] += 1
            if follow:
                total = sum(follow.values())
                # confidence grows with the n-gram length; frequency ranks alternatives
                base = math.log(n / (n + 1))
                ranked = sorted(order, key=lambda t: -follow[t])[:k]
                return [(t, base + math.log(follow[t] / total)) for t in ranked]
        return []
