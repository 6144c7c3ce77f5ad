"""Profiler probes: round trip and bandwidth of every link, compute time of every stage.

A profiling client (``tools/profile_hops.py``) sends a PROBE frame to the source with
``{"op": "links" | "bench", ...}``. The source takes the ring for itself (no request runs
meanwhile), measures what it can itself, sends one *ring probe* around the ring, and
answers the client with the results once the probe came home.

Ring probes are PROBE frames ``{"kind": "links" | "bench", "id", "sizes", "reps",
"results": [...]}``. Every stage handles them in order with its segments, appends its
record to ``results`` and forwards the frame:

* ``links``: the node times *echoes* over the link to its successor. An echo is a PROBE
  ``{"kind": "echo", "id"}`` with a payload of n bytes; the successor answers at once,
  on the same connection, with ``{"kind": "echo_reply", "id", "bytes"}`` and no payload.
  The round trip needs only the sender's clock. The usable bandwidth is the slope of
  the round trip over the payload size (least squares over the sizes).
* ``bench``: the stage times segments of n tokens (a chain after a committed context of
  ``context`` tokens), then resets its KV cache; every request starts with RESET anyway.
* ``caches``: the stage lists the request ids that hold one of its KV caches (a request
  holds one from its RESET to its FREE), and how many it has.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from ..errors import FlowSpecError
from .protocol import Frame, FrameType
from .transport import FrameStream

log = logging.getLogger(__name__)

ECHO = "echo"  # ask the successor for an immediate reply on the same link
ECHO_REPLY = "echo_reply"  # the successor's answer to an echo
BROKEN = "broken"  # (source, in process) the ring broke: an echo waited for will not come
LINKS = "links"  # ring probe: every node measures the link to its successor
BENCH = "bench"  # ring probe: every stage times segments of several sizes
CACHES = "caches"  # ring probe: every stage lists the requests that hold a KV cache there
OPS = (LINKS, BENCH, CACHES)
DEFAULT_ECHO_SIZES = (0, 16 << 10, 64 << 10, 256 << 10, 1 << 20)  # payload bytes per echo
DEFAULT_BENCH_SIZES = (1, 2, 4, 8, 16, 32, 64)  # tokens per timed segment
MAX_REPS = 50  # repetitions per size, at most
MAX_BENCH_TOKENS = 512  # largest timed segment
MAX_CONTEXT = 4096  # largest committed context before the timed segments

Bench = Callable[[list[int], int, int], Awaitable[list[list[float]]]]


class ProbeError(FlowSpecError):
    """A probe request is invalid or a probe did not come back."""


@dataclass
class ProbeDesk:
    """One node's side of the probes: echo replies it waits for, ring probes coming home."""

    name: str  # the node's name
    timeout_s: float = 30.0  # how long an echo or a ring probe may take
    replies: "asyncio.Queue[Frame]" = field(default_factory=asyncio.Queue)  # echo replies from the successor
    home: dict[int, "asyncio.Future[Frame]"] = field(default_factory=dict)  # source: ring probes in flight
    ids: "itertools.count[int]" = field(default_factory=lambda: itertools.count(1))  # probe / echo ids

    # -------------------------------------------------------------- every node
    def on_reply(self, f: Frame) -> bool:
        """A frame that came back from the successor: True when it was an echo reply."""
        if f.type == FrameType.PROBE and f.meta.get("kind") == ECHO_REPLY:
            self.replies.put_nowait(f)
            return True
        return False

    async def measure_link(self, s: FrameStream | None, succ: str, sizes: list[int], reps: int
                           ) -> dict[str, Any]:
        """Echo round trips over the link to the successor: latency and usable bandwidth."""
        rec: dict[str, Any] = {"from": self.name, "to": succ}
        if s is None:
            return dict(rec, error=f"{self.name!r} is not connected to {succ!r}")
        while not self.replies.empty():  # replies of an earlier, aborted measurement
            self.replies.get_nowait()
        samples: list[list[float]] = []
        try:
            for n in sizes:
                payload = bytes(n)
                rtts = []
                for _ in range(reps):
                    eid = next(self.ids)
                    t0 = time.perf_counter()
                    await s.send(Frame(FrameType.PROBE, meta={"kind": ECHO, "id": eid}, payload=payload))
                    while True:
                        r = await asyncio.wait_for(self.replies.get(), self.timeout_s)
                        if r.meta.get("kind") == BROKEN:
                            raise ProbeError(str(r.meta.get("reason")))
                        if r.meta.get("id") == eid:
                            break
                    rtts.append(1000 * (time.perf_counter() - t0))
                samples.append([n, round(min(rtts), 4), round(statistics.median(rtts), 4)])
        except asyncio.TimeoutError:
            return dict(rec, error=f"no echo came back from {succ!r} within {self.timeout_s:.0f} s")
        except (ConnectionError, OSError, FlowSpecError) as e:
            return dict(rec, error=f"the link to {succ!r} failed: {e}")
        rec["rtt_ms"] = samples[0][1]
        rec["samples"] = samples
        rec["bandwidth_mbit"] = bandwidth_mbit(samples)
        return rec

    @staticmethod
    async def answer_echo(s: FrameStream, f: Frame) -> None:
        """Answer a predecessor's echo at once, on the connection it came in on."""
        meta = {"kind": ECHO_REPLY, "id": f.meta.get("id"), "bytes": len(f.payload)}
        try:
            await s.send(Frame(FrameType.PROBE, f.request_id, f.seq, meta))
        except (ConnectionError, OSError) as e:
            log.debug("could not answer an echo: %s", e)

    # ------------------------------------------------------------------- stages
    async def on_ring_probe(self, f: Frame, s: FrameStream | None, succ: str, layers: tuple[int, int],
                            bench: Bench, caches: Callable[[], dict[str, Any]] | None = None) -> Frame:
        """A stage's part of a ring probe: measure, append the record, return the frame to forward."""
        kind = f.meta.get("kind")
        sizes, reps = f.meta.get("sizes") or [], int(f.meta.get("reps") or 1)
        rec: dict[str, Any]
        if kind == LINKS:
            rec = await self.measure_link(s, succ, sizes, reps)
        elif kind == BENCH:
            rec = {"node": self.name, "layers": list(layers), "context": int(f.meta.get("context") or 0)}
            try:
                rec["sizes"] = await bench(sizes, reps, rec["context"])
            except Exception as e:  # a failed benchmark is reported, never fatal to the stage
                log.warning("%s: benchmark failed: %s", self.name, e)
                rec["error"] = f"the benchmark failed on {self.name!r}: {e}"
        elif kind == CACHES and caches is not None:
            rec = {"node": self.name, **caches()}
        else:
            return f
        results = list(f.meta.get("results") or []) + [rec]
        return Frame(FrameType.PROBE, f.request_id, f.seq, dict(f.meta, results=results), f.payload)

    # ------------------------------------------------------------------- source
    def fail_all(self, reason: str) -> None:
        """Source: the ring broke; every ring probe in flight ends now with `reason` (it
        cannot come home, and whoever holds the ring for it must let go)."""
        for fut in self.home.values():
            if not fut.done():
                fut.set_exception(ProbeError(f"the ring broke under the probe: {reason}"))
        # an echo the source waits for may not come back either (its own link measurement)
        self.replies.put_nowait(Frame(FrameType.PROBE, meta={"kind": BROKEN, "reason": reason}))

    async def on_upstream(self, s: FrameStream, f: Frame) -> None:
        """Source: a PROBE from the last stage is an echo to answer or a ring probe coming home."""
        if f.meta.get("kind") == ECHO:
            await self.answer_echo(s, f)
            return
        fut = self.home.get(int(f.meta.get("id") or 0))
        if fut is not None and not fut.done():
            fut.set_result(f)
        else:
            log.debug("%s: a ring probe nobody waits for came back", self.name)

    async def run(self, meta: dict[str, Any], down: FrameStream | None, succ: str) -> dict[str, Any]:
        """Source: one client probe (the caller holds the ring); the answer for the client."""
        op, sizes, reps, context = check_probe(meta)
        if down is None:
            raise ProbeError(f"the source is not connected to {succ!r}")
        own: list[dict[str, Any]] = []
        if op == LINKS:
            own.append(await self.measure_link(down, succ, sizes, reps))
            if "error" in own[0]:  # the source's own link failed: the ring probe could not pass it
                raise ProbeError(own[0]["error"])
        pid = next(self.ids)
        fut: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self.home[pid] = fut
        ring_meta = {"kind": op, "id": pid, "sizes": sizes, "reps": reps, "context": context, "results": []}
        t0 = time.perf_counter()
        try:
            await down.send(Frame(FrameType.PROBE, meta=ring_meta))
            timeout = self.timeout_s * (2 + len(sizes) * reps)
            f = await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            raise ProbeError(f"the {op} probe did not come back around the ring") from None
        except (ConnectionError, OSError) as e:
            raise ProbeError(f"lost the link to {succ!r}: {e}") from None
        finally:
            self.home.pop(pid, None)
        return {"op": op, "results": own + list(f.meta.get("results") or []),
                "trip_s": round(time.perf_counter() - t0, 4)}


