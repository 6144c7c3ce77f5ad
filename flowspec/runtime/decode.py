"""The decode loop of one request at the source: a strategy driven over the ring.

Many of these run at once, one per active request, each with its own request id, result
queue, strategy state and drafter; they share the source's compute thread (drafting,
verifying and detokenizing run there one step at a time, so the event loop never waits
behind them), its lm_head passes (``scoring.SharedHead``: the segments of every request
that wait are scored together), its drafter passes (``drafting.SharedDrafter``: the trees of
every request due to grow are expanded together, one pass per level) and the link to the
first stage. A returning segment is answered first with what is already drafted ("send
first, think later"); the tree grows while the ring works.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import torch

from ..errors import RingError
from ..model.stage import LMHead
from ..model.tokenizer import Tokenizer
from ..speculative.drafters import Drafter
from ..speculative.drafters.base import Steps
from ..speculative.logprobs import TokenLogprob
from ..speculative.params import verify_here
from ..speculative.strategies import Send, Speculator
from ..telemetry import HopStats
from .drafting import SharedDrafter
from .protocol import Frame, FrameType, SegmentMsg, UpdateMsg
from .requests import GenRequest
from .scoring import SharedHead
from .text import TextStream
from .transport import FrameStream

log = logging.getLogger(__name__)

TRACE_MAX_SEGMENTS = 800  # segments a traced request records at most (DONE metadata stays < 1 MiB)
RING_FAILED = -1  # request id of a result-queue item that says the ring failed (the item is the message)


@dataclass
class TokensEvent:
    """New tokens of a running request, with their text and running statistics."""

    ids: list[int]  # token ids produced since the previous event
    text: str  # their text (held back while it could still become a stop string)
    live: dict[str, Any]  # running statistics (tokens/s, acceptance, hops)
    logprobs: list[TokenLogprob] | None = None  # one per id, when the request asked for them


@dataclass
class DoneEvent:
    """A request ended."""

    token_ids: list[int]  # every generated token
    text: str  # the final text (cut at a stop string)
    finish_reason: str  # "stop" or "length"
    stats: dict[str, Any] = field(default_factory=dict)  # the request's statistics
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked for them

    def as_dict(self) -> dict[str, Any]:
        out = {"type": "done", "token_ids": self.token_ids, "text": self.text,
               "finish_reason": self.finish_reason, "stats": self.stats}
        if self.logprobs is not None:
            out["logprobs"] = [lp.as_dict() for lp in self.logprobs]
        return out


@dataclass
class DecodeContext:
    """What a request's decode loop uses of its source node."""

    name: str  # the source's name (log lines)
    head: LMHead  # the target's lm_head
    scorer: SharedHead  # lm_head passes shared by every request's returned segments
    drafting: SharedDrafter  # drafter passes shared by every request whose tree grows
    tok: Tokenizer  # detokenizing, end-of-sequence ids
    pool: concurrent.futures.ThreadPoolExecutor  # the compute thread
    prefill_chunk: int  # prompt tokens per prefill segment
    read_timeout: float  # seconds without any result before the request fails
    downstream: Callable[[], FrameStream | None]  # the link to the first stage, now
    error: Callable[[], str | None]  # why the ring is unusable, if it is
    next_seq: Callable[[], int]  # sequence numbers of the frames the source sends


