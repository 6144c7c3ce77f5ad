"""A stage node: receive -> apply update -> forward -> send, strictly in arrival order."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from typing import Any

import torch

from ..config import Topology
from ..errors import FlowSpecError, ModelError
from ..model.kvcache import CachePool
from ..model.stage import LMHead, Segment, Stage
from ..speculative.logprobs import token_logprob, wire
from ..speculative.sampling import SamplingParams
from ..speculative.verify import target_tokens
from .protocol import Frame, FrameType, ProtocolError, SegmentMsg, UpdateMsg
from .links import RingLinks
from .probes import ECHO, ProbeDesk, bench_stage
from .ring_plan import RingPlan
from .seal import TamperedFrame
from .transport import FrameStream, PeerGone, hello_meta

log = logging.getLogger(__name__)


class StageNode:
    """Holds layers [start, end) of the target and serves them in the ring."""

    def __init__(self, topo: Topology, name: str, key: bytes, stage: Stage, fingerprint: str,
                 head: LMHead | None = None, plan: RingPlan | None = None) -> None:
        self.topo, self.name, self.stage = topo, name, stage
        self.head = head  # the target's lm_head: the last stage chooses the tokens (decoding.verify)
        self.layers = (stage.start, stage.end)
        hello = hello_meta(topo.cluster, fingerprint, name, "stage", self.layers,
                           stage_weights=topo.model.stage_weights)
        # plan: the ring this node joins (a spare taking a dead stage's place); None: the file's order
        self.links = RingLinks(topo, name, key, hello, self._serve_upstream, None,
                               self._from_downstream, self._peer_dead, plan=plan)
        # one worker thread: segments are computed in order, off the event loop
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-compute")
        # one KV cache per request being decoded (decoding.max_active), allocated up front
        self.caches = CachePool([stage.cache] + [stage.new_cache() for _ in range(topo.decoding.max_active - 1)])
        self.probes = ProbeDesk(name, topo.security.read_timeout_s)  # profiler probes (see probes.py)

    @property
    def succ_is_source(self) -> bool:
        return self.links.succ_is_source

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop`, or until a newer ring plan gives this node's place to another
        node (``links.ousted``: spare_node.py then keeps the process as a spare)."""
        if not self.links.listening:  # (a spare starts its links before it says it has taken the place)
            await self.links.start()
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.links.ousted.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
            await self.links.close()
            self._pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ errors
    async def _report(self, message: str, rid: int = 0, direction: str = "fwd", broken: bool = False,
                      dead: str | None = None) -> None:
        """Send an error toward the source (about request `rid`, 0: the ring): forward if we
        can, else back upstream. `broken`: the ring itself is broken (a link is closing);
        `dead`: the neighbour that is gone (the source replaces it with a spare, failover.py)."""
        f = Frame(FrameType.ERROR, rid, meta={"node": self.name, "message": message,
                                                         "dir": direction, "broken": broken, "dead": dead})
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
        back = self.name in self.links.plan and who == self.links.succ.name
        await self._report(msg, 0, "back" if back else "fwd", broken=True, dead=who)

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
        work = WorkQueue()
        worker = asyncio.create_task(self._work(work))
        try:
            while not worker.done():
                f = await s.recv(timeout=self.links.read_timeout)
                if f.type == FrameType.PROBE and f.meta.get("kind") == ECHO:  # answered at once
                    await self.probes.answer_echo(s, f)
                    continue
                if f.type != FrameType.HEARTBEAT:
                    work.put((f, time.time()))
        except TamperedFrame as e:  # tell the source why the ring broke, before the link drops
            log.error("%s: closing the link from %s: %s", self.name, s.label, e)
            await self._report(f"{self.name!r} closed its link from {s.label!r}: {e}", broken=True)
        except ProtocolError as e:
            log.warning("%s: closing the link from %s: %s", self.name, s.label, e)
        except PeerGone as e:
            log.warning("%s: %s", self.name, self.links.gone_message(s.label, str(e)))
        finally:
            work.put(None)
            try:
                await worker
            except ProtocolError as e:
                log.warning("%s: closing the link from %s: %s", self.name, s.label, e)

    async def _work(self, work: "WorkQueue") -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await work.get()
            if item is None:
                return
            f, t_recv = item
            if f.type == FrameType.SEGMENT:
                # the segments waiting right behind this one (any request) run in the same pass
                batch = [(f, SegmentMsg.from_frame(f), t_recv)]
                rows = len(batch[0][1].node_ids)
                while rows < BATCH_ROWS and (nxt := work.peek()) is not None and nxt[0].type == FrameType.SEGMENT:
                    g, t = work.get_nowait()
                    msg = SegmentMsg.from_frame(g)
                    batch.append((g, msg, t))
                    rows += len(msg.node_ids)
                await self._segments(loop, batch)
            elif f.type == FrameType.UPDATE:
                u = UpdateMsg.from_frame(f)
                cache = self.caches.get(f.request_id)
                try:
                    if cache is None:
                        raise FlowSpecError(f"request {f.request_id} has no KV cache here (no RESET came before)")
                    self.stage.apply_update(u.commit, u.drop, cache)
                except FlowSpecError as e:
                    await self._report(f"tree update failed on {self.name!r}: {e}", f.request_id)
                if not self.succ_is_source:
                    await self._forward(f)
            elif f.type == FrameType.RESET:
                _, evicted = self.caches.open(f.request_id)
                if evicted is not None:
                    log.info("%s: request %d took over the KV cache of request %d, which never ended "
                             "(all %d caches were taken)", self.name, f.request_id, evicted, self.caches.size)
                if not self.succ_is_source:
                    await self._forward(f)
            elif f.type == FrameType.FREE:
                self.caches.close(f.request_id)
                if not self.succ_is_source:
                    await self._forward(f)
            elif f.type == FrameType.RING:  # the source's new plan: a spare took a dead stage's place
                await self.links.adopt(RingPlan.from_meta(self.topo, f.meta.get("plan")))
                if not self.succ_is_source:
                    await self._forward(f)
            elif f.type == FrameType.FORM:
                await self.links.adopt(RingPlan.from_meta(self.topo, f.meta.get("plan")))
                ring = list(f.meta.get("ring") or [])
                host, port = self.links.me.address
                ring.append({"name": self.name, "address": f"{host}:{port}",
                             "layers": list(self.layers), "weight_bytes": self.stage.weight_bytes(),
                             "params": self.stage.num_params(), "threads": _threads(),
                             "caches": self.caches.size, "lm_head": self.head is not None})
                await self._forward(Frame(FrameType.FORM, f.request_id, f.seq, dict(f.meta, ring=ring)))
            elif f.type == FrameType.PROBE:
                await self._forward(await self.probes.on_ring_probe(
                    f, self.links.downstream, self.links.succ.name, self.layers, self._bench,
                    lambda: {"requests": self.caches.active, "caches": self.caches.size}))
            elif f.type == FrameType.ERROR:
                await self._forward(f)
            else:
                raise ProtocolError(f"unexpected {f.type.name} frame from the predecessor")

    async def _segments(self, loop: asyncio.AbstractEventLoop,
                        batch: list[tuple[Frame, SegmentMsg, float]]) -> None:
        """Compute a batch of segments in one pass and forward each one's rows, in arrival order."""
        items: list[tuple[Segment, Any]] = []
        runnable: list[int] = []
        for i, (f, msg, _) in enumerate(batch):
            cache = self.caches.get(f.request_id)
            if cache is None:
                await self._report(f"segment failed on {self.name!r}: request {f.request_id} has no KV cache "
                                   "here (no RESET came before)", f.request_id)
                continue
            items.append((Segment(msg.node_ids, msg.parent_ids, msg.positions, tokens=msg.tokens,
                                  hidden=msg.hidden), cache))
            runnable.append(i)
        if not items:
            return

        msgs = [batch[i][1] for i in runnable]

        def compute() -> tuple[list[Any], list[list[int] | None], list[list[Any] | None], float, float]:
            t0 = time.time()
            outs = self.stage.forward_many(items)
            if self.head is not None:
                chosen, lps = self._choose(msgs, outs)
            else:  # a stage without the lm_head chooses nothing
                chosen, lps = [None] * len(outs), [None] * len(outs)
            return outs, chosen, lps, t0, time.time()

        try:
            outs, chosen, chosen_lps, t_start, t_end = await loop.run_in_executor(self._pool, compute)
        except (RuntimeError, ValueError, IndexError, TypeError) as e:  # well-formed frames, unusable data
            log.warning("%s: %d segment(s) could not be computed: %s", self.name, len(items), e)
            for i in runnable:
                await self._report(f"segment failed on {self.name!r}: its data does not fit this stage ({e})",
                                   batch[i][0].request_id)
            return
        for i, out, targets, lps in zip(runnable, outs, chosen, chosen_lps):
            f, msg, t_recv = batch[i]
            if isinstance(out, FlowSpecError):
                log.warning("%s: segment %d could not be computed (request %d): %s", self.name, f.seq,
                            f.request_id, out)
                why = f"its data does not fit this stage ({out})" if isinstance(out, ModelError) else str(out)
                await self._report(f"segment failed on {self.name!r}: {why}", f.request_id)
                continue
            h = out.hidden
            out_bytes = 24 * len(out.node_ids) + h.numel() * h.element_size()
            hops = msg.hops + [[self.name, t_recv, t_start, t_end, time.time(), len(f.payload), out_bytes]]
            res = SegmentMsg(out.node_ids, out.parent_ids, out.positions, hidden=h, hops=hops, t_sent=msg.t_sent,
                             score=msg.score if targets is None else None, targets=targets, logprobs=lps)
            await self._forward(res.to_frame(f.request_id, f.seq))

    def _choose(self, msgs: list[SegmentMsg], outs: list[Any]
                ) -> tuple[list[list[int] | None], list[list[Any] | None]]:
        """In the compute thread, at the last stage: the target's token after each row a
        segment asks for (its ``score``), all segments of the pass in one lm_head pass; and
        where the score asks ("lp"), each chosen token's logprob (speculative/logprobs.py)."""
        assert self.head is not None
        parts: list[tuple[int, list[int]]] = []  # (segment index, rows)
        for j, (msg, out) in enumerate(zip(msgs, outs)):
            if msg.score is None or isinstance(out, FlowSpecError):
                continue
            want = set(msg.node_ids[msg.score["from"]:])
            rows = [r for r, n in enumerate(out.node_ids) if n in want]
            if rows:
                parts.append((j, rows))
        chosen: list[list[int] | None] = [None] * len(outs)
        lps: list[list[Any] | None] = [None] * len(outs)
        for j, _ in enumerate(msgs):
            if msgs[j].score is not None and not isinstance(outs[j], FlowSpecError):
                chosen[j] = [-1] * len(outs[j].node_ids)
                if "lp" in msgs[j].score:  # type: ignore[operator]
                    lps[j] = [None] * len(outs[j].node_ids)
        if not parts:
            return chosen, lps
        logits = self.head(torch.cat([outs[j].hidden[rows] for j, rows in parts]))
        a = 0
        for j, rows in parts:
            sc = msgs[j].score
            assert sc is not None
            params = SamplingParams(float(sc["t"]), float(sc["p"]), int(sc["k"]), int(sc["s"]))
            out = outs[j]
            toks = target_tokens(logits[a : a + len(rows)], [out.positions[r] for r in rows], params)
            row_targets, row_lps = chosen[j], lps[j]
            assert row_targets is not None
            for k, (r, t) in enumerate(zip(rows, toks)):
                row_targets[r] = t
                if row_lps is not None:
                    row_lps[r] = wire(token_logprob(logits[a + k], t, int(sc["lp"])))
            a += len(rows)
        return chosen, lps

    async def _bench(self, sizes: list[int], reps: int, context: int) -> list[list[float]]:
        """Profiler: time segments of each size in the compute thread (the KV cache is reset).
        The timing stops between two passes when a link of this node is lost or replaced (the
        ring broke: the probe has failed at the source, and the ring that forms again must not
        wait behind it), or when the node stops."""
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        links = self.links
        up, down = links.upstream, links.downstream
        job = loop.run_in_executor(self._pool, bench_stage, self.stage, sizes, reps, context, stop)
        try:
            while True:
                done, _ = await asyncio.wait({job}, timeout=BENCH_WATCH_S)
                if done:
                    return job.result()
                if links.upstream is not up or links.downstream is not down or links.closing:
                    stop.set()
        finally:
            stop.set()

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


BENCH_WATCH_S = 0.2  # how often a stage timing its passes for the profiler looks at its links
BATCH_ROWS = 256  # a stage adds waiting segments to a pass until it holds this many rows


class WorkQueue:
    """Frames waiting for a stage's worker, in arrival order; the worker may peek ahead."""

    def __init__(self) -> None:
        self._items: deque[tuple[Frame, float] | None] = deque()
        self._ready = asyncio.Event()

    def put(self, item: tuple[Frame, float] | None) -> None:
        self._items.append(item)
        self._ready.set()

    async def get(self) -> tuple[Frame, float] | None:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()

    def get_nowait(self) -> tuple[Frame, float]:
        item = self._items.popleft()
        assert item is not None
        return item

    def peek(self) -> tuple[Frame, float] | None:
        """The next frame without taking it (None when nothing waits or the link closed)."""
        return self._items[0] if self._items else None


def _threads() -> int:
    return torch.get_num_threads()
