"""The source's spares, and the decision to give a dead stage's place to one of them.

* A spare announces itself to the source (links.py: HELLO role "spare", after the HMAC
  handshake and with the same model fingerprint) and keeps that link open, with
  heartbeats both ways; the source counts it as available.
* Every report of a dead neighbour is counted (the source's own links, and the stages'
  ERROR frames, which name the ``dead`` node). A node is *confirmed* dead when both its
  neighbours in the ring plan reported it: one neighbour alone may be the one cut off.
* A stage confirmed dead that is still missing ``decoding.failover_after_s`` later (the
  ring has not formed again) is replaced by the first connected spare whose ``memory_gb``
  holds the stage's weights. The source sends it a RING frame with the new plan and the
  place to take (layers, lm_head); the spare loads them, listens, connects to its
  successor and answers "taken". The source then follows the new plan itself and sends
  it down the ring, so that the dead stage's predecessor connects to the spare; the ring
  forms again (FORM is checked against the plan) and the held requests resume, replaying
  their prefix as after a restart.
* No spare (or none that fits): nothing changes, the requests wait for the node within
  ``decoding.resume_window_s``; a spare that connects meanwhile is used.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import Topology
from ..model.dtypes import planning_bytes
from .links import RingLinks
from .protocol import Frame, FrameType, ProtocolError
from .seal import TamperedFrame
from .transport import FrameStream, PeerGone

log = logging.getLogger(__name__)

GIB = 1 << 30  # memory_gb counts GiB


@dataclass
class _Spare:
    """A spare connected to the source."""

    stream: FrameStream  # its announcement link
    since: float = field(default_factory=time.monotonic)  # when it connected
    reply: "asyncio.Future[Frame | None] | None" = None  # its answer to a take, while one is pending


class Failover:
    """Spares and failover at the source (see the module's notes)."""

    def __init__(self, topo: Topology, name: str, links: RingLinks, ready: asyncio.Event,
                 formed_ring: Callable[[], list[dict[str, Any]]], head_params: int) -> None:
        self.topo, self.name, self.links, self.ready = topo, name, links, ready
        self._formed_ring = formed_ring  # the stages of the last formed ring (FORM entries)
        self._head_params = head_params  # parameters of the lm_head (a last stage that verifies holds one)
        self.spares: dict[str, _Spare] = {}  # name -> connected spare
        self.reports: dict[str, set[str]] = {}  # dead node -> the nodes that reported it, since the ring broke
        self.last: dict[str, Any] = {}  # the last failover: dead, spare, times (status, logs, tests)
        self._joined = asyncio.Event()  # a spare connected
        self._task: asyncio.Task[None] | None = None
        self._epoch = 0  # the last plan epoch handed out

    # ------------------------------------------------------------------ spares
    async def serve_spare(self, s: FrameStream, hello: dict[str, Any]) -> None:
        """The link of one spare, for as long as it is connected."""
        name = str(hello.get("name"))
        known = {n.name for n in self.topo.nodes if not n.is_source}
        if name not in known or name in self.links.plan or name in self.spares:
            why = ("is not a node of the topology" if name not in known else
                   "is part of the ring" if name in self.links.plan else "is connected already")
            log.warning("%s: refused spare %r: it %s", self.name, name, why)
            return
        sp = _Spare(s)
        self.spares[name] = sp
        mem = self.topo.node(name).memory_gb
        log.info("%s: spare %r is ready (%s)", self.name, name,
                 "memory unlimited" if mem is None else f"memory_gb {mem:g}")
        self._joined.set()
        try:
            while True:
                f = await s.recv(self.topo.security.dead_after_s)
                if f.type == FrameType.HEARTBEAT:
                    s.send_nowait(Frame(FrameType.HEARTBEAT))
                elif f.type in (FrameType.RING, FrameType.ERROR) and sp.reply is not None and not sp.reply.done():
                    sp.reply.set_result(f)
                else:
                    raise ProtocolError(f"unexpected {f.type.name} frame from spare {name!r}")
        except (PeerGone, ProtocolError, TamperedFrame, ConnectionError, OSError) as e:
            if name not in self.links.plan:  # (a spare that took a place closes this link)
                log.warning("%s: spare %r is gone: %s", self.name, name, e)
        finally:
            if self.spares.get(name) is sp:
                del self.spares[name]
            if sp.reply is not None and not sp.reply.done():
                sp.reply.set_result(None)

    # ------------------------------------------------------------------ reports
    def reported(self, dead: Any, reporter: str) -> None:
        """`reporter` lost its link to `dead`; confirmed by both neighbours, a failover is due."""
        plan = self.links.plan
        if not isinstance(dead, str) or dead not in plan or dead == plan.order[0]:
            return
        seen = self.reports.setdefault(dead, set())
        seen.add(reporter)
        if {plan.predecessor(dead), plan.successor(dead)} <= seen and self._task is None:
            self._task = asyncio.create_task(self._replace(dead, time.monotonic()), name=f"failover of {dead}")

    def formed(self) -> None:
        """The ring formed: the reports are history, a pending failover is off."""
        self.reports.clear()
        if self._task is not None:
            self._task.cancel()
            self._task = None

    # ------------------------------------------------------------------ replacing
    async def _replace(self, dead: str, t_dead: float) -> None:
        after = self.topo.decoding.failover_after_s
        tried: set[str] = set()
        told = False
        try:
            await asyncio.sleep(after)
            while not self.ready.is_set() and dead in self.links.plan:
                entry = next((r for r in self._formed_ring() if r.get("name") == dead), None)
                if entry is None:
                    if self.topo.spares or self.spares:
                        log.warning("%s: node %r is down, but it never was part of a formed ring: its layers "
                                    "are unknown, so no spare can take its place; waiting for it", self.name, dead)
                    return
                order = [n.name for n in self.topo.nodes]  # candidates in the file's order
                for name in sorted((n for n in self.spares if n not in tried), key=order.index):
                    tried.add(name)
                    why = unfit(self.topo, name, entry, self._head_params)
                    if why:
                        log.warning("%s: spare %r is not chosen for %r: %s", self.name, name, dead, why)
                        continue
                    if await self._take(dead, name, entry, t_dead):
                        return
                if not told and (self.topo.spares or self.spares):  # (a ring without spares just waits)
                    told = True
                    log.warning("%s: node %r is still down after %g s (decoding.failover_after_s) and no "
                                "connected spare can take its place (%s); waiting for it, or for a spare, within "
                                "the resume window", self.name, dead, after,
                                "none is connected" if not self.spares else "none fits")
                self._joined.clear()
                await self._joined.wait()
        finally:
            if self._task is asyncio.current_task():
                self._task = None

    async def _take(self, dead: str, name: str, entry: dict[str, Any], t_dead: float) -> bool:
        """Ask spare `name` to take `dead`'s place; True once it has and the plan is out."""
        sp = self.spares.get(name)
        if sp is None:
            return False
        plan = self.links.plan
        self._epoch = max(self._epoch, plan.epoch) + 1
        new = plan.replaced(dead, name, self._epoch)
        a, b = entry["layers"]
        take = {"slot": plan.slot_of(dead), "layers": [a, b], "lm_head": entry.get("lm_head") is True}
        log.warning("%s: node %r is still down after %.1f s; spare %r takes its place (layers %d-%d%s)",
                    self.name, dead, time.monotonic() - t_dead, name, a, b - 1,
                    ", lm_head" if take["lm_head"] else "")
        t0 = time.monotonic()
        sp.reply = asyncio.get_running_loop().create_future()
        try:
            await sp.stream.send(Frame(FrameType.RING, meta={"plan": new.as_meta(), "take": take}))
            f = await asyncio.wait_for(sp.reply, self.topo.security.read_timeout_s)
        except (asyncio.TimeoutError, PeerGone, ConnectionError, OSError) as e:
            log.error("%s: spare %r did not take the place of %r: %s", self.name, name, dead,
                      e or "no answer in security.read_timeout_s")
            return False
        finally:
            sp.reply = None
        if f is None or f.type != FrameType.RING or f.meta.get("taken") != take["slot"]:
            why = "it went away" if f is None else str(f.meta.get("message") or f.meta)
            log.error("%s: spare %r could not take the place of %r: %s", self.name, name, dead, why)
            return False
        await self.links.adopt(new)
        down = self.links.downstream
        if down is not None:  # the stages up to the dead one's predecessor learn the plan
            try:
                await down.send(Frame(FrameType.RING, meta={"plan": new.as_meta()}))
            except (ConnectionError, OSError):
                pass  # the predecessor learns it at its next handshake, or from FORM
        self.last = {"dead": dead, "spare": name, "epoch": new.epoch, "load_s": round(time.monotonic() - t0, 3),
                     "t_dead": t_dead}
        log.warning("%s: spare %r holds layers %d-%d (loaded in %.1f s); the ring is now %s", self.name, name,
                    a, b - 1, time.monotonic() - t0, new)
        return True


def unfit(topo: Topology, spare: str, entry: dict[str, Any], head_params: int) -> str | None:
    """Why `spare` cannot hold the weights of the stage described by `entry` (its FORM
    entry: ``params``, ``lm_head``), or None. Weights are counted as the layer planner
    counts them: planning_bytes per parameter (4 for float32 and for auto)."""
    params = int(entry.get("params") or 0) + (head_params if entry.get("lm_head") is True else 0)
    need = params * planning_bytes(topo.model.dtype)
    mem = topo.node(spare).memory_gb
    if mem is None or need <= mem * GIB:
        return None
    return (f"its memory_gb {mem:g} ({mem * GIB / (1 << 20):.1f} MiB) cannot hold that stage's "
            f"{need / (1 << 20):.1f} MiB of weights")
