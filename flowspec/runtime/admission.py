"""Who may decode on the ring now: at most `max_active` requests, the rest wait in order.

Requests enter in arrival order (first come, first served: a later request never
overtakes one that waits). A profiler probe needs the ring to itself: it waits until
every active request has left, and requests that arrive meanwhile wait behind it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import AsyncIterator


class Admission:
    """A FIFO gate with `max_active` places and an exclusive mode."""

    def __init__(self, max_active: int) -> None:
        if max_active < 1:
            raise ValueError("max_active must be >= 1")
        self.max_active = max_active
        self.active = 0  # requests inside
        self._exclusive = False  # a probe holds the ring
        self._queue: deque[tuple[asyncio.Future[None], bool]] = deque()  # (waiter, wants exclusive)

    @property
    def waiting(self) -> int:
        """Requests (and probes) waiting for a place."""
        return len(self._queue)

    def _fits(self, exclusive: bool) -> bool:
        if self._exclusive:
            return False
        return self.active == 0 if exclusive else self.active < self.max_active

    def _wake(self) -> None:
        while self._queue:
            fut, exclusive = self._queue[0]
            if not self._fits(exclusive):
                return
            self._queue.popleft()
            self._take(exclusive)
            fut.set_result(None)

    def _take(self, exclusive: bool) -> None:
        if exclusive:
            self._exclusive = True
        else:
            self.active += 1

    async def _enter(self, exclusive: bool) -> None:
        if not self._queue and self._fits(exclusive):
            self._take(exclusive)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((fut, exclusive))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # admitted just as it was cancelled: give the place back
                self._leave(exclusive)
            else:
                self._queue.remove((fut, exclusive))
                self._wake()  # a probe that gave up may have held back requests behind it
            raise

    def _leave(self, exclusive: bool) -> None:
        if exclusive:
            self._exclusive = False
        else:
            self.active -= 1
        self._wake()

    @asynccontextmanager
    async def _held(self, exclusive: bool) -> AsyncIterator[None]:
        await self._enter(exclusive)
        try:
            yield
        finally:
            self._leave(exclusive)

    def slot(self) -> "AbstractAsyncContextManager[None]":
        """One request's place on the ring, for as long as the block runs."""
        return self._held(False)

    def ring_to_itself(self) -> "AbstractAsyncContextManager[None]":
        """The whole ring (no request decodes meanwhile), e.g. for a profiler probe."""
        return self._held(True)
