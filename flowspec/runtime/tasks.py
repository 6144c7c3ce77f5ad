"""Long-lived background tasks that cannot die silently, a loop-aware silence clock, and
log lines that cannot flood the log.

* :func:`supervise` runs a node's background loop (connecting, heartbeats, ring
  formation) forever: an exception it did not expect is logged with its traceback and the
  loop starts again after a backoff, so a node never keeps running with a dead loop.
* :class:`Silence` measures how long a peer has been silent **while this node could have
  heard it**: a watchdog tick that comes late (the event loop was busy) counts at most
  ``max_tick`` seconds, so a node that was busy itself never blames a healthy peer.
* :class:`LogLimiter` lets a few lines of a kind through per window and counts the rest,
  for warnings that a stranger can trigger (refused connections).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

RESTART_MIN_S = 0.5  # first pause before a failed loop starts again
RESTART_MAX_S = 10.0  # the longest pause between restarts
HEALTHY_RUN_S = 30.0  # a loop that ran this long before failing starts again after the shortest pause


async def supervise(name: str, loop_fn: Callable[[], Awaitable[Any]], log: logging.Logger,
                    is_closing: Callable[[], bool] = lambda: False) -> None:
    """Run `loop_fn()` until cancelled; restart it (with backoff) whenever it fails or returns."""
    delay = RESTART_MIN_S
    while not is_closing():
        t0 = time.monotonic()
        try:
            await loop_fn()
            if is_closing():
                return
            log.error("%s ended unexpectedly; starting it again in %.1f s", name, delay)
        except asyncio.CancelledError:
            raise
        except Exception:
            if is_closing():
                return
            log.exception("%s failed; starting it again in %.1f s", name, delay)
        if time.monotonic() - t0 > HEALTHY_RUN_S:
            delay = RESTART_MIN_S
        await asyncio.sleep(delay)
        delay = min(delay * 2, RESTART_MAX_S)


def start_supervised(name: str, loop_fn: Callable[[], Awaitable[Any]], log: logging.Logger,
                     is_closing: Callable[[], bool] = lambda: False) -> "asyncio.Task[None]":
    """`supervise` as a task named `name`."""
    return asyncio.create_task(supervise(name, loop_fn, log, is_closing), name=name)


@dataclass
class Silence:
    """Seconds a peer has been silent, counted only while this node's loop was responsive."""

    max_tick: float  # the most one watchdog tick may add: a longer gap is this node's own stall
    silent_s: float = 0.0  # silence so far
    _seen: float = -1.0  # the peer's last_seen at the previous tick

    def tick(self, last_seen: float, elapsed: float) -> float:
        """Record a watchdog tick `elapsed` seconds after the previous one; return the silence."""
        if last_seen != self._seen:
            self._seen, self.silent_s = last_seen, 0.0
        else:
            self.silent_s += min(elapsed, self.max_tick)
        return self.silent_s


@dataclass
class LogLimiter:
    """At most `burst` lines per `window_s` seconds; the rest are counted and summarised."""

    log: logging.Logger  # where the lines go
    burst: int = 5  # lines let through per window
    window_s: float = 60.0  # window length
    clock: Callable[[], float] = time.monotonic  # seconds (a parameter for tests)
    _start: float = field(default=-1e18)
    _sent: int = 0
    _suppressed: int = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = self.clock()
        if now - self._start >= self.window_s:
            if self._suppressed:
                self.log.warning("(%d more lines like this were suppressed in the last %.0f s)",
                                 self._suppressed, now - self._start)
            self._start, self._sent, self._suppressed = now, 0, 0
        if self._sent < self.burst:
            self._sent += 1
            self.log.warning(msg, *args)
            if self._sent == self.burst:
                self.log.warning("(further lines like this are counted, not logged, for %.0f s)", self.window_s)
        else:
            self._suppressed += 1