def check_probe(meta: dict[str, Any]) -> tuple[str, list[int], int, int]:
    """(op, sizes, reps, context) of a client's probe request, or ProbeError."""
    op = meta.get("op")
    if op not in OPS:
        raise ProbeError(f"unknown probe op {op!r}; choose one of {', '.join(OPS)}")
    default = DEFAULT_ECHO_SIZES if op == LINKS else DEFAULT_BENCH_SIZES
    sizes = meta.get("sizes") or list(default)
    hi = 1 << 26 if op == LINKS else MAX_BENCH_TOKENS
    lo = 0 if op == LINKS else 1
    if not isinstance(sizes, list) or not sizes or len(sizes) > 32 or not all(
            isinstance(n, int) and not isinstance(n, bool) and lo <= n <= hi for n in sizes):
        raise ProbeError(f"sizes must be a list of up to 32 integers in [{lo}, {hi}]")
    reps = meta.get("reps", 3)
    if isinstance(reps, bool) or not isinstance(reps, int) or not 1 <= reps <= MAX_REPS:
        raise ProbeError(f"reps must be an integer in [1, {MAX_REPS}]")
    context = meta.get("context", 0)
    if isinstance(context, bool) or not isinstance(context, int) or not 0 <= context <= MAX_CONTEXT:
        raise ProbeError(f"context must be an integer in [0, {MAX_CONTEXT}]")
    return op, sorted(sizes), reps, context


