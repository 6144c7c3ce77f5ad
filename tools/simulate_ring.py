#!/usr/bin/env python3
"""A ring of slow devices in virtual time: what a strategy would reach, without the noise.

The real algorithm runs (the ``Speculator`` of each strategy, the real drafter, the real
target split into the topology's stages, real tokens), but time is simulated: each stage
is a FIFO server whose pass over the waiting segments costs what this machine measured
for that many rows, slowed down by the topology's CPU cap; each link adds its latency and
serialisation time; the source is one compute thread whose verify and draft steps cost
their measured CPU time, slowed down the same way, and it answers a returning segment
first and drafts afterwards, as the source node does. The result is deterministic for a
given cost table (the table itself is measured once per run), so scheduling changes can be
compared at a precision the emulated testbed (about +-5% a run) cannot give. It predicts;
`flowspec bench` on the testbed measures.

    python tools/simulate_ring.py --topology topologies/edge-5.yaml --limit 3 \\
        --strategies autoregressive,flowspec,flowspec:segment=16
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import logging
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from flowspec.bench.output import rounds_lines  # noqa: E402
from flowspec.bench.prompts import MTBENCH, load_prompts, split_variant  # noqa: E402
from flowspec.bench.summary import rounds_profile  # noqa: E402
from flowspec.config import Topology  # noqa: E402
from flowspec.model.config import ModelConfig  # noqa: E402
from flowspec.model.dtypes import dtype_name, parse_dtype  # noqa: E402
from flowspec.model.loader import resolve_model  # noqa: E402
from flowspec.model.stage import LMHead, Segment, Stage  # noqa: E402
from flowspec.model.tokenizer import Tokenizer  # noqa: E402
from flowspec.speculative.drafters import eagle, make_drafter  # noqa: E402
from flowspec.speculative.drafters.base import PassCount  # noqa: E402
from flowspec.speculative.strategies import Send, Speculator  # noqa: E402
from flowspec.speculative.tuning import RingCosts, tune  # noqa: E402

log = logging.getLogger("simulate_ring")

SIZES = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)  # rows at which a stage's pass is timed


@dataclass
class Costs:
    """What time things take in the simulated ring (milliseconds)."""

    stage_table: list[list[tuple[int, float]]]  # per stage: (rows, ms at full speed), by rows
    slow: list[float]  # per node, source first: how many times slower than this machine (1 / cpu quota x inflation)
    link_ms: float  # one-way latency of every link, plus the proxy's own delay
    link_mbit: float | None  # bandwidth of every link (None: unlimited)
    row_bytes: int  # bytes a row of activations takes on a stage-to-stage hop

    def stage_ms(self, j: int, rows: int) -> float:
        """A pass of `rows` rows on stage j (linear between the timed sizes)."""
        table = self.stage_table[j]
        if rows <= table[0][0]:
            return table[0][1] * self.slow[j + 1]
        for (r0, m0), (r1, m1) in zip(table, table[1:]):
            if rows <= r1:
                return (m0 + (m1 - m0) * (rows - r0) / (r1 - r0)) * self.slow[j + 1]
        (r0, m0), (r1, m1) = table[-2], table[-1]
        return (m1 + (m1 - m0) * (rows - r1) / (r1 - r0)) * self.slow[j + 1]

    def wire_ms(self, rows: int, first_hop: bool) -> float:
        size = (24 * rows + 64) if first_hop else rows * (self.row_bytes + 24) + 64
        return self.link_ms + (size * 8 / (self.link_mbit * 1000) if self.link_mbit else 0.0)


def time_stages(stages: list[Stage], reps: int, context: int = 256) -> list[list[tuple[int, float]]]:
    """Least thread-CPU milliseconds of a pass of each size on each stage, its KV cache
    holding `context` committed tokens (thread time: what other processes do does not count)."""
    tables = []
    for st in stages:
        st.reset()
        ids = list(range(context))
        inp = ({"tokens": torch.randint(0, st.cfg.vocab_size, (context,))} if st.first
               else {"hidden": torch.randn(context, st.cfg.hidden_size).to(st.dtype)})
        st(Segment(ids, [-1] + ids[:-1], ids, **inp))
        st.apply_update(ids, [])
        nxt, table = context, []
        for n in (SIZES[0],) + SIZES:  # the first size twice: a warm-up
            times = []
            for _ in range(reps):
                seg_ids = list(range(nxt, nxt + n))
                nxt += n
                inp = ({"tokens": torch.randint(0, st.cfg.vocab_size, (n,))} if st.first
                       else {"hidden": torch.randn(n, st.cfg.hidden_size).to(st.dtype)})
                t0 = time.thread_time()
                st(Segment(seg_ids, [context - 1] + seg_ids[:-1], list(range(context, context + n)), **inp))
                times.append(1000 * (time.thread_time() - t0))
                st.apply_update([], [seg_ids[0]])
            table.append((n, min(times)))
        table = table[1:]
        for i in range(1, len(table)):  # a larger pass never costs less (noise of a shared machine)
            table[i] = (table[i][0], max(table[i][1], table[i - 1][1]))
        tables.append(table)
        st.reset()
    return tables


def _interp(table: list[tuple[int, float]], rows: int) -> float:
    if rows <= table[0][0]:
        return table[0][1]
    for (r0, m0), (r1, m1) in zip(table, table[1:]):
        if rows <= r1:
            return m0 + (m1 - m0) * (rows - r0) / (r1 - r0)
    (r0, m0), (r1, m1) = table[-2], table[-1]
    return m1 + (m1 - m0) * (rows - r1) / (r1 - r0)


def time_calls(fn: Callable[[int], Any], sizes: tuple[int, ...], reps: int) -> list[tuple[int, float]]:
    """Least thread-CPU milliseconds of fn(rows) per size, made non-decreasing."""
    table = []
    for n in (sizes[0],) + sizes:
        times = []
        for _ in range(reps):
            c0 = time.thread_time()
            fn(n)
            times.append(1000 * (time.thread_time() - c0))
        table.append((n, min(times)))
    table = table[1:]
    for i in range(1, len(table)):
        table[i] = (table[i][0], max(table[i][1], table[i - 1][1]))
    return table


class SourceMeter:
    """The source's work in a step: its heavy calls (the target's lm_head, the drafter's head
    passes) at the cost table's price, the Python around them at its measured thread time."""

    def __init__(self, tables: dict[str, list[tuple[int, float]]]) -> None:
        self.tables = tables
        self.modeled = 0.0  # ms, by the table
        self.inside = 0.0  # ms of thread time spent in those calls (replaced by the table)

    def wrap(self, kind: str, fn: Callable[..., Any], rows: Callable[..., int]) -> Callable[..., Any]:
        def call(*a: Any, **k: Any) -> Any:
            c0 = time.thread_time()
            out = fn(*a, **k)
            self.inside += 1000 * (time.thread_time() - c0)
            self.modeled += _interp(self.tables[kind], rows(*a, **k))
            return out
        return call

    def step(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """fn's result and its cost in ms at full speed."""
        self.modeled = self.inside = 0.0
        c0 = time.thread_time()
        out = fn()
        total = 1000 * (time.thread_time() - c0)
        return out, self.modeled + max(0.0, total - self.inside)


def time_source(head: LMHead, drafter: Any, hidden: int, reps: int) -> dict[str, list[tuple[int, float]]]:
    """Cost tables of the source's heavy calls."""
    tables = {"lm_head": time_calls(lambda n: head(torch.randn(n, hidden)), SIZES, reps)}
    eh = getattr(drafter, "head", None)
    if eh is not None and hasattr(eh, "logits"):
        tables["draft_logits"] = time_calls(lambda n: eh.logits(torch.randn(n, hidden)), SIZES[:8], reps)

        def run(n: int) -> None:
            drafter.begin([])
            ids = [2 * i for i in range(n)]
            rows = eagle._Rows(ids, [-1] + ids[:-1], list(range(n)), [5] * n, [torch.randn(hidden)] * n)
            eagle._run_together(eh, [(drafter, rows)], PassCount())
        tables["draft_run"] = time_calls(run, SIZES, reps)
        drafter.begin([])
    return tables


@dataclass(order=True)
class _Event:
    t: float
    seq: int
    kind: str = field(compare=False)  # "arrive" (a segment at stage j / at the source) | "free" (stage j done)
    j: int = field(compare=False)
    item: Any = field(compare=False, default=None)


class RingSim:
    """One request through the ring in virtual time."""

    def __init__(self, spec: Speculator, stages: list[Stage], costs: Costs) -> None:
        self.spec, self.stages, self.costs = spec, stages, costs
        self.events: list[_Event] = []
        self.seq = 0
        self.queues: list[deque] = [deque() for _ in stages]  # segments waiting at each stage
        self.busy_until = [0.0] * len(stages)
        self.busy_ms = [0.0] * len(stages)
        self.link_free = [0.0] * (len(stages) + 1)  # hop i: into stage i (len: back to the source)
        self.returned: deque = deque()  # (t_back, node_ids, hidden)
        self.source_busy_ms = 0.0
        self.lookahead = False  # stages skip rows that an update queued behind them drops
        self.hint_ms = -1.0  # >= 0: stages learn of pruned ids this long after the source (an out-of-band hint)
        self.pruned_at: dict[int, float] = {}
        self.log: list[str] | None = None  # a line per source step (--timeline)
        self.turnarounds: list[float] = []
        self.trips: list[float] = []  # ms from a segment's departure to its return

    def _push(self, t: float, kind: str, j: int, item: Any = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, _Event(t, self.seq, kind, j, item))

    def _hop(self, t: float, i: int, rows: int, item: Any) -> None:
        """A segment leaves on hop i (into stage i, or back to the source when i == len(stages))."""
        c = self.costs
        start = max(t, self.link_free[i])
        wire = c.wire_ms(rows, i == 0)
        self.link_free[i] = start + (wire - c.link_ms)  # serialisation occupies the link, latency does not
        self._push(start + wire, "arrive", i, item)

    def _send(self, t: float, sends: list[Send]) -> None:
        """Run the sends through the real stages now (same order as on the wire), deliver in virtual time."""
        for s in sends:
            if s.commit or s.drop:
                for st in self.stages:
                    st.apply_update(s.commit, s.drop)
                self._hop(t, 0, 0, {"drop": set(s.drop)})
                for n in s.drop:
                    self.pruned_at.setdefault(n, t)
            if s.segment is not None:
                seg, rows_at = s.segment, []
                out = None
                for st in self.stages:
                    out = st(seg if out is None else out.as_segment())
                    rows_at.append(len(out.node_ids))
                assert out is not None
                self._hop(t, 0, len(seg.node_ids), {"ids": out.node_ids, "hidden": out.hidden, "rows": rows_at,
                                                     "live": set(seg.node_ids), "t_sent": t})

    def _stage_start(self, j: int, t: float) -> None:
        q = self.queues[j]
        if self.busy_until[j] > t:
            return
        while q and "drop" in q[0]:  # an update: applied and passed on at once
            self._hop(t, j + 1, 0, q.popleft())
        if not q:
            return
        if self.hint_ms >= 0:  # every stage told of each drop hint_ms after the source decided it
            for it in q:
                if "live" in it:
                    it["live"] = {n for n in it["live"] if self.pruned_at.get(n, 1e18) > t - self.hint_ms}
        if self.lookahead:  # the drops of updates already queued behind: those rows are skipped
            gone = set().union(*(it["drop"] for it in q if "drop" in it))
            for it in q:
                if "live" in it:
                    it["live"] -= gone
        batch, rows = [], 0
        while q and "live" in q[0] and (not batch or rows + self._rows(q[0], j) <= 256):
            it = q.popleft()
            batch.append(it)
            rows += self._rows(it, j)
        cost = self.costs.stage_ms(j, rows) if rows else 0.0
        self.busy_until[j] = t + cost
        self.busy_ms[j] += cost
        self._push(t + cost, "free", j, batch)

    @staticmethod
    def _rows(it: dict[str, Any], j: int) -> int:
        return min(it["rows"][j], len(it["live"]))

    def _advance(self, until: Callable[[], bool]) -> None:
        """Deliver events in time order until `until()` holds."""
        while not until():
            if not self.events:
                raise RuntimeError(f"{self.spec.strategy}: nothing in flight and nothing returned")
            ev = heapq.heappop(self.events)
            if ev.kind == "arrive" and ev.j == len(self.stages):
                if "live" in ev.item:
                    self.returned.append((ev.t, ev.item))
            elif ev.kind == "arrive":
                self.queues[ev.j].append(ev.item)
                self._stage_start(ev.j, ev.t)
            else:  # a stage finished a pass
                for it in ev.item:
                    self._hop(ev.t, ev.j + 1, self._rows(it, ev.j), it)
                self._stage_start(ev.j, ev.t)

    def run(self, src_slow: float, meter: SourceMeter) -> dict[str, Any]:
        """Decode the request; the source's steps cost what the meter says, times src_slow."""
        spec = self.spec
        spec.head = meter.wrap("lm_head", spec.head, lambda h: h.shape[0])
        d = spec.drafter
        if "draft_run" in meter.tables and isinstance(d, eagle.EagleDrafter):
            # the head's layer and logits passes, metered for this run only (the head is shared)
            run_together, logits = eagle._run_together, d.head.logits
            eagle._run_together = meter.wrap("draft_run", run_together,  # type: ignore[assignment]
                                             lambda head, work, count: sum(len(r.hids) for _, r in work))
            d.head.logits = meter.wrap("draft_logits", logits,  # type: ignore[method-assign]
                                       lambda pred, *a, **k: pred.shape[0])
            try:
                return self._run(src_slow, meter)
            finally:
                eagle._run_together = run_together  # type: ignore[assignment]
                del d.head.logits  # the class's method again
        return self._run(src_slow, meter)

    def _run(self, src_slow: float, meter: SourceMeter) -> dict[str, Any]:
        spec = self.spec

        def timed(fn: Callable[[], list[Send]]) -> tuple[list[Send], float]:
            out, ms = meter.step(fn)
            return out, ms * src_slow

        sends, t_src = timed(spec.start)
        self._send(0.0, sends)
        t_first: float | None = None
        n_first = 0
        while not spec.done:
            # the source is free at t_src: it takes every result back by then, or waits for the next
            self._advance(lambda: bool(self.returned) and not (self.events and self.events[0].t
                                                               <= max(t_src, self.returned[0][0])))
            t = max(t_src, self.returned[0][0])
            batch = []
            while self.returned and self.returned[0][0] <= t:
                t_back, it = self.returned.popleft()
                self.trips.append(t_back - it["t_sent"])
                batch.append(it)
            n0, r0 = len(spec.output), spec.stats.rounds
            sends, c = timed(lambda: [s for it in batch for s in spec.respond(it["ids"], it["hidden"])])
            if self.log is not None:
                self.log.append(f"{t:8.1f} back {[len(it['ids']) for it in batch]} trips "
                                f"{[round(t - it['t_sent']) for it in batch]} +{len(spec.output) - n0} tok"
                                f"{' MISS' if spec.stats.rounds > r0 else ''}; respond {c:.1f} ms, sends "
                                f"{[len(x.segment.node_ids) for x in sends if x.segment is not None]}")
            self.turnarounds.append(c)
            t_ready = t
            t += c
            self._send(t, sends)
            if t_first is None and spec.output:
                t_first, n_first = t, len(spec.output)
            while True:  # think in steps while no result waits (a step may draft without sending)
                drafted = spec.stats.drafted
                more, c = timed(spec.think)
                t += c
                if self.log is not None:
                    self.log.append(f"{t:8.1f}   think {c:.1f} ms, sends "
                                    f"{[len(x.segment.node_ids) for x in more if x.segment is not None]}")
                self._send(t, more)
                if spec.done or (not more and spec.stats.drafted == drafted):
                    break
                self._advance(lambda: not (self.events and self.events[0].t <= t))
                if self.returned and self.returned[0][0] <= t:
                    break
            self.source_busy_ms += t - t_ready
            t_src = t
        n = len(spec.output)
        decode_ms = t_src - (t_first or t_src)
        return {"new_tokens": n - n_first, "decode_ms": decode_ms,
                "tokens_per_s": (n - n_first) / decode_ms * 1000 if decode_ms > 0 else 0.0,
                "stage_busy": [b / t_src for b in self.busy_ms], "source_busy": self.source_busy_ms / t_src,
                "turnaround_ms": statistics.median(self.turnarounds) if self.turnarounds else 0.0,
                "trips_ms": self.trips,
                "stats": spec.result_stats(), "token_ids": list(spec.output)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--topology", default="topologies/edge-5.yaml", help="the ring to simulate (its testbed "
                    "section gives the CPU caps and links)")
    ap.add_argument("--prompts", default=MTBENCH, help="mt-bench or a JSONL file")
    ap.add_argument("--limit", type=int, default=3, help="prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--strategies", default="autoregressive,flowspec", help="as in flowspec bench, variants too")
    ap.add_argument("--inflation", type=float, default=1.3,
                    help="how much slower than 1/cpu_quota a capped node runs (cold caches after throttling)")
    ap.add_argument("--proxy-ms", type=float, default=1.0, help="per-hop delay of the link emulation itself")
    ap.add_argument("--reps", type=int, default=5, help="timed passes per size for the cost table")
    ap.add_argument("--costs", help="a cost table JSON: read it if it exists, else measure and write it "
                    "(runs that share one table compare exactly)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--timeline", help="write the source's steps of every request here")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    topo = Topology.load(args.topology)
    folder = resolve_model(topo.model.target)
    cfg = ModelConfig.from_file(str(folder / "config.json"))
    dtype = dtype_name(topo.model.dtype)
    split = topo.resolve_layers(cfg.num_layers)
    stages = [Stage.load(folder, a, b, dtype=dtype, max_context=topo.model.max_context, cfg=cfg)
              for a, b in split.values()]
    head = LMHead.load(folder, dtype=dtype, cfg=cfg)
    tok = Tokenizer(folder)
    d = topo.model.drafter
    nodes = [topo.source.name] + [s.name for s in topo.stages]
    tb = topo.testbed
    quota = [topo.cpu_quota(n) or 1.0 for n in nodes] if tb is not None else [1.0] * len(nodes)
    link = tb.link if tb is not None else None
    t0 = time.time()
    probe = make_drafter(d.kind, d.path, cfg.vocab_size, topo.model.dtype, topo.model.max_context,
                         target_folder=folder)
    if args.costs and Path(args.costs).is_file():
        saved = json.loads(Path(args.costs).read_text())
        table = [[tuple(x) for x in t] for t in saved["stages"]]
        src_tables = {k: [tuple(x) for x in t] for k, t in saved["source"].items()}
    else:
        table = time_stages(stages, args.reps)
        src_tables = time_source(head, probe, cfg.hidden_size, args.reps)
        if args.costs:
            Path(args.costs).write_text(json.dumps({"stages": table, "source": src_tables}))
    costs = Costs(table, [args.inflation / q for q in quota],
                  (link.latency_ms if link else 0.0) + args.proxy_ms,
                  link.bandwidth_mbit if link else None, cfg.hidden_size * torch.empty((), dtype=parse_dtype(dtype)).element_size())
    log.info("cost table in %.1f s: %s", time.time() - t0, table)
    prompts = load_prompts(args.prompts, None, args.limit)
    spec_tree = topo.decoding.tree
    ring_costs = RingCosts(tuple(tuple((n, ms * costs.slow[j + 1]) for n, ms in c) for j, c in enumerate(table)),
                           costs.link_ms * (len(stages) + 1),
                           tuple((n, ms * costs.slow[0]) for n, ms in src_tables["lm_head"]))
    tuning = tune(ring_costs, spec_tree.params(), spec_tree.auto)
    base_tree = spec_tree.params(tuning.tree)
    print(f"auto settings for this cost table: {tuning.describe()}")
    labels = [s.strip() for s in args.strategies.split(",") if s.strip()]
    results: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for i, p in enumerate(prompts):  # prompt by prompt, strategies rotating (as flowspec bench does)
        for label in labels[i % len(labels):] + labels[:i % len(labels)]:
            variant, *switches = label.split("@")
            toggles = dict(sw.split("=", 1) for sw in switches)
            name, tree_over, _ = split_variant(variant)
            drafter = make_drafter(d.kind, d.path, cfg.vocab_size, topo.model.dtype, topo.model.max_context,
                                   target_folder=folder)
            for st in stages:
                st.reset()
            spec = Speculator(name, head, drafter, tok.encode_prompt(p), args.max_new_tokens, tok.eos_ids,
                              tree=dataclasses.replace(base_tree, **tree_over),
                              prefill_chunk=topo.decoding.prefill_chunk)
            sim = RingSim(spec, stages, costs)
            if args.timeline:
                sim.log = [f"== {label}, prompt {i + 1}"]
            for attr, value in toggles.items():  # experiment switches: label@attr=value
                target = next(o for o in (sim, spec.schedule, spec) if hasattr(o, attr))
                old = getattr(target, attr)
                setattr(target, attr, bool(int(value)) if isinstance(old, bool) else type(old)(value))
            results[label].append(sim.run(costs.slow[0], SourceMeter(src_tables)))
            if sim.log is not None:
                with open(args.timeline, "a") as f:
                    f.write("\n".join(sim.log) + "\n")
    ar = results.get("autoregressive")
    ar_rate = (sum(r["new_tokens"] for r in ar) / sum(r["decode_ms"] for r in ar)) if ar else None
    print(f"simulated {args.topology}: {len(prompts)} prompts x {args.max_new_tokens} tokens, "
          f"inflation {args.inflation}, links {costs.link_ms:.1f} ms")
    print(f"{'strategy':32s} {'tok/s':>6s} {'xAR':>5s} {'tau':>5s} {'acc':>5s} {'wasted/tok':>10s} "
          f"{'trip':>5s} {'round':>5s} {'src':>4s}  stage busy")
    for label, rs in results.items():
        n = sum(r["new_tokens"] for r in rs)
        ms = sum(r["decode_ms"] for r in rs)
        rate = n / ms * 1000
        st = [r["stats"] for r in rs]
        rounds = sum(s["rounds"] for s in st)
        n_all = sum(s["new_tokens"] for s in st)
        ver = sum(s["verifications"] for s in st)
        wasted = sum(s["pruned_sent"] for s in st) / n
        busy = [statistics.mean(r["stage_busy"][j] for r in rs) for j in range(len(stages))]
        x = f"{rate / (ar_rate * 1000):5.2f}" if ar_rate else "    -"
        trip = statistics.median(t for r in rs for t in r["trips_ms"])
        src = statistics.mean(r["source_busy"] for r in rs)
        print(f"{label:32s} {rate:6.2f} {x} {n_all / rounds:5.2f} {n_all / ver:5.2f} {wasted:10.2f} "
              f"{trip:5.0f} {ms / rounds:5.0f} {src:4.2f}  "
              + " ".join(f"{b:.2f}" for b in busy))
    for label, rs in results.items():
        for line in rounds_lines(label, rounds_profile([r["stats"] for r in rs])):
            print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({k: [{a: b for a, b in r.items() if a not in ("token_ids", "trips_ms")}
                                                   for r in v]
                                               for k, v in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
