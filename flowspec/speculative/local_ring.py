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


def deliver(pipe: LocalPipeline, sends: Sequence[Send], results: deque,
            choose: Speculator | None = None) -> None:
    """What the ring does with a request's sends, in order: each tree update applied on every
    stage, each segment run through them, its result appended to `results` as (node ids,
    hidden states, target tokens, their logprobs). `choose`: the request whose tokens are
    chosen after the last stage (``decoding.verify: last_stage``); None: no tokens chosen."""
    for s in sends:
        if s.commit or s.drop:
            pipe.apply_update(s.commit, s.drop)
        if s.segment is not None:
            seg = s.segment
            out = pipe.run_stages(seg)
            targets = lps = None
            if choose is not None:
                want = set(seg.node_ids[seg.score_from:]) if seg.score_from is not None else set()
                rows = [i for i, n in enumerate(out.node_ids) if n in want]
                targets, lps = choose_rows(pipe.head, out.hidden, out.positions, rows, choose.sampling,
                                           choose.logprobs)
            results.append((out.node_ids, out.hidden, targets, lps))


def run_local(spec: Speculator, pipe: LocalPipeline, verify: str = "source") -> dict:
    """Decode one request through the in-process stages; returns {token_ids, stats}.
    verify="last_stage": the tokens are chosen after the last stage, as a ring's last stage
    does with ``decoding.verify: last_stage``, and the strategy gets them with the rows."""
    pipe.reset()
    results: deque = deque()
    choose = spec if verify == "last_stage" else None
    t0 = time.perf_counter()
    deliver(pipe, spec.start(), results, choose)
    while not spec.done:
        if not results:
            raise RuntimeError(f"strategy {spec.strategy!r} stalled with nothing in flight")
        ids, hidden, targets, lps = results.popleft()
        deliver(pipe, spec.on_result(ids, hidden, targets, lps), results, choose)
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
    for i, spec in enumerate(specs):
        pipes[i].reset()
        deliver(pipes[i], spec.start(), queues[i])
    while True:
        live = [i for i, spec in enumerate(specs) if not spec.done]
        if not live:
            break
        for i in live:
            if not queues[i]:
                raise RuntimeError(f"strategy {specs[i].strategy!r} stalled with nothing in flight")
        answered = run_together([specs[i].respond_steps(*queues[i].popleft()[:2]) for i in live], stats)
        for i, sends in zip(live, answered):
            deliver(pipes[i], sends, queues[i])
        thought = run_together([specs[i].think_steps() for i in live], stats)
        for i, sends in zip(live, thought):
            deliver(pipes[i], sends, queues[i])
    return [list(spec.output) for spec in specs]


def generate_local(pipe: LocalPipeline, strategy: str, prompt: Sequence[int], max_new_tokens: int,
                   drafter: Drafter | None = None, eos_ids: Sequence[int] = (),
                   sampling: SamplingParams = SamplingParams(), tree: TreeParams = TreeParams(),
                   prefill_chunk: int = 256, verify: str = "source") -> dict:
    spec = Speculator(strategy, pipe.head, drafter, prompt, max_new_tokens, eos_ids, sampling, tree,
                      prefill_chunk)
    return run_local(spec, pipe, verify)
