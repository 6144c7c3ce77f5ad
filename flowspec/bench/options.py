"""What one bench run does."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchOptions:
    """What one bench run does."""

    strategies: tuple[str, ...]  # strategies to compare, in the order given
    prompts: tuple[str, ...]  # user messages (the chat template is applied by the source)
    max_new_tokens: int  # per request
    temperature: float  # 0 = greedy
    seed: int  # sampling seed, the same for every strategy
    warmup: int  # unrecorded requests per strategy before the measured ones
    request_timeout: float  # seconds one request may take
    keep_traces: bool = False  # keep every request's trace in the JSON (else only prompt 0's)
