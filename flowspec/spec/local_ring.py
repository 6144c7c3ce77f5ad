"""An in-memory ring: the same messages as the TCP ring, delivered in process.

Every stage receives updates and segments in the order the source sends them (FIFO, as
on a TCP stream) and results come back in the same order, so a strategy behaves exactly
as it does over the network; only the timing differs.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Sequence

from ..model.pipeline import LocalPipeline
from .drafters.base import Drafter
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
                targets = None
                if verify == "last_stage":
                    want = set(seg.node_ids[seg.score_from:]) if seg.score_from is not None else set()
                    rows = [i for i, n in enumerate(out.node_ids) if n in want]
                    targets = choose_rows(pipe.head, out.hidden, out.positions, rows, spec.sampling)
                results.append((out.node_ids, out.hidden, targets))

    t0 = time.perf_counter()
    deliver(spec.start())
    while not spec.done:
        if not results:
            raise RuntimeError(f"strategy {spec.strategy!r} stalled with nothing in flight")
        ids, hidden, targets = results.popleft()
        deliver(spec.on_result(ids, hidden, targets))
    stats = spec.result_stats()
    stats["total_s"] = round(time.perf_counter() - t0, 4)
    return {"token_ids": list(spec.output), "stats": stats}


def generate_local(pipe: LocalPipeline, strategy: str, prompt: Sequence[int], max_new_tokens: int,
                   drafter: Drafter | None = None, eos_ids: Sequence[int] = (),
                   sampling: SamplingParams = SamplingParams(), tree: TreeParams = TreeParams(),
                   prefill_chunk: int = 256, verify: str = "source") -> dict:
    spec = Speculator(strategy, pipe.head, drafter, prompt, max_new_tokens, eos_ids, sampling, tree,
                      prefill_chunk)
    return run_local(spec, pipe, verify)
