"""The source node: ring formation, admission of requests, and the ring's edges.

Each admitted request runs its own decode loop (decode.py) with its own request id; the
results that come back around the ring are routed to it by that id. Binary clients are
served by client_desk.py."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from typing import Any, AsyncIterator

from ..config import Topology
from ..errors import ModelError, RequestError, RingError
from ..model.stage import LMHead
from ..model.tokenizer import Tokenizer
from ..speculative.drafters import Drafter
from ..speculative.logprobs import TokenLogprob
from .admission import Admission
from .client_desk import ClientDesk
from .decode import RING_FAILED, DecodeContext, Decoding, DoneEvent, TokensEvent
from .drafting import SharedDrafter
from .failover import Failover
from .formation import RingFormer
from .links import RingLinks
from .probes import ProbeDesk
from .protocol import Frame, FrameType, ProtocolError, SegmentMsg
from .seal import TamperedFrame
from .requests import GenRequest, check_request, finish_request
from .tuning import RingTuner
from .scoring import SharedHead
from .tasks import start_supervised
from .transport import FrameStream, PeerGone, hello_meta

log = logging.getLogger(__name__)

__all__ = ["GenRequest", "RequestError", "RingError", "SourceNode"]


class SourceNode:
    def __init__(self, topo: Topology, name: str, key: bytes, tokenizer: Tokenizer, head: LMHead,
                 drafter: Drafter, fingerprint: str, num_layers: int, model_name: str) -> None:
        self.topo, self.name, self.tok, self.head, self.drafter = topo, name, tokenizer, head, drafter
        self.num_layers, self.model_name = num_layers, model_name
        hello = hello_meta(topo.cluster, fingerprint, name, "source", None, stage_weights=topo.model.stage_weights)
        self.links = RingLinks(topo, name, key, hello, self._serve_upstream, self._serve_client,
                               self._from_downstream, self._peer_dead,
                               on_spare=lambda s, h: self.failover.serve_spare(s, h))
        self.ready = asyncio.Event()  # the ring is formed and verified
        self.ring: list[dict[str, Any]] = []  # what FORM collected: one entry per stage
        # spares, and a spare in the place of a stage that stays dead (failover.py)
        self.failover = Failover(topo, name, self.links, self.ready, lambda: self.ring, head.weight.numel())
        self.error: str | None = None  # why the ring is not usable, if it is not
        # FORM around the ring whenever both links are up and it is not formed (formation.py)
        self.former = RingFormer(topo, name, num_layers, self.links, self.ready, self._formed, self._form_problem)
        self.admission = Admission(topo.decoding.max_active)  # who decodes now, who waits
        self._active: dict[int, Decoding] = {}  # request id -> its decode loop
        self._idle_drafters: list[Drafter] = [drafter]  # per-request drafter state, reused
        self._request = 0
        self._seq = 0
        self.preparing = 0  # requests being tokenized
        # tokenizing, drafting, verifying and detokenizing run off the event loop, one at a time each
        self._tok_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-tokenize")
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=f"{name}-compute")
        self.metrics: dict[str, float] = {"requests": 0, "tokens": 0, "errors": 0, "decode_s": 0.0,
                                          "verifications": 0, "held": 0}
        self.last_stats: dict[str, Any] = {}
        self.probes = ProbeDesk(name, topo.security.read_timeout_s)  # profiler probes (see probes.py)
        self.drafting = SharedDrafter(self._pool)  # drafter passes shared by the requests' expansions
        self.scorer = SharedHead(head, self._pool, self.drafting.stats)
        self._ctx = DecodeContext(name, head, self.scorer, self.drafting, tokenizer, self._pool,
                                  topo.decoding.prefill_chunk, topo.security.read_timeout_s,
                                  lambda: self.links.downstream, lambda: self.error, self._next_seq)
        self._desk = ClientDesk(self)
        # the draft tree's "auto" settings, chosen for the ring once it has formed (tuning.py)
        self.tuner = RingTuner(topo, name, self.probes, head, self._pool, self.admission)
        self._tuning: asyncio.Task[None] | None = None

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    # ------------------------------------------------------------------ lifecycle
    async def run(self, stop: asyncio.Event) -> None:
        await self.links.start()
        former = start_supervised(f"{self.name}: ring formation", self.former.run, log,
                                  lambda: self.links.closing)
        try:
            await stop.wait()
        finally:
            former.cancel()
            if self._tuning is not None:
                self._tuning.cancel()
            await self.links.close()
            self._tok_pool.shutdown(wait=False, cancel_futures=True)
            self._pool.shutdown(wait=False, cancel_futures=True)

    def _formed(self, ring: list[dict[str, Any]]) -> None:
        """The ring answered FORM and can serve: requests may decode; measure it if needed."""
        self.ring = ring
        self.error = None
        self.failover.formed()
        self.ready.set()
        log.info("%s: ring formed: %s", self.name,
                 " -> ".join(f"{r['name']}[{r['layers'][0]}-{r['layers'][1] - 1}]" for r in self.ring))
        if self._tuning is None or self._tuning.done():
            self._tuning = asyncio.create_task(self.tuner.formed(self.ring, self.links.downstream,
                                                                 self.links.succ.name))

    def _form_problem(self, problem: str) -> None:
        self.error = problem

    # ------------------------------------------------------------------ failures
    async def _peer_dead(self, who: str, reason: str) -> None:
        self._fail(f"node {who!r} is unreachable: {reason}")
        self.failover.reported(who, self.name)

    def _fail(self, message: str) -> None:
        if self.links.closing:
            return
        if self.ready.is_set() or self.error != message:
            log.error("%s: %s", self.name, message)
        self.ready.clear()
        self.error = message
        self.probes.fail_all(message)  # a tuning or profiler probe holding the ring lets go
        for run in self._active.values():  # every active request loses the ring
            run.results.put_nowait((RING_FAILED, message))

    async def _from_downstream(self, f: Frame) -> None:
        if self.probes.on_reply(f):
            return
        if f.type == FrameType.ERROR:
            self._on_error(f)

    def _on_error(self, f: Frame) -> None:
        node, msg = f.meta.get("node", "?"), str(f.meta.get("message", "unknown error"))
        if f.meta.get("broken") is True:  # the ring itself broke: every request is held or fails
            self._fail(msg)
            self.failover.reported(f.meta.get("dead"), str(node))
            return
        log.warning("%s: %r reports: %s", self.name, node, msg)  # also when no request is there to fail
        targets = [self._active[f.request_id]] if f.request_id in self._active else (
            list(self._active.values()) if f.request_id == 0 else [])
        for run in targets:  # a report about one request fails only that one
            run.results.put_nowait((RING_FAILED, f"{msg} (reported by {node!r})"))

    # ------------------------------------------------------------------ results
    async def _serve_upstream(self, s: FrameStream, hello: dict[str, Any]) -> None:
        try:
            while True:
                f = await s.recv()
                if f.type == FrameType.HEARTBEAT:
                    continue
                if f.type == FrameType.SEGMENT:
                    run = self._active.get(f.request_id)
                    if run is not None:  # else: a segment of a request that ended (cancelled) meanwhile
                        run.results.put_nowait((f.request_id, (SegmentMsg.from_frame(f), time.time())))
                elif f.type == FrameType.FORM:
                    self.former.reply(f)
                elif f.type == FrameType.RING:
                    continue  # a new plan that went all the way round: every stage has it
                elif f.type == FrameType.ERROR:
                    self._on_error(f)
                elif f.type == FrameType.PROBE:
                    await self.probes.on_upstream(s, f)
                else:
                    raise ProtocolError(f"unexpected {f.type.name} frame from the last stage")
        except TamperedFrame as e:
            self._fail(f"the source closed its link from {s.label!r}: {e}")
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
            await self.tuner.idle.wait()  # the ring is being measured: its tree settings come next
        except ModelError as e:
            raise RequestError(str(e), "messages") from None
        finally:
            self.preparing -= 1
        return finish_request(self.topo, plan, ids, self.tuner.tree)

    async def generate(self, req: GenRequest) -> AsyncIterator[TokensEvent | DoneEvent]:
        """Run one request on the ring, alongside the others that are active; yields
        TokensEvent as tokens come, then one DoneEvent. Waits (first come, first served)
        while decoding.max_active requests are active.

        When the ring breaks under it (a node dies, stalls or drops a link), the request is
        held: every token it produced is kept, and once the ring is whole again (within
        decoding.resume_window_s) it resumes under a fresh request id, replaying prompt and
        output through every stage (a stage that survived may hold a cache that no longer
        matches its neighbours', so no stage's cache is trusted: replay costs one prefill),
        and the client sees every token once."""
        async with self.admission.slot():
            if not self.ready.is_set():
                raise RingError(self.error or "the ring is not formed yet; start every node of the topology")
            drafter = self._take_drafter()
            prior: list[int] = []
            prior_logprobs: list[TokenLogprob] = []  # their logprobs, when the request asked for them
            resumes = 0
            try:
                while True:
                    run = Decoding(self._ctx, req, self._new_rid(), drafter, prior, prior_logprobs)
                    self._active[run.rid] = run
                    self._rebalance()
                    try:
                        async for ev in run.run():
                            if isinstance(ev, DoneEvent):
                                ev.stats["resumed"] = resumes
                                self._count(ev)
                            yield ev
                        return
                    except RingError as e:
                        if self.ready.is_set() or self.topo.decoding.resume_window_s <= 0:
                            raise  # the request itself failed, or resuming is off
                        prior = list((e.partial or {}).get("token_ids") or prior)
                        prior_logprobs = run.kept_logprobs
                        if len(prior) >= req.max_new_tokens:
                            raise
                        await self._hold(run, e, len(prior))
                        resumes += 1
                    finally:
                        del self._active[run.rid]
                        run.free()
                        self._rebalance()
            except RingError:
                self.metrics["errors"] += 1
                raise
            finally:
                self._idle_drafters.append(drafter)

    async def _hold(self, run: Decoding, e: RingError, kept: int) -> None:
        """Wait for the ring to be whole again (or raise the error, with how to go on)."""
        window = self.topo.decoding.resume_window_s
        log.warning("%s: request %d is held with %d tokens: %s; waiting up to %g s for the ring "
                    "to be whole again", self.name, run.rid, kept, e, window)
        self.metrics["held"] += 1
        try:
            await asyncio.wait_for(self.ready.wait(), window)
        except asyncio.TimeoutError:
            raise RingError(
                f"{e}; the ring was not whole again within the resume window ({window:g} s, "
                f"decoding.resume_window_s): {self.error or 'a node is missing'}. The {kept} tokens produced "
                "so far are in this error; to go on, restart the missing node and send the conversation "
                "with the partial answer again", e.partial) from None
        log.info("%s: the ring is whole again; request %d resumes after %d tokens", self.name, run.rid, kept)
        run.free()  # the old id's caches, on the stages that kept them

    def _new_rid(self) -> int:
        """A request id no active request has (0 is the ring's own, for errors about no request)."""
        while True:
            self._request = (self._request + 1) & 0xFFFFFFFF
            if self._request and self._request not in self._active:
                return self._request

    def _take_drafter(self) -> Drafter:
        return self._idle_drafters.pop() if self._idle_drafters else self.drafter.spawn()

    def _rebalance(self) -> None:
        """Share the ring among the active requests: with k of them, each may keep about
        1/k of its tree's in_flight segments in the ring (at least one); alone, a request
        gets all of them. More speculation per request pays little once the others keep
        every stage busy, and it costs them the rows it wastes. (With verify: auto, a
        request that shares the ring has its tokens chosen at the last stage.)"""
        k = len(self._active)
        if not k:
            return
        for run in self._active.values():
            run.share = max(1, -(-run.req.tree.in_flight // k))
            run.shared = k > 1

    def _count(self, ev: DoneEvent) -> None:
        st = ev.stats
        self.metrics["requests"] += 1
        self.metrics["tokens"] += len(ev.token_ids)
        self.metrics["decode_s"] += st.get("decode_s", 0.0)
        self.metrics["verifications"] += st.get("verifications", 0)
        self.last_stats = st

    # ------------------------------------------------------------------ clients
    @property
    def queued(self) -> int:
        """Requests waiting for the ring or being tokenized (what api.queue_size bounds)."""
        return self.admission.waiting + self.preparing

    @property
    def active(self) -> int:
        """Requests decoding on the ring now."""
        return len(self._active)

    def status(self) -> dict[str, Any]:
        return {"formed": self.ready.is_set(), "error": self.error, "ring": self.ring,
                "cluster": self.topo.cluster, "model": self.model_name, "source": self.name,
                "busy": self.active > 0, "active": self.active, "max_active": self.admission.max_active,
                "waiting": self.queued, "spares": sorted(self.failover.spares), "plan": self.links.plan.as_meta(),
                "down": sorted(self.failover.reports),  # nodes reported dead since the ring broke
                "tree": self.tuner.status()}  # the draft tree requests get, chosen for this ring where "auto"

    async def _serve_client(self, s: FrameStream, hello: dict[str, Any]) -> None:
        await self._desk.serve(s, hello)
