"""The source node: request queue, scheduler loop around a strategy, and the ring's edges."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any, AsyncIterator

import torch

from ..config import Topology
from ..errors import FlowSpecError, ModelError, RequestError, RingError
from ..model.stage import LMHead
from ..model.tokenizer import Tokenizer
from ..spec.drafters import Drafter
from ..spec.strategies import Send, Speculator
from ..telemetry import HopStats
from .links import RingLinks
from .probes import ProbeDesk
from .protocol import Frame, FrameType, ProtocolError, SegmentMsg, UpdateMsg
from .requests import GenRequest, check_request, finish_request
from .tasks import start_supervised
from .text import TextStream
from .transport import FrameStream, PeerGone, hello_meta

log = logging.getLogger(__name__)

__all__ = ["GenRequest", "RequestError", "RingError", "SourceNode"]
FORM_TIMEOUT_S = 3.0  # a FORM that has not come back around the ring by then is sent again


class SourceNode:
    def __init__(self, topo: Topology, name: str, key: bytes, tokenizer: Tokenizer, head: LMHead,
                 drafter: Drafter, fingerprint: str, num_layers: int, model_name: str) -> None:
        self.topo, self.name, self.tok, self.head, self.drafter = topo, name, tokenizer, head, drafter
        self.num_layers, self.model_name = num_layers, model_name
        hello = hello_meta(topo.cluster, fingerprint, name, "source", None)
        self.links = RingLinks(topo, name, key, hello, self._serve_upstream, self._serve_client,
                               self._from_downstream, self._peer_dead)
        self.ready = asyncio.Event()  # the ring is formed and verified
        self.ring: list[dict[str, Any]] = []  # what FORM collected: one entry per stage
        self.error: str | None = None  # why the ring is not usable, if it is not
        self._results: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._form_waiter: asyncio.Future[Frame] | None = None
        self._lock = asyncio.Lock()  # one request on the ring at a time
        self._request = 0
        self._seq = 0
        self.waiting = 0  # requests queued behind the current one
        self.preparing = 0  # requests being tokenized
        # tokenizing, drafting, verifying and detokenizing run off the event loop, one at a time each
        self._tok_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-tokenize")
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-compute")
        self.metrics: dict[str, float] = {"requests": 0, "tokens": 0, "errors": 0, "decode_s": 0.0,
                                          "verifications": 0}
        self.last_stats: dict[str, Any] = {}
        self.probes = ProbeDesk(name, topo.security.read_timeout_s)  # profiler probes (see probes.py)

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        await self.links.start()
        former = start_supervised(f"{self.name}: ring formation", self._form_loop, log,
                                  lambda: self.links.closing)
        try:
            await stop.wait()
        finally:
            former.cancel()
            await self.links.close()
            self._tok_pool.shutdown(wait=False, cancel_futures=True)
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def _form_loop(self) -> None:
        """Whenever both links are up and the ring is not formed, send FORM around it."""
        while True:
            await self.links.down_ready.wait()
            await self.links.up_ready.wait()
            if self.ready.is_set():
                await asyncio.sleep(0.2)
                continue
            loop = asyncio.get_running_loop()
            self._form_waiter = loop.create_future()
            down = self.links.downstream
            if down is None:
                await asyncio.sleep(0.1)
                continue
            try:
                await down.send(Frame(FrameType.FORM, meta={"ring": []}))
                f = await asyncio.wait_for(self._form_waiter, FORM_TIMEOUT_S)
            except (asyncio.TimeoutError, PeerGone, ConnectionError, OSError) as e:
                log.debug("%s: ring formation will be tried again: %s", self.name, e or type(e).__name__)
                await asyncio.sleep(0.5)
                continue
            problem = self._check_ring(f.meta.get("ring") or [])
            if problem:
                self.error = problem
                log.error("%s: ring formation failed (trying again in 5 s): %s", self.name, problem)
                await asyncio.sleep(5.0)
                continue
            self.ring = f.meta["ring"]
            self.error = None
            self.ready.set()
            log.info("%s: ring formed: %s", self.name,
                     " -> ".join(f"{r['name']}[{r['layers'][0]}-{r['layers'][1] - 1}]" for r in self.ring))

    def _check_ring(self, ring: Any) -> str | None:
        """The stages must cover the model's layers exactly once, in ring order."""
        if not isinstance(ring, list) or not all(
                isinstance(r, dict) and isinstance(r.get("layers"), list) and len(r["layers"]) == 2
                and all(isinstance(x, int) for x in r["layers"]) for r in ring):
            return f"the ring's FORM reply is malformed ({str(ring)[:120]}); is every node the same FlowSpec version?"
        expected = [n.name for n in self.topo.stages]
        got = [str(r.get("name")) for r in ring]
        if got != expected:
            return f"the ring passes through {got}, but the topology lists the stages {expected}"
        nxt, prev = 0, None
        for r in ring:
            a, b = r["layers"]
            if a != nxt:
                what = "overlap" if a < nxt else "leave a gap"
                after = f"node {prev['name']!r} has layers {prev['layers'][0]}-{prev['layers'][1] - 1}" \
                    if prev else "the ring starts"
                return (f"layer ranges {what}: {after} but node {r['name']!r} has layers {a}-{b - 1}; "
                        f"the stages must cover layers 0-{self.num_layers - 1} exactly once in ring order")
            nxt, prev = b, r
        if nxt != self.num_layers:
            return (f"the stages end at layer {nxt - 1} (node {prev['name'] if prev else '?'!r}) but the "
                    f"model has {self.num_layers} layers")
        return None

    # ------------------------------------------------------------------ failures
    async def _peer_dead(self, who: str, reason: str) -> None:
        self._fail(f"node {who!r} is unreachable: {reason}")

    def _fail(self, message: str) -> None:
        if self.links.closing:
            return
        if self.ready.is_set() or self.error != message:
            log.error("%s: %s", self.name, message)
        self.ready.clear()
        self.error = message
        self._results.put_nowait((-1, message))

    async def _from_downstream(self, f: Frame) -> None:
        if self.probes.on_reply(f):
            return
        if f.type == FrameType.ERROR:
            self._on_error(f)

    def _on_error(self, f: Frame) -> None:
        node, msg = f.meta.get("node", "?"), str(f.meta.get("message", "unknown error"))
        if "unreachable" in msg:
            self._fail(msg)
        else:  # logged too: a report that comes while no request runs would otherwise go unseen
            log.warning("%s: %r reports: %s", self.name, node, msg)
            self._results.put_nowait((-1, f"{msg} (reported by {node!r})"))

    # ------------------------------------------------------------------ results
    async def _serve_upstream(self, s: FrameStream, hello: dict[str, Any]) -> None:
        try:
            while True:
                f = await s.recv()
                if f.type == FrameType.HEARTBEAT:
                    continue
                if f.type == FrameType.SEGMENT:
                    self._results.put_nowait((f.request_id, (SegmentMsg.from_frame(f), time.time())))
                elif f.type == FrameType.FORM:
                    if self._form_waiter is not None and not self._form_waiter.done():
                        self._form_waiter.set_result(f)
                elif f.type == FrameType.ERROR:
                    self._on_error(f)
                elif f.type == FrameType.PROBE:
                    await self.probes.on_upstream(s, f)
                else:
                    raise ProtocolError(f"unexpected {f.type.name} frame from the last stage")
        except (ProtocolError, PeerGone) as e:
            log.warning("%s: link from %s: %s", self.name, s.label, e)

    # ------------------------------------------------------------------ requests
    async def prepare(self, meta: dict[str, Any]) -> GenRequest:
        """Validate a client's request (the same fields as the HTTP API's) and tokenize it.

        Every field and size is checked before tokenizing; the tokenizer runs in its own
        thread (it releases the GIL), so a long prompt never stalls the event loop."""
        plan = check_request(self.topo, self.tok, self.head.weight.shape[0], meta)
        self.preparing += 1
        try:
            ids = await asyncio.get_running_loop().run_in_executor(self._tok_pool, plan.encode)
        except ModelError as e:
            raise RequestError(str(e), "messages") from None
        finally:
            self.preparing -= 1
        return finish_request(self.topo, plan, ids)

    async def generate(self, req: GenRequest) -> AsyncIterator[dict[str, Any]]:
        """Run one request on the ring; yields {"type": "tokens"} events, then {"type": "done"}."""
        self.waiting += 1
        try:
            await self._lock.acquire()
        finally:
            self.waiting -= 1
        try:
            async for ev in self._generate(req):
                yield ev
        except RingError:
            self.metrics["errors"] += 1
            raise
        finally:
            self._lock.release()

    async def _generate(self, req: GenRequest) -> AsyncIterator[dict[str, Any]]:
        if not self.ready.is_set():
            raise RingError(self.error or "the ring is not formed yet; start every node of the topology")
        while not self._results.empty():  # leftovers of an aborted request
            self._results.get_nowait()
        self._request = (self._request + 1) & 0xFFFFFFFF
        rid = self._request
        down = self.links.downstream
        if down is None:
            raise RingError(self.error or "the source is not connected to the first stage")
        loop = asyncio.get_running_loop()
        spec = await loop.run_in_executor(  # the compute thread owns the drafter: made there, like every step
            self._pool, lambda: Speculator(req.strategy, self.head, self.drafter, req.prompt_ids, req.max_new_tokens,
                                           self.tok.eos_ids, req.sampling, req.tree, self.topo.decoding.prefill_chunk))
        text = TextStream(self.tok.decode, req.stop)
        hops = HopStats(self.name)
        t0 = time.perf_counter()
        wall0 = time.time()
        t_first: float | None = None
        wait_s = 0.0
        trace: dict[str, Any] | None = {"t0": wall0, "segments": [], "source": []} if req.trace else None
        emitted = 0

        def step(node_ids: list[int], hidden: torch.Tensor) -> tuple[list[Send], list[int], str]:
            """In the compute thread: verify and send what is drafted; the new tokens and their text."""
            sends = spec.respond(node_ids, hidden)
            new = spec.output[emitted:]
            return sends, new, text.push(new) if new else ""

        try:
            await down.send(Frame(FrameType.RESET, rid))
            await self._send_all(down, rid, await loop.run_in_executor(self._pool, spec.start))
            timeout = self.topo.security.read_timeout_s
            while not spec.done and not text.stopped:
                tw = time.perf_counter()
                try:
                    got_rid, item = await asyncio.wait_for(self._results.get(), timeout)
                except asyncio.TimeoutError:
                    raise RingError(f"no result came back around the ring for {timeout:.0f} s") from None
                wait_s += time.perf_counter() - tw
                if got_rid == -1:
                    raise RingError(str(item))
                if got_rid != rid or not isinstance(item, tuple):
                    continue
                msg, t_back = item
                hops.add(msg.hops, msg.t_sent, t_back)
                hidden = msg.hidden if msg.hidden is not None else torch.empty(0)
                t_work = time.time()
                sends, new, delta = await loop.run_in_executor(self._pool, step, msg.node_ids, hidden)
                if trace is not None and len(trace["segments"]) < TRACE_MAX_SEGMENTS:
                    trace["segments"].append({"t_sent": msg.t_sent, "t_back": t_back, "rows": len(msg.node_ids),
                                              "hops": msg.hops})
                    trace["source"].append([t_work, time.time(), len(sends)])
                if self.links.downstream is not down:
                    raise RingError(self.error or "the link to the first stage was lost")
                await self._send_all(down, rid, sends)
                live: dict[str, Any] | None = None
                if new:  # read the statistics before the compute thread touches spec again
                    if t_first is None:
                        t_first = time.perf_counter()
                    emitted += len(new)
                    live = _live_stats(spec, hops, time.perf_counter() - t_first, time.time() - wall0)
                # send first, think later: the tree grows while the ring works on what was sent
                t_think = time.time()
                thinking = loop.run_in_executor(self._pool, spec.think)
                if live is not None:
                    yield {"type": "tokens", "ids": new, "text": delta, "live": live}
                more = await thinking
                if trace is not None and len(trace["source"]) < 2 * TRACE_MAX_SEGMENTS:
                    trace["source"].append([t_think, time.time(), len(more)])  # the drafting span
                if more:
                    await self._send_all(down, rid, more)
        except RingError as e:
            raise RingError(str(e), {"text": text.sent, "token_ids": list(spec.output[:emitted])}) from None
        t_end = time.perf_counter()
        finish = "stop" if text.stopped or (spec.output and spec.output[-1] in self.tok.eos_ids) else "length"
        final = await loop.run_in_executor(self._pool, text.final_text)
        st = spec.result_stats()
        decode_s = t_end - (t_first or t_end)
        wall = time.time() - wall0
        stats: dict[str, Any] = dict(st)
        stats.update({
            "strategy": req.strategy, "prompt_tokens": len(req.prompt_ids),
            "prefill_s": round((t_first or t_end) - t0, 4), "decode_s": round(decode_s, 4),
            "total_s": round(t_end - t0, 4),
            "tokens_per_s": round((len(spec.output) - 1) / decode_s, 2) if decode_s > 0 and len(spec.output) > 1 else 0.0,
            "e2e_tokens_per_s": round(len(spec.output) / (t_end - t0), 2) if t_end > t0 else 0.0,
            "source": {"draft_s": st["draft_s"], "verify_s": st["verify_s"], "wait_s": round(wait_s, 4)},
            "hops": hops.summary(wall),
        })
        if trace is not None:
            stats["trace"] = trace
        self.metrics["requests"] += 1
        self.metrics["tokens"] += len(spec.output)
        self.metrics["decode_s"] += decode_s
        self.metrics["verifications"] += st["verifications"]
        self.last_stats = stats
        yield {"type": "done", "token_ids": list(spec.output), "text": final, "finish_reason": finish,
               "stats": stats}

    async def _send_all(self, down: FrameStream, rid: int, sends: list[Send]) -> None:
        try:
            for s in sends:
                if s.commit or s.drop:
                    self._seq += 1
                    down.send_nowait(UpdateMsg(s.commit, s.drop).to_frame(rid, self._seq))
                if s.segment is not None:
                    seg = s.segment
                    self._seq += 1
                    msg = SegmentMsg(seg.node_ids, seg.parent_ids, seg.positions, tokens=seg.tokens,
                                     t_sent=time.time())
                    down.send_nowait(msg.to_frame(rid, self._seq))
            await down.drain()
        except (ConnectionError, OSError) as e:
            raise RingError(f"lost the link to {down.label}: {e}") from None

    # ------------------------------------------------------------------ clients
    @property
    def queued(self) -> int:
        """Requests waiting for the ring or being tokenized (what api.queue_size bounds)."""
        return self.waiting + self.preparing

    def status(self) -> dict[str, Any]:
        return {"formed": self.ready.is_set(), "error": self.error, "ring": self.ring,
                "cluster": self.topo.cluster, "model": self.model_name, "source": self.name,
                "busy": self._lock.locked(), "waiting": self.queued}

    async def _serve_client(self, s: FrameStream, hello: dict[str, Any]) -> None:
        """Binary-protocol clients (`flowspec generate --topology`, `flowspec up`)."""
        pending: asyncio.Task[Frame] | None = None  # a read a request left running: the next frame
        try:
            while True:
                if pending is not None:
                    f, pending = await pending, None
                else:
                    f = await s.recv(timeout=3600)
                if f.type == FrameType.STATUS:
                    await s.send(Frame(FrameType.STATUS, f.request_id, meta=self.status()))
                elif f.type == FrameType.REQUEST:
                    pending = await self._client_request(s, f)
                elif f.type == FrameType.PROBE:
                    await self._client_probe(s, f)
                elif f.type == FrameType.HEARTBEAT:
                    continue
                else:
                    raise ProtocolError(f"unexpected {f.type.name} frame from a client")
        except (ProtocolError, PeerGone) as e:
            log.info("%s: client %s left: %s", self.name, s.peer, e)
        finally:
            if pending is not None and not pending.done():
                pending.cancel()

    async def _client_probe(self, s: FrameStream, f: Frame) -> None:
        """A profiler probe from a client (see probes.py): runs with the ring to itself."""
        try:
            if not self.ready.is_set():
                raise RingError(self.error or "the ring is not formed yet; start every node of the topology")
            async with self._lock:
                res = await self.probes.run(f.meta, self.links.downstream, self.links.succ.name)
            answer = Frame(FrameType.PROBE, f.request_id, meta=res)
        except FlowSpecError as e:
            answer = Frame(FrameType.ERROR, f.request_id, meta={"message": str(e)})
        try:
            await s.send(answer)
        except (ConnectionError, OSError) as e:
            log.info("%s: profiling client %s left: %s", self.name, s.peer, e)

    async def _client_request(self, s: FrameStream, f: Frame) -> "asyncio.Task[Frame] | None":
        """Serve one request; return the read of the client's next frame when one is running.

        That read is never cancelled: a frame the client sent right after DONE (its next
        request) may already be in it, and cancelling a read can lose a frame or half of one."""
        try:
            req = await self.prepare(f.meta)
        except FlowSpecError as e:
            await s.send(Frame(FrameType.ERROR, f.request_id, meta={"message": f"bad request: {e}"}))
            return None

        async def produce() -> None:
            async for ev in self.generate(req):
                if ev["type"] == "tokens":
                    await s.send(Frame(FrameType.TOKENS, f.request_id, meta={"ids": ev["ids"], "text": ev["text"]}))
                else:
                    await s.send(Frame(FrameType.DONE, f.request_id, meta=ev))

        task = asyncio.create_task(produce())
        reader: asyncio.Task[Frame] | None = asyncio.create_task(s.recv(timeout=3600))
        try:
            while True:
                assert reader is not None
                done, _ = await asyncio.wait({task, reader}, return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    exc = task.exception()
                    if exc is not None:
                        msg = str(exc) if isinstance(exc, FlowSpecError) else f"internal error: {exc!r}"
                        if not isinstance(exc, FlowSpecError):
                            log.exception("%s: request failed", self.name, exc_info=exc)
                        err: dict[str, Any] = {"message": msg}
                        if isinstance(exc, RingError) and exc.partial:
                            err["partial"] = exc.partial  # what was produced before the failure
                        await s.send(Frame(FrameType.ERROR, f.request_id, meta=err))
                    pending, reader = reader, None
                    return pending  # the caller goes on with this read
                g = reader.result()  # raises PeerGone when the client left: the request is cancelled
                reader = None
                if g.type == FrameType.CANCEL:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    await s.send(Frame(FrameType.ERROR, f.request_id, meta={"message": "cancelled"}))
                    return None
                if g.type == FrameType.STATUS:  # answered during a request too
                    await s.send(Frame(FrameType.STATUS, g.request_id, meta=self.status()))
                reader = asyncio.create_task(s.recv(timeout=3600))
        finally:
            for t in (task, reader):
                if t is not None and not t.done():
                    t.cancel()
            await asyncio.gather(task, *([reader] if reader is not None else []), return_exceptions=True)


TRACE_MAX_SEGMENTS = 800  # segments a traced request records at most (DONE metadata stays < 1 MiB)


def _live_stats(spec: Speculator, hops: HopStats, decode_s: float, wall_s: float) -> dict[str, Any]:
    """Running statistics of a request, sent along with each tokens event."""
    st = spec.result_stats()
    n = len(spec.output)
    return {"new_tokens": n, "tokens_per_s": round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else 0.0,
            "mean_accepted": st["mean_accepted"], "verifications": st["verifications"],
            "drafted": st["drafted"], "verified": st["verified"], "pruned": st["pruned"],
            "hops": hops.summary(wall_s)}
