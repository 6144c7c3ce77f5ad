"""Prometheus metrics of the HTTP API (``GET /metrics``), with ``prometheus_client``.

Each app has its own registry (never the library's global one), so that two APIs in one
process, as in tests, count apart. Names follow vLLM's where a dashboard may already know
them (``time_to_first_token_seconds``, ``e2e_request_latency_seconds``,
``request_queue_time_seconds``, ``prompt_tokens_total``, ``generation_tokens_total``,
``request_success_total``, ``num_requests_running``/``waiting`` and the speculative
decoding counters ``spec_decode_num_drafts_total``, ``..._num_draft_tokens_total``,
``..._num_accepted_tokens_total``), under the prefix ``flowspec_``.

What a request reports is counted when it ends (:class:`RequestWatch`); what the source
node owns (the ring's state, requests active and waiting, holds, lm_head passes) is read
when /metrics is scraped, so it covers every client, binary ones too. Nothing here
describes only the last request.

Speculative decoding, mapped onto vLLM's counters so that its dashboards' formulas hold:

* a *draft* is one draft-and-verify round (``Stats.rounds``: each ends with a token the
  drafter did not propose), so ``1 + accepted / drafts`` is the mean acceptance length (tau);
* *draft tokens* are the drafted tree nodes sent through the target (``Stats.verified``),
  so ``accepted / draft_tokens`` is the share of verified drafts accepted (a tree verifies
  siblings of which at most one is accepted, so it is lower than a chain's);
* *accepted tokens* are the drafted nodes accepted (``Stats.accepted_drafts``); per
  position, as vLLM's ``..._num_accepted_tokens_per_pos``, by their depth in their round
  (``Stats.depth_accepted``); ``..._round_ends_total{reason}`` says why rounds ended.

A request that the ring never drafted for (strategy ``autoregressive``) adds no drafts.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterable, TypeVar

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .runtime.decode import DoneEvent

if TYPE_CHECKING:
    from .runtime.source_node import SourceNode

log = logging.getLogger(__name__)

# Buckets for edge devices: a prompt on a ring of slow boards can take tens of seconds to
# prefill, a token anything from 10 ms (a fast LAN ring) to seconds (a long, slow one).
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0,
                120.0)
TPOT_BUCKETS = (0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0,
               300.0, 600.0)
QUEUE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

E = TypeVar("E")


class ApiMetrics:
    """The metrics of one API app, in a registry of its own."""

    def __init__(self, node: "SourceNode", model_id: str, strategy: str) -> None:
        self.registry = r = CollectorRegistry()
        Info("flowspec_build", "what serves: FlowSpec version, model id and default strategy",
             registry=r).info({"version": __version__, "model": model_id, "strategy": strategy})
        r.register(_NodeCollector(node))
        self.ttft = Histogram("flowspec_time_to_first_token_seconds",
                              "seconds from a request's arrival to its first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("flowspec_time_per_output_token_seconds",
                              "seconds per generated token after the first, per request",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("flowspec_e2e_request_latency_seconds",
                             "seconds from a request's arrival to its last token", buckets=E2E_BUCKETS, registry=r)
        self.queue = Histogram("flowspec_request_queue_time_seconds",
                               "seconds from a request's arrival until it decodes: tokenizing and waiting for "
                               "a place on the ring (decoding.max_active); resumed requests are left out",
                               buckets=QUEUE_BUCKETS, registry=r)
        self.requests = Counter("flowspec_requests", "generation requests handed to the ring, by outcome "
                                "(ok, error, cancelled: the client left)", ["outcome"], registry=r)
        self.success = Counter("flowspec_request_success", "requests that ended with an answer, by finish reason",
                               ["finished_reason"], registry=r)
        self.resumed = Counter("flowspec_requests_resumed", "times a request that ended had resumed after the "
                               "ring broke under it", registry=r)
        self.prompt_tokens = Counter("flowspec_prompt_tokens", "prompt tokens of requests handed to the ring",
                                     registry=r)
        self.generation_tokens = Counter("flowspec_generation_tokens", "tokens generated for requests that ended "
                                         "with an answer", registry=r)
        self.decode_s = Counter("flowspec_decode_seconds", "seconds decoding (first token to last) of requests "
                                "that ended with an answer", registry=r)
        spec = "flowspec_spec_decode_"
        self.drafts = Counter(spec + "num_drafts", "draft-and-verify rounds (1 + accepted / drafts = tau)",
                              registry=r)
        self.draft_tokens = Counter(spec + "num_draft_tokens", "drafted tokens verified by the target", registry=r)
        self.accepted = Counter(spec + "num_accepted_tokens", "drafted tokens accepted", registry=r)
        self.proposed = Counter(spec + "num_proposed_tokens", "tokens the drafter proposed and the tree kept "
                                "(verified or not)", registry=r)
        self.verifications = Counter(spec + "num_verifications", "returned segments that advanced the accepted "
                                     "path", registry=r)
        self.accepted_per_pos = Counter(spec + "num_accepted_tokens_per_pos", "drafted tokens accepted, by their "
                                        "depth in their round (position 0: the round's first draft; the last "
                                        "position gathers the deeper ones)", ["position"], registry=r)
        self.round_ends = Counter(spec + "round_ends", "draft-and-verify rounds that ended because the drafted "
                                  "children missed the target's token (missed) or because the token had no "
                                  "drafted children yet (undrafted)", ["reason"], registry=r)
        self.stage_compute = Counter("flowspec_stage_compute_seconds", "seconds each stage computed segments",
                                     ["stage"], registry=r)
        self.stage_queue = Counter("flowspec_stage_queue_seconds", "seconds segments waited for each stage's "
                                   "worker", ["stage"], registry=r)
        self.stage_segments = Counter("flowspec_stage_segments", "segments each stage computed", ["stage"],
                                      registry=r)
        self.link_bytes = Counter("flowspec_link_bytes", "payload bytes sent on each link (from->to)", ["link"],
                                  registry=r)
        self.link_wire = Counter("flowspec_link_wire_seconds", "seconds segments spent on each link's wire",
                                 ["link"], registry=r)
        self.trips = Counter("flowspec_ring_trips", "segments that came back around the ring", registry=r)
        self.trip_s = Counter("flowspec_ring_trip_seconds", "seconds of those round trips", registry=r)
        self.http = Counter("flowspec_http_responses", "HTTP responses by endpoint and status (499: the client "
                            "left before the answer)", ["endpoint", "code"], registry=r)

    def http_response(self, endpoint: str, status: int) -> None:
        self.http.labels(endpoint, str(status)).inc()

    def watch(self, t_arrival: float, prompt_tokens: int) -> "RequestWatch":
        """A request handed to the ring now, that arrived at ``t_arrival`` (time.perf_counter())."""
        return RequestWatch(self, t_arrival, prompt_tokens)

    def exposition(self) -> tuple[bytes, str]:
        """The body of GET /metrics and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestWatch:
    """One generation request, from its arrival to its outcome (counted once)."""

    def __init__(self, m: ApiMetrics, t_arrival: float, prompt_tokens: int) -> None:
        self.m, self.t_arrival = m, t_arrival
        self.t_first: float | None = None
        self.outcome: str | None = None
        m.prompt_tokens.inc(prompt_tokens)

    async def observe(self, events: AsyncIterator[E]) -> AsyncIterator[E]:
        """The request's events, unchanged; its first token, its end and how it ended are
        counted on the way. Closing this closes ``events`` (which frees the ring)."""
        async with contextlib.aclosing(events):  # type: ignore[type-var]
            try:
                async for ev in events:
                    if isinstance(ev, DoneEvent):
                        self.done(ev)
                    else:
                        self.first_token()
                    yield ev
            except GeneratorExit:  # closed before its end: the client left
                self._end("cancelled")
                raise
            except BaseException as e:
                self._end("error" if isinstance(e, Exception) else "cancelled")
                raise
            finally:
                self._end("error")  # the events ended without an answer

    def first_token(self) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()
            self.m.ttft.observe(self.t_first - self.t_arrival)

    def done(self, ev: DoneEvent) -> None:
        """The request's answer: its tokens, timings and what its statistics report."""
        if self.outcome is not None:
            return
        m, st, n = self.m, ev.stats, len(ev.token_ids)
        if n:
            self.first_token()
        now = time.perf_counter()
        self._end("ok")
        m.success.labels(ev.finish_reason).inc()
        m.generation_tokens.inc(n)
        m.e2e.observe(now - self.t_arrival)
        if n > 1 and self.t_first is not None:
            m.tpot.observe((now - self.t_first) / (n - 1))
        resumed = int(st.get("resumed") or 0)
        m.resumed.inc(resumed)
        if not resumed and "total_s" in st:  # the decode loop's own span, after admission
            m.queue.observe(max(0.0, now - self.t_arrival - float(st["total_s"])))
        m.decode_s.inc(max(0.0, float(st.get("decode_s") or 0.0)))
        verified = int(st.get("verified") or 0)
        if verified:
            m.drafts.inc(int(st.get("rounds") or 0))
        m.draft_tokens.inc(verified)
        m.accepted.inc(int(st.get("accepted_drafts") or 0))
        m.proposed.inc(int(st.get("drafted") or 0))
        m.verifications.inc(int(st.get("verifications") or 0))
        if verified:
            for pos, n in enumerate(st.get("depth_accepted") or []):
                if n:
                    m.accepted_per_pos.labels(str(pos)).inc(int(n))
            m.round_ends.labels("missed").inc(int(st.get("ends_missed") or 0))
            m.round_ends.labels("undrafted").inc(int(st.get("ends_undrafted") or 0))
        self._hops(st.get("hops") or {})

    def _hops(self, hops: dict[str, Any]) -> None:
        """Counters from the request's hop summary (telemetry.HopStats.summary)."""
        m = self.m
        for name, s in (hops.get("stages") or {}).items():
            m.stage_compute.labels(name).inc(max(0.0, float(s.get("compute_s") or 0.0)))
            m.stage_queue.labels(name).inc(max(0.0, float(s.get("queue_s") or 0.0)))
            m.stage_segments.labels(name).inc(int(s.get("segments") or 0))
        for link, s in (hops.get("links") or {}).items():
            m.link_bytes.labels(link).inc(int(s.get("bytes") or 0))
            m.link_wire.labels(link).inc(max(0.0, float(s.get("wire_s") or 0.0)))
        trips = int(hops.get("trips") or 0)
        m.trips.inc(trips)
        m.trip_s.inc(trips * max(0.0, float(hops.get("mean_trip_ms") or 0.0)) / 1000)

    def _end(self, outcome: str) -> None:
        if self.outcome is None:
            self.outcome = outcome
            self.m.requests.labels(outcome).inc()


