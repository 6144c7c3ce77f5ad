"""A node outside the ring that takes a dead stage's place when the source asks it to.

A spare (``role: spare``) loads no layers at start. It announces itself to the source
(HMAC handshake, HELLO with role "spare" and the model fingerprint, so a spare of another
model never joins) and waits, sending heartbeats. When a stage stays dead past
``decoding.failover_after_s`` the source sends it a RING frame with the new ring plan and
the place to take (failover.py): the spare loads that stage's layers (with the
embedding, final norm or lm_head the stage had), starts the ring links of that place
(listening on its own port, connecting to its successor), and answers "taken". From then
on it is an ordinary stage (stage_node.py) under its own name.

Every stage process runs inside this class too: a stage whose place was given away (it
came back, or woke up, after a spare took over) learns it at its next handshake, leaves
the ring without disturbing it and waits here as a spare, its layers kept loaded in case
it is asked to take a place that needs the same ones.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..config import Topology
from ..errors import FlowSpecError
from ..model.stage import LMHead, Stage
from .protocol import Frame, FrameType, ProtocolError
from .ring_plan import RingPlan
from .seal import TamperedFrame
from .stage_node import StageNode
from .transport import AuthError, HandshakeError, PeerGone, check_hello, client_auth, hello_meta, open_stream

log = logging.getLogger(__name__)

RETRY_MAX_S = 2.0  # the longest pause between two attempts to reach the source


class SpareNode:
    """Waits as a spare; serves a place in the ring when given one (or from the start: `member`)."""

    def __init__(self, topo: Topology, name: str, key: bytes, fingerprint: str,
                 member: StageNode | None = None) -> None:
        self.topo, self.name, self.key, self.fingerprint = topo, name, key, fingerprint
        self.member = member  # the stage this node is now, if it has a place in the ring
        self._kept: tuple[tuple[int, int, bool], Stage, LMHead | None] | None = None  # layers of a lost place
        self.hello = hello_meta(topo.cluster, fingerprint, name, "spare", None,
                                stage_weights=topo.model.stage_weights)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.member is None:
                self.member = await self._wait_for_place(stop)
                if self.member is None:
                    return
            node = self.member
            await node.run(stop)  # returns on stop, or when a newer ring plan gave the place away
            if stop.is_set():
                return
            self._kept = ((node.stage.start, node.stage.end, node.head is not None), node.stage, node.head)
            self.member = None
            log.warning("%s: left the ring without disturbing it; waits as a spare now (layers %d-%d kept loaded)",
                        self.name, node.stage.start, node.stage.end - 1)

    # ------------------------------------------------------------------ waiting
    async def _wait_for_place(self, stop: asyncio.Event) -> StageNode | None:
        """Stay announced to the source until it gives this node a place (or `stop`)."""
        waiting = asyncio.ensure_future(self._announced())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([waiting, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not waiting.done():
                waiting.cancel()
                try:
                    await waiting
                except (asyncio.CancelledError, Exception):
                    pass
        return waiting.result() if waiting.done() and not waiting.cancelled() else None

    async def _announced(self) -> StageNode:
        src = self.topo.source
        host, port = src.address
        sec = self.topo.security
        delay, told = 0.1, False
        while True:
            s = None
            try:
                s = await open_stream(host, port, sec.max_frame_bytes, sec.read_timeout_s, src.name)
                await client_auth(s, self.key, encrypt=sec.encrypt)
                await s.send(Frame(FrameType.HELLO, meta=self.hello))
                f = await s.recv(5.0)
                if f.type == FrameType.REJECT:
                    raise HandshakeError(str(f.meta.get("reason")))
                if f.type != FrameType.HELLO:
                    raise ProtocolError("expected HELLO from the source")
                check_hello(self.hello, f.meta)
                log.info("%s: announced to the source %r as a spare; waiting for a place in the ring",
                         self.name, src.name)
                delay, told = 0.1, False
                node = await self._serve(s)
                if node is not None:
                    return node
            except (AuthError, HandshakeError) as e:
                log.error("%s: the source refused this spare: %s", self.name, e)
                delay = RETRY_MAX_S
            except (PeerGone, ProtocolError, TamperedFrame, ConnectionError, OSError) as e:
                if not told:
                    log.info("%s: waiting for the source %r (%s)", self.name, src.name, e)
                    told = True
            finally:
                if s is not None:
                    await s.close()
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, RETRY_MAX_S)

    async def _serve(self, s: Any) -> StageNode | None:
        """Heartbeats to the source, and its request to take a place; the new stage, or None
        when the source asked for a place this node could not take."""
        beat = asyncio.ensure_future(self._heartbeats(s))
        try:
            while True:
                f = await s.recv(self.topo.security.dead_after_s)
                if f.type == FrameType.HEARTBEAT:
                    continue
                if f.type != FrameType.RING or not isinstance(f.meta.get("take"), dict):
                    raise ProtocolError(f"unexpected {f.type.name} frame from the source")
                node = await self._take(s, f.meta)
                if node is not None:
                    return node
        finally:
            beat.cancel()

    async def _heartbeats(self, s: Any) -> None:
        while True:
            await asyncio.sleep(self.topo.security.heartbeat_s)
            try:
                s.send_nowait(Frame(FrameType.HEARTBEAT))
            except Exception:  # the reader notices a broken link
                return

    # ------------------------------------------------------------------ taking a place
    async def _take(self, s: Any, meta: dict[str, Any]) -> StageNode | None:
        take = meta["take"]
        slot, layers, lm_head = take.get("slot"), take.get("layers"), take.get("lm_head") is True
        node: StageNode | None = None
        try:
            plan = RingPlan.from_meta(self.topo, meta.get("plan"))
            if plan is None or self.name not in plan or plan.slot_of(self.name) != slot:
                raise ProtocolError(f"the plan {plan} does not give {self.name!r} the place of {slot!r}")
            if (not isinstance(layers, list) or len(layers) != 2 or not all(isinstance(x, int) for x in layers)
                    or not 0 <= layers[0] < layers[1]):
                raise ProtocolError(f"cannot take layers {layers!r}")
            t0 = time.monotonic()
            log.info("%s: taking the place of %r: loading layers %d-%d%s", self.name, slot, layers[0],
                     layers[1] - 1, " and the lm_head" if lm_head else "")
            stage, head = await asyncio.get_running_loop().run_in_executor(
                None, self._load, layers[0], layers[1], lm_head)
            node = StageNode(self.topo, self.name, self.key, stage, self.fingerprint, head, plan=plan)
            await node.links.start()  # listening before the source tells the predecessor to connect
            await s.send(Frame(FrameType.RING, meta={"taken": slot}))
            log.warning("%s: took the place of %r in the ring (%s; loaded in %.1f s)", self.name, slot, plan,
                        time.monotonic() - t0)
            return node
        except (FlowSpecError, OSError, MemoryError, RuntimeError, ValueError) as e:
            log.error("%s: cannot take the place of %r: %s", self.name, slot, e)
            if node is not None:
                await node.links.close()
            try:
                await s.send(Frame(FrameType.ERROR, meta={"node": self.name, "message": f"spare {self.name!r} "
                                                          f"cannot take the place of {slot!r}: {e}"}))
            except (ConnectionError, OSError):
                pass
            return None

    def _load(self, start: int, end: int, lm_head: bool) -> tuple[Stage, LMHead | None]:
        """In a worker thread: the weights of a place (kept ones when they are the same)."""
        if self._kept is not None and self._kept[0] == (start, end, lm_head):
            return self._kept[1], self._kept[2]
        self._kept = None  # the old weights go before the new ones come
        from ..model.config import ModelConfig
        from ..model.loader import resolve_model

        folder = resolve_model(self.topo.model.target)
        cfg = ModelConfig.from_file(str(folder / "config.json"))
        if end > cfg.num_layers:
            raise FlowSpecError(f"layers {start}-{end - 1} are beyond the model's {cfg.num_layers}")
        dtype = self.topo.model.dtype
        stage = Stage.load(folder, start, end, dtype=dtype, max_context=self.topo.model.max_context, cfg=cfg,
                           stage_weights=self.topo.model.stage_weights)
        head = LMHead.load(folder, dtype=dtype, cfg=cfg) if lm_head else None
        return stage, head
