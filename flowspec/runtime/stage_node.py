"""A stage node: receive -> apply update -> forward -> send, strictly in arrival order."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any

from ..config import Topology
from ..errors import FlowSpecError
from ..model.stage import Segment, Stage
from .protocol import Frame, FrameType, ProtocolError, SegmentMsg, UpdateMsg
from .links import RingLinks
from .probes import ECHO, ProbeDesk, bench_stage
from .transport import FrameStream, PeerGone, hello_meta

log = logging.getLogger(__name__)


class StageNode:
    """Holds layers [start, end) of the target and serves them in the ring."""

    def __init__(self, topo: Topology, name: str, key: bytes, stage: Stage, fingerprint: str) -> None:
        self.topo, self.name, self.stage = topo, name, stage
        self.layers = (stage.start, stage.end)
        self.succ_is_source = topo.successor(name).is_source
        hello = hello_meta(topo.cluster, fingerprint, name, "stage", self.layers)
        self.links = RingLinks(topo, name, key, hello, self._serve_upstream, None,
                               self._from_downstream, self._peer_dead)
        # one worker thread: segments are computed in order, off the event loop
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-compute")
        self._request = 0
        self.probes = ProbeDesk(name, topo.security.read_timeout_s)  # profiler probes (see probes.py)

    async def run(self, stop: asyncio.Event) -> None:
        await self.links.start()
        try:
            await stop.wait()
        finally:
            await self.links.close()
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ errors
    async def _report(self, message: str, direction: str = "fwd") -> None:
        """Send an error toward the source: forward if we can, else back upstream."""
        f = Frame(FrameType.ERROR, self._request, meta={"node": self.name, "message": message,
                                                         "dir": direction})
        target = self.links.downstream if direction == "fwd" else self.links.upstream
        if target is None and direction == "fwd":
            f.meta["dir"], target = "back", self.links.upstream
        if target is not None:
            try:
                await target.send(f)
            except Exception:  # the other side of the ring reports too
                pass

    async def _peer_dead(self, who: str, reason: str) -> None:
        msg = f"node {who!r} is unreachable from {self.name!r}: {reason}"
        # a dead successor can only be reported back upstream; a dead predecessor forward
        await self._report(msg, "back" if who == self.links.succ.name else "fwd")

    async def _from_downstream(self, f: Frame) -> None:
        if self.probes.on_reply(f):
            return
        if f.type == FrameType.ERROR and self.links.upstream is not None:
            f.meta["dir"] = "back"
            try:
                await self.links.upstream.send(f)
            except Exception:
                pass

    # --------------------------------------------------------------- the work
    async def _serve_upstream(self, s: FrameStream, hello: dict[str, Any]) -> None:
        """Read frames as they come (so heartbeats are never stuck behind compute); a worker
        applies them strictly in order."""
        work: asyncio.Queue[tuple[Frame, float] | None] = asyncio.Queue()
        worker = asyncio.create_task(self._work(work))
        try:
            while not worker.done():
                f = await s.recv(timeout=self.links.read_timeout)
                if f.type == FrameType.PROBE and f.meta.get("kind") == ECHO:  # answered at once
                    await self.probes.answer_echo(s, f)
                    continue
                if f.type != FrameType.HEARTBEAT:
                    work.put_nowait((f, time.time()))
        except ProtocolError as e:
            log.warning("%s: closing the link from %s: %s", self.name, s.label, e)
        except PeerGone as e:
            log.warning("%s: %s", self.name, self.links.gone_message(s.label, str(e)))
        finally:
            work.put_nowait(None)
            try:
                await worker
            except ProtocolError as e:
                log.warning("%s: closing the link from %s: %s", self.name, s.label, e)

    async def _work(self, work: "asyncio.Queue[tuple[Frame, float] | None]") -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await work.get()
            if item is None:
                return
            f, t_recv = item
            if f.type == FrameType.SEGMENT:
                await self._segment(loop, f, SegmentMsg.from_frame(f), t_recv)
            elif f.type == FrameType.UPDATE:
                u = UpdateMsg.from_frame(f)
                try:
                    self.stage.apply_update(u.commit, u.drop)
                except FlowSpecError as e:
                    await self._report(f"tree update failed on {self.name!r}: {e}")
                if not self.succ_is_source:
                    await self._forward(f)
            elif f.type == FrameType.RESET:
                self._request = f.request_id
                self.stage.reset()
                if not self.succ_is_source:
                    await self._forward(f)
            elif f.type == FrameType.FORM:
                ring = list(f.meta.get("ring") or [])
                host, port = self.links.me.address
                ring.append({"name": self.name, "address": f"{host}:{port}",
                             "layers": list(self.layers), "weight_bytes": self.stage.weight_bytes(),
                             "params": self.stage.num_params(), "threads": _threads()})
                await self._forward(Frame(FrameType.FORM, f.request_id, f.seq, dict(f.meta, ring=ring)))
            elif f.type == FrameType.PROBE:
                await self._forward(await self.probes.on_ring_probe(
                    f, self.links.downstream, self.links.succ.name, self.layers, self._bench))
            elif f.type in (FrameType.PROBE, FrameType.ERROR):
                await self._forward(f)
            else:
                raise ProtocolError(f"unexpected {f.type.name} frame from the predecessor")

    async def _segment(self, loop: asyncio.AbstractEventLoop, f: Frame, msg: SegmentMsg, t_recv: float) -> None:
        seg = Segment(msg.node_ids, msg.parent_ids, msg.positions, tokens=msg.tokens, hidden=msg.hidden)

        def compute() -> tuple[Any, float, float]:
            t0 = time.time()
            out = self.stage(seg)
            return out, t0, time.time()

        try:
            out, t_start, t_end = await loop.run_in_executor(self._pool, compute)
        except FlowSpecError as e:
            await self._report(f"segment failed on {self.name!r}: {e}")
            return
        except (RuntimeError, ValueError, IndexError, TypeError) as e:  # well-formed frame, unusable data
            log.warning("%s: segment %d could not be computed: %s", self.name, f.seq, e)
            await self._report(f"segment failed on {self.name!r}: its data does not fit this stage ({e})")
            return
        h = out.hidden
        out_bytes = 24 * len(out.node_ids) + h.numel() * h.element_size()
        hops = msg.hops + [[self.name, t_recv, t_start, t_end, time.time(), len(f.payload), out_bytes]]
        res = SegmentMsg(out.node_ids, out.parent_ids, out.positions, hidden=h, hops=hops, t_sent=msg.t_sent)
        frame = res.to_frame(f.request_id, f.seq)
        await self._forward(frame)

    async def _bench(self, sizes: list[int], reps: int, context: int) -> list[list[float]]:
        """Profiler: time segments of each size in the compute thread (the KV cache is reset)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, bench_stage, self.stage, sizes, reps, context)

    async def _forward(self, f: Frame) -> None:
        s = self.links.downstream
        if s is None:  # the source has been told the successor is gone; nothing can pass
            log.debug("%s: no successor; dropped a %s frame", self.name, f.type.name)
            return
        else:
            try:
                await s.send(f)
            except Exception as e:  # the reader of that link notices and reports
                log.warning("%s: could not forward to %s: %s", self.name, s.label, e)


def _threads() -> int:
    import torch

    return torch.get_num_threads()