class _NodeCollector(Collector):
    """What the source node owns, read at each scrape."""

    def __init__(self, node: "SourceNode") -> None:
        self.node = node

    def describe(self) -> Iterable[Metric]:
        return self.collect()

    def collect(self) -> Iterable[Metric]:
        node = self.node
        yield GaugeMetricFamily("flowspec_ring_formed", "1 when the ring is formed and verified",
                                value=float(node.ready.is_set()))
        yield GaugeMetricFamily("flowspec_num_requests_running", "requests decoding on the ring now",
                                value=node.active)
        yield GaugeMetricFamily("flowspec_num_requests_waiting", "requests waiting for a place on the ring "
                                "(or being tokenized)", value=node.queued)
        yield CounterMetricFamily("flowspec_requests_held", "times a request was held while the ring was "
                                  "broken, to resume", value=node.metrics["held"])
        sc = node.scorer.stats
        yield CounterMetricFamily("flowspec_lm_head_passes", "lm_head passes at the source (returned segments "
                                  "share them)", value=sc.passes)
        yield CounterMetricFamily("flowspec_lm_head_segments", "returned segments scored in those passes",
                                  value=sc.results)
        dr = node.drafting.stats
        yield CounterMetricFamily("flowspec_draft_calls", "drafter calls at the source (one per request and tree "
                                  "level)", value=dr.calls)
        yield CounterMetricFamily("flowspec_draft_calls_shared", "drafter calls served in one pass with another "
                                  "request's", value=dr.shared_calls)
        yield CounterMetricFamily("flowspec_draft_passes", "drafter passes run at the source (requests that "
                                  "draft at once share them)", value=dr.passes.run)
        yield CounterMetricFamily("flowspec_draft_passes_saved", "drafter passes that drafting each request "
                                  "alone would have run on top", value=dr.passes_saved)
