"""An in-memory ring: the same messages as the TCP ring, delivered in process.

Every stage receives updates and segments in the order the source sends them (FIFO, as
on a TCP stream) and results come back in the same order, so a strategy behaves exactly
as it does over the network; only the timing differs. ``run_local_together`` decodes
several requests at once, drafting them together (speculative/drafting.py).
"""

from __future__ import annotations

import time
from collections import deque
from typing import Sequence

from ..model.pipeline import LocalPipeline
from .drafters.base import Drafter
from .drafting import DraftingStats, run_together
from .sampling import SamplingParams
from .strategies import Send, Speculator, TreeParams
from .verify import choose_rows


def run_local(spec: Speculator, pipe: LocalPipeline, verify: str = "source") -> dict:
    """Decode one request through the in-process stages; returns {token_ids, stats}.
    verify="last_stage": the tokens are chosen after the last stage, as a ring's last stage
    does with ``decoding.verify: last_stage``, and the strategy gets them with the rows."""
    pipe.reset()
    results: deque = deque()

    def deliver(sends: list[Send]) -> None:
        for s in sends:
            if s.commit or s.drop:
                pipe.apply_update(s.commit, s.drop)
            if s.segment is not None:
                seg = s.segment
                out = pipe.run_stages(seg)
                targets = lps = None
                if verify == "last_stage":
                    want = set(seg.node_ids[seg.score_from:]) if seg.score_from is not None else set()
                    rows = [i for i, n in enumerate(out.node_ids) if n in want]
                    targets, lps = choose_rows(pipe.head, out.hidden, out.positions, rows, spec.sampling,
                                               spec.logprobs)
                results.append((out.node_ids, out.hidden, targets, lps))

    t0 = time.perf_counter()
    deliver(spec.start())
    while not spec.done:
        if not results:
            raise RuntimeError(f"strategy {spec.strategy!r} stalled with nothing in flight")
        ids, hidden, targets, lps = results.popleft()
        deliver(spec.on_result(ids, hidden, targets, lps))
    stats = spec.result_stats()
    stats["total_s"] = round(time.perf_counter() - t0, 4)
    return {"token_ids": list(spec.output), "stats": stats}


def run_local_together(specs: Sequence[Speculator], pipes: Sequence[LocalPipeline],
                       stats: DraftingStats | None = None) -> list[list[int]]:
    """Decode several requests at once, each through its own in-process stages (e.g. forks
    of one pipeline), the way the source interleaves them: each round, every request that
    is not done verifies its next returned segment, then every expansion grows; what they
    draft is served together, one shared drafter pass per tree level (``stats`` counts
    them). Returns each request's tokens: its own, as alone."""
    if len(specs) != len(pipes):
        raise ValueError("one pipeline per request")
    queues: list[deque] = [deque() for _ in specs]

    def deliver(i: int, sends: list[Send]) -> None:
        for s in sends:
            if s.commit or s.drop:
                pipes[i].apply_update(s.commit, s.drop)
            if s.segment is not None:
                out = pipes[i].run_stages(s.segment)
                queues[i].append((out.node_ids, out.hidden))

    for i, spec in enumerate(specs):
        pipes[i].reset()
        deliver(i, spec.start())
    while True:
        live = [i for i, spec in enumerate(specs) if not spec.done]
        if not live:
            break
        for i in live:
            if not queues[i]:
                raise RuntimeError(f"strategy {specs[i].strategy!r} stalled with nothing in flight")
        answered = run_together([specs[i].respond_steps(*queues[i].popleft()) for i in live], stats)
        for i, sends in zip(live, answered):
            deliver(i, sends)
        thought = run_together([specs[i].think_steps() for i in live], stats)
        for i, sends in zip(live, thought):
            deliver(i, sends)
    return [list(spec.output) for spec in specs]


def generate_local(pipe: LocalPipeline, strategy: str, prompt: Sequence[int], max_new_tokens: int,
                   drafter: Drafter | None = None, eos_ids: Sequence[int] = (),
                   sampling: SamplingParams = SamplingParams(), tree: TreeParams = TreeParams(),
                   prefill_chunk: int = 256, verify: str = "source") -> dict:
    spec = Speculator(strategy, pipe.head, drafter, prompt, max_new_tokens, eos_ids, sampling, tree,
                      prefill_chunk)
    return run_local(spec, pipe, verify)
