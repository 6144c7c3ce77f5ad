"""Drafting at the source, shared by every request whose tree is due to grow.

After a request has answered a returned segment ("send first"), it grows its tree
("think later"). With k requests active, k expansions drafting one after another would
each run their own drafter passes; an EAGLE head's pass over a few rows costs about the
same whatever its rows (its weights come from memory). ``SharedDrafter`` gathers the
requests whose ``think`` is due and advances their stepped expansions together on the
compute thread, one tree level at a time, every level's calls served by one shared
drafter pass (speculative/drafting.py); a request that joins while others draft joins them at
their next level.

Verification comes first: when a returned segment waits for the compute thread
(``make_way``), the running drafting gives way after its current level, so the segment is
scored and answered before more drafting; the expansions go on afterwards. An expansion
that ends hands its sends to its request at once, while the others go on drafting. A
request alone drafts as it did before: its whole expansion in one compute-thread task.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Generic, TypeVar

from ..speculative.drafters.base import Steps
from ..speculative.drafting import DraftingStats, Expansion, step

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class _Job(Generic[T]):
    start: Callable[[], Steps[T]]  # makes the request's expansion (called on the compute thread)
    done: asyncio.Future[T]  # resolved with what the expansion returned
    expansion: Expansion[T] | None = None  # made by `start`, on the compute thread


class SharedDrafter:
    """Grows the trees of every request that waits to draft, together, on the compute thread."""

    def __init__(self, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.pool = pool
        self.stats = DraftingStats()  # written on the compute thread, read by /metrics
        self._waiting: list[_Job[Any]] = []  # due to start at the next task (event loop only)
        self._active: list[_Job[Any]] = []  # started, not ended (the compute task's while it runs)
        self._busy = False  # a compute task is queued or running
        self._soon = False  # a start is scheduled on the event loop
        self._give_way = threading.Event()  # set: the running task returns after its current level

    def think(self, start: Callable[[], Steps[T]]) -> asyncio.Future[T]:
        """Grow one request's tree: ``start()`` (run on the compute thread) returns its stepped
        expansion (e.g. ``Speculator.think_steps()``); the future resolves with what the
        expansion returns, or with the exception it raised. Requests that call this in the
        same turn of the event loop start together."""
        loop = asyncio.get_running_loop()
        job: _Job[T] = _Job(start, loop.create_future())
        self._waiting.append(job)
        if self._busy:
            self._give_way.set()  # join the running expansions at their next level
        elif not self._soon:
            self._soon = True
            loop.call_soon(self._start, loop)
        return job.done

    def make_way(self) -> None:
        """A returned segment is about to be verified on the compute thread: the drafting that
        runs there now stops after its current level and goes on behind it."""
        if self._busy:
            self._give_way.set()

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._soon = False
        if self._busy:
            return
        fresh = [j for j in self._waiting if not j.done.done()]  # a cancelled request's never starts
        self._waiting = []
        jobs = self._active + fresh
        if not jobs:
            return
        self._active = []
        self._busy = True
        self._give_way.clear()
        try:
            fut = loop.run_in_executor(self.pool, self._run, loop, jobs)
        except RuntimeError as e:  # the pool is shut down
            self._busy = False
            for job in jobs:
                if not job.done.done():
                    job.done.set_exception(e)
            return
        fut.add_done_callback(lambda f: self._finished(loop, jobs, f))

    def _run(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job[Any]]) -> list[_Job[Any]]:
        """On the compute thread: step the expansions together until they have all ended or
        something waits for the thread; an expansion that ends is handed back at once.
        Returns the ones still going."""
        for job in jobs:
            if job.expansion is None:
                try:
                    job.expansion = Expansion(job.start())
                except Exception as e:  # noqa: BLE001 -- it stays with its own request
                    _post(loop, _fail, job, e)
        jobs = [j for j in jobs if j.expansion is not None]
        while jobs:
            self.stats.add(step([j.expansion for j in jobs if j.expansion is not None]))
            going = []
            for job in jobs:
                exp = job.expansion
                if exp is not None and exp.done:
                    _post(loop, _resolve, job, exp)
                else:
                    going.append(job)
            jobs = going
            if self._give_way.is_set():
                break
        return jobs

    def _finished(self, loop: asyncio.AbstractEventLoop, jobs: list[_Job[Any]], f: asyncio.Future[Any]) -> None:
        self._busy = False
        if f.cancelled() or f.exception() is not None:  # the pool went away (shutdown), or a bug
            err = f.exception() if not f.cancelled() else None
            if err is not None:
                log.error("drafting failed: %s", err)
            for job in jobs:
                if not job.done.done():
                    job.done.set_exception(err or RuntimeError("the source's compute thread stopped"))
        else:
            self._active = f.result()
        if self._active or self._waiting:
            self._start(loop)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    """Run fn(*args) on the event loop (from the compute thread); nothing once the loop is closed."""
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: no one waits any more
        pass


def _resolve(job: _Job[Any], exp: Expansion[Any]) -> None:
    if job.done.done():  # its request was cancelled meanwhile
        return
    if exp.error is not None:
        job.done.set_exception(exp.error)
    else:
        job.done.set_result(exp.result)


def _fail(job: _Job[Any], e: Exception) -> None:
    if not job.done.done():
        job.done.set_exception(e)