class Decoding:
    """One request on the ring: its id, its result queue and the strategy that drives it."""

    def __init__(self, ctx: DecodeContext, req: GenRequest, rid: int, drafter: Drafter,
                 prior: list[int] | None = None, prior_logprobs: list[TokenLogprob] | None = None) -> None:
        self.ctx, self.req, self.rid, self.drafter = ctx, req, rid, drafter
        # tokens this request produced (and sent) before the ring broke: decoding resumes after
        # them, with them as part of the prompt (sampling stays identical: its randomness
        # depends on the absolute position only)
        self.prior = list(prior or [])
        # the logprobs of the prior tokens, then of every token handed out (what a resumed run keeps)
        self.kept_logprobs: list[TokenLogprob] = list(prior_logprobs or [])
        self.results: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()  # (request id or RING_FAILED, item)
        self.share = 0  # segments it may have in flight (set by the scheduler; 0 = the tree's own)
        self.shared = False  # other requests share the ring now (set by the scheduler; verify: auto)
        self.spec: Speculator | None = None
        self._unchosen = False  # a segment came back without the tokens asked of the last stage

    async def run(self) -> AsyncIterator[TokensEvent | DoneEvent]:
        ctx, req = self.ctx, self.req
        down = ctx.downstream()
        if down is None:
            raise RingError(ctx.error() or "the source is not connected to the first stage")
        loop = asyncio.get_running_loop()
        prior = self.prior
        spec = await loop.run_in_executor(  # the compute thread owns the drafter: made there, like every step
            ctx.pool, lambda: Speculator(req.strategy, ctx.head, self.drafter, req.prompt_ids + prior,
                                         req.max_new_tokens - len(prior), ctx.tok.eos_ids, req.sampling, req.tree,
                                         ctx.prefill_chunk, req.logprobs))
        self.spec = spec
        self._apply_share()
        text = TextStream(ctx.tok.decode, req.stop)
        if prior:  # the text already sent (or held back) stays exactly as it was
            await loop.run_in_executor(ctx.pool, text.push, prior)
        hops = HopStats(ctx.name)
        t0 = time.perf_counter()
        wall0 = time.time()
        t_first: float | None = None
        wait_s = 0.0
        trace: dict[str, Any] | None = {"t0": wall0, "segments": [], "source": []} if req.trace else None
        emitted = 0

        def step(results: list[tuple[list[int], torch.Tensor, list[int] | None, list[Any] | None]],
                 scored: dict[int, torch.Tensor]
                 ) -> Steps[tuple[list[Send], list[int], str, list[TokenLogprob] | None]]:
            """In the compute thread: verify the returned segments in order and send what is
            drafted; the new tokens, their text and their logprobs (when asked for). Stepped:
            what it drafts is served with the other requests' (SharedHead)."""
            self._apply_share()
            sends: list[Send] = []
            for ids, hidden, targets, lps in results:
                sends += yield from spec.respond_steps(ids, hidden, scored, targets, lps)
            new = spec.output[emitted:]
            lps = spec.token_logprobs[emitted:] if req.logprobs is not None else None
            return sends, new, text.push(new) if new else "", lps

        def think() -> Steps[list[Send]]:
            self._apply_share()
            return spec.think_steps()

        try:
            await self._send(down, await loop.run_in_executor(ctx.pool, spec.start), reset=True)
            while not spec.done and not text.stopped:
                tw = time.perf_counter()
                try:
                    got_rid, item = await asyncio.wait_for(self.results.get(), ctx.read_timeout)
                except asyncio.TimeoutError:
                    raise RingError(f"no result came back around the ring for {ctx.read_timeout:.0f} s") from None
                wait_s += time.perf_counter() - tw
                items = [(got_rid, item)]
                while not self.results.empty():  # every result that came back while the source was busy
                    items.append(self.results.get_nowait())
                results: list[tuple[list[int], torch.Tensor, list[int] | None, list[Any] | None]] = []
                failed: str | None = None  # the ring broke after these results came back
                for got_rid, item in items:
                    if got_rid == RING_FAILED:
                        failed = str(item)
                        break
                    msg, t_back = item
                    hops.add(msg.hops, msg.t_sent, t_back)
                    if msg.score is not None and not self._unchosen:  # it asked the last stage, which did not
                        self._unchosen = True
                        log.warning("%s: the last stage did not choose the tokens of request %d (its topology "
                                    "lacks decoding.verify: last_stage?); the source verifies them", ctx.name,
                                    self.rid)
                    results.append((msg.node_ids, msg.hidden if msg.hidden is not None else torch.empty(0),
                                    msg.targets, msg.logprobs))
                    if trace is not None and len(trace["segments"]) < TRACE_MAX_SEGMENTS:
                        trace["segments"].append({"t_sent": msg.t_sent, "t_back": t_back,
                                                  "rows": len(msg.node_ids), "hops": msg.hops})
                if failed is not None and not results:
                    raise RingError(failed)
                ctx.drafting.make_way()  # verification first: drafting in progress waits behind it
                t_work = time.time()
                # scored with the rows of every other request waiting, in one lm_head pass
                sends, new, delta, lps = await ctx.scorer.respond(spec, results, lambda sc: step(results, sc))
                if trace is not None and len(trace["source"]) < 2 * TRACE_MAX_SEGMENTS:
                    trace["source"].append([t_work, time.time(), len(sends)])
                # once every token is known the ring is not needed any more: a link lost after the
                # last result came back does not fail the answer
                finished = spec.done or text.stopped
                if not finished:
                    if failed is not None:
                        raise RingError(failed)
                    if ctx.downstream() is not down:
                        raise RingError(ctx.error() or "the link to the first stage was lost")
                    await self._send(down, sends)
                live: dict[str, Any] | None = None
                if new:  # read the statistics before the compute thread touches spec again
                    if t_first is None:
                        t_first = time.perf_counter()
                    emitted += len(new)
                    self.kept_logprobs.extend(lps or ())
                    live = live_stats(spec, hops, time.perf_counter() - t_first, time.time() - wall0)
                # send first, think later: the tree grows while the ring works on what was sent
                # (with the trees of the other requests due to grow: one drafter pass per level)
                t_think = time.time()
                thinking = ctx.drafting.think(think)
                if live is not None:
                    yield TokensEvent(new, delta, live, lps)
                more = await thinking
                if trace is not None and len(trace["source"]) < 2 * TRACE_MAX_SEGMENTS:
                    trace["source"].append([t_think, time.time(), len(more)])  # the drafting span
                if more and not text.stopped:
                    await self._send(down, more)
        except RingError as e:
            raise RingError(str(e), {"text": text.sent, "token_ids": prior + spec.output[:emitted]}) from None
        t_end = time.perf_counter()
        output = prior + spec.output
        finish = "stop" if text.stopped or (output and output[-1] in ctx.tok.eos_ids) else "length"
        final = await loop.run_in_executor(ctx.pool, text.final_text)
        st = spec.result_stats()
        decode_s = t_end - (t_first or t_end)
        n = len(spec.output)  # of this run (the rates are this run's)
        stats: dict[str, Any] = dict(st)
        stats.update({
            "strategy": req.strategy, "prompt_tokens": len(req.prompt_ids), "tree": dataclasses.asdict(req.tree),
            "prefill_s": round((t_first or t_end) - t0, 4), "decode_s": round(decode_s, 4),
            "total_s": round(t_end - t0, 4),
            "tokens_per_s": round((n - 1) / decode_s, 2) if decode_s > 0 and n > 1 else 0.0,
            "e2e_tokens_per_s": round(n / (t_end - t0), 2) if t_end > t0 else 0.0,
            "source": {"draft_s": st["draft_s"], "verify_s": st["verify_s"], "wait_s": round(wait_s, 4)},
            "hops": hops.summary(time.time() - wall0),
        })
        if trace is not None:
            stats["trace"] = trace
        yield DoneEvent(output, final, finish, stats,
                        list(self.kept_logprobs) if req.logprobs is not None else None)

    def _apply_share(self) -> None:
        if self.spec is not None and self.share:
            self.spec.limit_in_flight(self.share, self.shared)

    async def _send(self, down: FrameStream, sends: list[Send], reset: bool = False) -> None:
        """Updates and segments onto the link to the first stage, in order (after a RESET
        that opens the request's caches on every stage, for its first sends)."""
        ctx, rid = self.ctx, self.rid
        try:
            if reset:
                down.send_nowait(Frame(FrameType.RESET, rid, ctx.next_seq()))
            for s in sends:
                if s.commit or s.drop:
                    down.send_nowait(UpdateMsg(s.commit, s.drop).to_frame(rid, ctx.next_seq()))
                if s.segment is not None:
                    seg = s.segment
                    msg = SegmentMsg(seg.node_ids, seg.parent_ids, seg.positions, tokens=seg.tokens,
                                     t_sent=time.time(), score=self._score(seg.score_from))
                    down.send_nowait(msg.to_frame(rid, ctx.next_seq()))
            await down.drain()
        except (ConnectionError, OSError) as e:
            raise RingError(f"lost the link to {down.label}: {e}") from None

    def _score(self, first: int | None) -> dict[str, Any] | None:
        """What a segment asks of the last stage when it chooses the tokens (decoding.verify;
        auto: while other requests share the ring)."""
        if first is None or verify_here(self.req.verify, self.shared) != "last_stage":
            return None
        sp = self.req.sampling
        score: dict[str, Any] = {"from": first, "t": sp.temperature, "p": sp.top_p, "k": sp.top_k, "s": sp.seed}
        if self.req.logprobs is not None:  # the last stage returns each chosen token's logprob too
            score["lp"] = self.req.logprobs
        return score

    def free(self) -> None:
        """Tell every stage that this request's caches can go (best effort: a lost link frees them anyway)."""
        down = self.ctx.downstream()
        if down is None:
            return
        try:
            down.send_nowait(Frame(FrameType.FREE, self.rid, self.ctx.next_seq()))
        except (ConnectionError, OSError):
            pass


def live_stats(spec: Speculator, hops: HopStats, decode_s: float, wall_s: float) -> dict[str, Any]:
    """Running statistics of a request, sent along with each tokens event."""
    st = spec.result_stats()
    n = len(spec.output)
    return {"new_tokens": n, "tokens_per_s": round((n - 1) / decode_s, 2) if n > 1 and decode_s > 0 else 0.0,
            "mean_accepted": st["mean_accepted"], "verifications": st["verifications"],
            "drafted": st["drafted"], "verified": st["verified"], "pruned": st["pruned"],
            "hops": hops.summary(wall_s)}
