"""One lm_head pass for every returned segment waiting at the source, of any request.

The target's lm_head is the largest matrix the source reads (49,152 x 576 for the default
model, 57 MB in bfloat16): one pass costs about as much as an eight-layer stage, and at a
few rows it costs the same whatever the number of rows, because its weights come from
memory. Scoring each returned segment alone pays that price once per segment and per
request. This module collects the results that wait for the compute thread -- several of
one request that came back while it was drafting, and those of other requests -- and
scores all their rows in one pass before each request verifies its own, in order.

The text does not change: a row's logits do not depend on which other rows share the
pass (float32 is exact; bfloat16 rounds as it does for any batch of rows).

What the requests draft while they verify (a new root's first level, or the whole plan of
strategies that draft as segments return) is shared too: a verification that is stepped
(its ``then`` returns a generator, e.g. driving ``Speculator.respond_steps``) is advanced
together with the others, one drafter pass per tree level (speculative/drafting.py).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Sequence, TypeVar

import torch

from ..speculative.drafting import DraftingStats, Expansion, step
from ..speculative.strategies import Speculator

T = TypeVar("T")
# (node ids, final hidden states, tokens the last stage chose or None[, their logprobs]) of one
# returned segment
Result = tuple[Any, ...]


@dataclass
class _Job(Generic[T]):
    spec: Speculator  # the request's strategy (its tree says which rows need logits)
    results: list[Result]  # its returned segments, in the order they came back
    then: Callable[[dict[int, torch.Tensor]], Any]  # verifies them, given logits by node id (or its Steps)
    done: asyncio.Future[T]  # resolved with what `then` returned


@dataclass
class ScoringStats:
    """How much sharing the lm_head passes found."""

    passes: int = 0  # lm_head passes run
    results: int = 0  # returned segments scored in them
    rows: int = 0  # rows scored


class SharedHead:
    """Scores returned segments in shared lm_head passes on the source's compute thread.

    ``respond()`` queues one request's returned segments and resolves when that request
    has verified them. While a pass runs, newly queued segments wait and go together into
    the next one, which is queued on the compute thread as soon as the running pass ends
    (ahead of any drafting submitted meanwhile: verification comes first)."""

    def __init__(self, head: Callable[[torch.Tensor], torch.Tensor],
                 pool: concurrent.futures.ThreadPoolExecutor, drafting: DraftingStats | None = None) -> None:
        self.head, self.pool = head, pool
        self.stats = ScoringStats()
        self.drafting = drafting if drafting is not None else DraftingStats()  # what the verifications drafted
        self._waiting: list[_Job[Any]] = []
        self._busy = False

    async def respond(self, spec: Speculator, results: list[Result],
                      then: Callable[[dict[int, torch.Tensor]], Any]) -> T:
        """Score the rows of `results` (with whatever else waits), then run `then(logits by
        node id)` on the compute thread and return what it returns (or raise what it raised);
        when it returns a generator (stepped drafting), what that generator returns, its
        drafter calls served together with the other verifications'."""
        loop = asyncio.get_running_loop()
        job: _Job[T] = _Job(spec, results, then, loop.create_future())
        self._waiting.append(job)
        if not self._busy:
            self._start(loop)
        return await job.done

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs, self._waiting = self._waiting, []
        self._busy = True
        fut = loop.run_in_executor(self.pool, self._run, jobs)
        fut.add_done_callback(lambda f: self._finished(loop, jobs, f))

    def _finished(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job[Any]], f: asyncio.Future[Any]) -> None:
        self._busy = False
        if f.cancelled() or f.exception() is not None:  # the pool went away (shutdown) or the pass failed
            err = f.exception() if not f.cancelled() else None
            for job in jobs:
                if not job.done.done():
                    job.done.set_exception(err or RuntimeError("the source's compute thread stopped"))
        else:
            for job, (ok, value) in zip(jobs, f.result()):
                if job.done.done():  # its request was cancelled meanwhile
                    continue
                if ok:
                    job.done.set_result(value)
                else:
                    job.done.set_exception(value)
        if self._waiting:
            try:
                self._start(loop)
            except RuntimeError as e:  # the pool is shut down
                for job in self._waiting:
                    if not job.done.done():
                        job.done.set_exception(e)
                self._waiting = []

    def _run(self, jobs: list[_Job[Any]]) -> list[tuple[bool, Any]]:
        """On the compute thread: one lm_head pass over every row still needing logits, then
        each job's own verification (a failure stays with its job)."""
        owners: list[tuple[int, list[int]]] = []  # (job index, node ids) per scored part
        parts: list[torch.Tensor] = []
        for j, job in enumerate(jobs):
            for ids, hidden, targets, *_ in job.results:
                rows = job.spec.rows_to_score(ids, targets)
                if rows:
                    parts.append(hidden[rows])
                    owners.append((j, [ids[r] for r in rows]))
        scored: list[dict[int, torch.Tensor]] = [{} for _ in jobs]
        if parts:
            t0 = time.perf_counter()
            logits = self.head(torch.cat([p.to(parts[0].dtype) for p in parts]))
            pass_s = time.perf_counter() - t0
            a = 0
            for j, ids in owners:
                scored[j].update(zip(ids, logits[a : a + len(ids)]))
                a += len(ids)
            for j, ids in owners:  # each request's verify time carries its share of the pass, by rows
                jobs[j].spec.stats.verify_s += pass_s * len(ids) / a
            self.stats.passes += 1
            self.stats.results += len(parts)
            self.stats.rows += a
        out: list[tuple[bool, Any]] = []
        stepped: list[tuple[int, Expansion[Any]]] = []  # (index in out, a stepped verification)
        for job, sc in zip(jobs, scored):
            try:
                value = job.then(sc)
            except Exception as e:  # noqa: BLE001 -- handed to the job's own request
                out.append((False, e))
                continue
            if inspect.isgenerator(value):
                stepped.append((len(out), Expansion(value)))
            out.append((True, value))
        exps = [e for _, e in stepped]
        while not all(e.done for e in exps):
            self.drafting.add(step(exps))
        for i, e in stepped:
            out[i] = (False, e.error) if e.error is not None else (True, e.result)
        return out
