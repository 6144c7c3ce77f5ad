"""The source measures its ring once it has formed and chooses the draft tree's "auto" settings.

With ``segment``, ``in_flight`` or ``expand`` set to ``auto`` (the default), the source runs
two ring probes with the ring to itself (``probes.py``): every stage times its pass of 1 to
32 rows after a committed context, every node times an echo over the link to its
successor; and it times its own lm_head by rows (when it verifies). ``speculative/tuning.py``
turns those costs into settings. Requests that arrive meanwhile wait (a second or a few on
slow devices); a request prepared before the first tuning uses the built-in defaults.

The ring is measured again only when who holds which layers has changed (a spare took a
place): a ring that re-forms after a restart keeps its settings, so resuming stays fast.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import statistics
import time
from typing import Any

import torch

from ..config import Topology
from ..errors import FlowSpecError
from ..model.stage import LMHead
from ..speculative.params import TreeParams
from ..speculative.tuning import RingCosts, Tuning, fallback, tune
from .admission import Admission
from .probes import BENCH, LINKS, ProbeDesk
from .transport import FrameStream

log = logging.getLogger(__name__)

SIZES = [1, 4, 8, 16, 32]  # rows per timed pass (a line is fitted through them)
REPS = 3  # timed passes per size (the median counts)
CONTEXT = 256  # committed tokens before the timed passes


class RingTuner:
    """The source's current tree defaults for its ring, and the measurement behind them."""

    def __init__(self, topo: Topology, name: str, probes: ProbeDesk, head: LMHead,
                 pool: concurrent.futures.ThreadPoolExecutor, admission: Admission) -> None:
        self.topo, self.name, self.probes, self.head, self.pool = topo, name, probes, head, pool
        self.admission = admission
        self.auto = topo.decoding.tree.auto  # the settings to choose
        # until the ring is measured: segments of at most two levels, one in flight per stage
        self.tree: TreeParams = topo.decoding.tree.params(
            fallback(topo.decoding.tree.params(), self.auto, len(topo.stages)))
        self.tuning: Tuning | None = None  # the last measurement's outcome
        self.idle = asyncio.Event()  # no tuning in progress (requests prepared meanwhile wait for it)
        self.idle.set()
        self._ring_key: tuple[Any, ...] | None = None  # the ring that was measured

    async def formed(self, ring: list[dict[str, Any]], down: FrameStream | None, succ: str) -> None:
        """The ring has formed (again): measure it, unless it is the ring measured before."""
        key = tuple((r.get("name"), tuple(r.get("layers") or ())) for r in ring)
        if not self.auto or key == self._ring_key:
            return
        self.idle.clear()
        try:
            t0 = time.perf_counter()
            async with self.admission.ring_to_itself():
                costs = await self._measure(ring, down, succ)
            self.tuning = tune(costs, self.topo.decoding.tree.params(self.tree), self.auto)
            self.tree = self.tuning.tree
            self._ring_key = key
            log.info("%s: draft tree chosen for this ring in %.1f s: %s", self.name, time.perf_counter() - t0,
                     self.tuning.describe())
        except (FlowSpecError, ValueError, KeyError, TypeError, ConnectionError, OSError) as e:
            log.warning("%s: could not measure the ring to choose the draft tree (%s); using segment %d, "
                        "in_flight %d, expand %d", self.name, e, self.tree.segment, self.tree.in_flight,
                        self.tree.expand)
        finally:
            self.idle.set()

    async def _measure(self, ring: list[dict[str, Any]], down: FrameStream | None, succ: str) -> RingCosts:
        bench = await self.probes.run({"op": BENCH, "sizes": SIZES, "reps": REPS, "context": CONTEXT}, down, succ)
        links = await self.probes.run({"op": LINKS, "sizes": [0], "reps": REPS}, down, succ)
        stages = []
        for rec in bench["results"]:
            if "error" in rec:
                raise FlowSpecError(rec["error"])
            stages.append(tuple((int(n), float(med)) for n, _, med in rec["sizes"]))
        rtts = []
        for rec in links["results"]:
            if "error" in rec:
                raise FlowSpecError(rec["error"])
            rtts.append(float(rec["rtt_ms"]))
        if len(stages) != len(ring) or len(rtts) != len(ring) + 1:
            raise FlowSpecError(f"the probes came back with {len(stages)} stages and {len(rtts)} links "
                                f"for a ring of {len(ring)} stages")
        source: tuple[tuple[int, float], ...] = ()
        if self.topo.decoding.verify != "last_stage":  # auto: a request alone verifies at the source
            loop = asyncio.get_running_loop()
            source = await loop.run_in_executor(self.pool, time_head, self.head, SIZES, REPS)
        return RingCosts(tuple(stages), sum(rtts) / 2, source)

    def status(self) -> dict[str, Any]:
        """For /health and the bench: the tree requests get, and how it was chosen."""
        out: dict[str, Any] = {"segment": self.tree.segment, "in_flight": self.tree.in_flight,
                               "expand": self.tree.expand, "auto": list(self.auto)}
        if self.tuning is not None:
            out.update(trip_ms=self.tuning.trip_ms, bottleneck_ms=self.tuning.bottleneck_ms)
        return out


def time_head(head: LMHead, sizes: list[int], reps: int) -> tuple[tuple[int, float], ...]:
    """Median milliseconds of the lm_head over n rows, for each size (in the compute thread)."""
    hidden = head.weight.shape[1]
    out = []
    head(torch.randn(1, hidden))  # warm-up
    for n in sizes:
        x = torch.randn(n, hidden)
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            head(x)
            times.append(1000 * (time.perf_counter() - t0))
        out.append((n, statistics.median(times)))
    return tuple(out)