def bandwidth_mbit(samples: list[list[float]]) -> float | None:
    """Mbit/s from [bytes, min_ms, ...] samples: the inverse slope of round trip over size."""
    pts = [(float(b), float(ms)) for b, ms, *_ in samples]
    if len({b for b, _ in pts}) < 2:
        return None
    mb = sum(b for b, _ in pts) / len(pts)
    mt = sum(t for _, t in pts) / len(pts)
    var = sum((b - mb) ** 2 for b, _ in pts)
    slope = sum((b - mb) * (t - mt) for b, t in pts) / var  # ms per byte
    if slope <= 0:
        return None
    return round(8 / (slope / 1000) / 1e6, 1)


def bench_stage(stage: Any, sizes: list[int], reps: int, context: int,
                stop: threading.Event | None = None) -> list[list[float]]:
    """[tokens, min_ms, median_ms] per size: segments of a chain after `context` committed tokens.

    Runs in the stage's compute thread. The stage's KV cache is reset before and after.
    `stop`: once set (the ring broke), ProbeError before the next timed pass: a long
    benchmark (up to 33 sizes x 50 passes of 512 tokens) would hold the compute thread, and
    the re-formed ring behind it, for minutes.
    """
    import torch

    def inputs(n: int) -> dict[str, Any]:
        if stage.first:
            return {"tokens": torch.randint(0, stage.cfg.vocab_size, (n,))}
        return {"hidden": torch.randn(n, stage.cfg.hidden_size).to(stage.dtype)}

    from ..model.stage import Segment

    out: list[list[float]] = []
    stage.reset()
    try:
        last = -1
        if context:
            ids = list(range(context))
            stage(Segment(ids, [-1] + ids[:-1], ids, **inputs(context)))
            stage.apply_update(ids, [])
            last = ids[-1]
        nxt = context
        for n in [sizes[0]] + list(sizes):  # the first run warms up
            times = []
            for _ in range(reps):
                if stop is not None and stop.is_set():
                    raise ProbeError("stopped: the ring broke while this stage timed its passes")
                ids = list(range(nxt, nxt + n))
                nxt += n
                parents = [last] + ids[:-1]
                seg = Segment(ids, parents, list(range(context, context + n)), **inputs(n))
                t0 = time.perf_counter()
                stage(seg)
                times.append(1000 * (time.perf_counter() - t0))
                if last == -1:  # a root cannot be dropped and replaced: start over
                    stage.reset()
                else:
                    stage.apply_update([], [ids[0]])
            out.append([n, round(min(times), 4), round(statistics.median(times), 4)])
        return out[1:]
    finally:
        stage.reset()
