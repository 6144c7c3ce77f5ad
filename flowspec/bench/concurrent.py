"""`flowspec bench --concurrency 1,2,4`: many requests on the ring at once.

For every strategy and every level N, all prompts are decoded with N requests in flight
at once (N client connections; each takes the next prompt when its answer is done). Per
level: aggregate tokens/s (every generated token over the phase's wall time), its ratio to
level 1 (the same ring serving the same prompts one after another; level 1 always runs, and
once more after the other levels: the ratios are to the mean of both runs, so that a machine
whose speed drifts during the bench does not bias them), each request's own
decode rate (median and the slowest relative to the median), time to first token as the
client sees it (median, p95), and how busy every stage was over the phase (the union of
its compute spans from all requests' traces: a pass that served several requests at once
counts once). At temperature 0 it also counts the answers that equal the same prompt's
answer at level 1.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any, Callable, Sequence

from ..config import Topology
from ..errors import FlowSpecError
from .options import BenchOptions
from .run import request_for
from .summary import quantile, respond_gaps, union_length

ProgressFn = Callable[[str, int], None]


def parse_levels(text: str) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4); every level an integer in 1..64."""
    try:
        levels = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise FlowSpecError(f"--concurrency {text!r}: give comma-separated integers, e.g. 1,2,4") from None
    if not levels or not all(1 <= n <= 64 for n in levels):
        raise FlowSpecError(f"--concurrency {text!r}: every level must be an integer in 1..64")
    return tuple(sorted(set(levels) | {1}))  # 1 always runs: the baseline of every ratio


async def run_levels(topo: Topology, key: bytes, opts: BenchOptions, levels: Sequence[int],
                     progress: ProgressFn = lambda what, n: None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Warm up, then every (strategy, level) phase; (ring status, one record per phase)."""
    from ..runtime.client import RingClient

    c = await RingClient.connect(topo, key)
    try:
        status = await c.status()
        for w in range(opts.warmup):
            for s in opts.strategies:
                progress(f"warm-up {w + 1}/{opts.warmup} {s}", 0)
                await asyncio.wait_for(c.generate(request_for(opts, opts.prompts[0], s)), opts.request_timeout)
    finally:
        await c.close()
    phases = []
    for s in opts.strategies:
        for n in levels:
            phases.append(await _phase(topo, key, opts, s, n, progress))
        if len(levels) > 1:  # one at a time again: the baseline brackets the other levels
            phases.append(dict(await _phase(topo, key, opts, s, 1, progress), again=True))
    return status, phases


async def _phase(topo: Topology, key: bytes, opts: BenchOptions, strategy: str, n: int,
                 progress: ProgressFn) -> dict[str, Any]:
    from ..runtime.client import RingClient

    todo = list(range(len(opts.prompts)))
    records: list[dict[str, Any]] = []
    clients = [await RingClient.connect(topo, key) for _ in range(min(n, len(todo)))]

    async def worker(c: RingClient) -> None:
        while todo:
            i = todo.pop(0)
            progress(f"{strategy} x{n}: prompt {i + 1}", 0)
            t0 = time.time()
            first: float | None = None
            done: dict[str, Any] = {}
            async for ev in c.stream(request_for(opts, opts.prompts[i], strategy)):
                if ev.get("type") == "tokens" and first is None:
                    first = time.time()
                elif ev.get("type") == "done":
                    done = ev
            t1 = time.time()
            records.append({"prompt_index": i, "t0": t0, "t1": t1, "ttft_s": (first or t1) - t0,
                            "text": done.get("text", ""), "finish_reason": done.get("finish_reason"),
                            "token_ids": list(done.get("token_ids", [])), "stats": done.get("stats", {})})
            progress(f"{strategy} x{n}: prompt {i + 1}", 1)

    t_start = time.time()
    try:
        await asyncio.wait_for(asyncio.gather(*[worker(c) for c in clients]),
                               opts.request_timeout * max(1, len(opts.prompts)))
    except asyncio.TimeoutError:
        raise FlowSpecError(f"{strategy} with {n} requests at once took longer than the request timeout") from None
    finally:
        for c in clients:
            await c.close()
    records.sort(key=lambda r: r["prompt_index"])
    return {"strategy": strategy, "concurrency": n, "t_start": t_start, "t_end": time.time(), "requests": records}


def summarize_phase(phase: dict[str, Any], stages: Sequence[str]) -> dict[str, Any]:
    recs = phase["requests"]
    a, b = phase["t_start"], phase["t_end"]
    wall = max(1e-9, b - a)
    tokens = sum(len(r["token_ids"]) for r in recs)
    rates = [float(r["stats"].get("tokens_per_s") or 0.0) for r in recs]
    med = statistics.median(rates) if rates else 0.0
    ttft = [r["ttft_s"] for r in recs]
    spans: dict[str, list[tuple[float, float]]] = {s: [] for s in stages}
    for r in recs:
        for seg in (r["stats"].get("trace") or {}).get("segments", []):
            for h in seg.get("hops", []):
                spans.setdefault(str(h[0]), []).append((max(a, float(h[2])), min(b, float(h[3]))))
    return {
        "concurrency": phase["concurrency"], "requests": len(recs), "tokens": tokens, "wall_s": round(wall, 3),
        "aggregate_tokens_per_s": round(tokens / wall, 2),
        "request_tokens_per_s": {"median": round(med, 2), "min": round(min(rates), 2) if rates else None,
                                 "min_over_median": round(min(rates) / med, 3) if rates and med else None},
        "ttft_s": {"median": round(statistics.median(ttft), 3) if ttft else None,
                   "p95": round(quantile(ttft, 0.95) or 0.0, 3) if ttft else None},
        "stage_busy": {s: round(union_length([x for x in sp if x[1] > x[0]]) / wall, 3) for s, sp in spans.items()},
        "full": full_window_busy(recs, spans, phase["concurrency"]),
        "trip": trip_breakdown(recs),
    }


def full_windows(recs: Sequence[dict[str, Any]], n: int) -> list[tuple[float, float]]:
    """The spans of the phase during which n requests were on the ring at once (from each
    request's client-side start and end): the steady state, without the ramp at the start
    and the tail where the last requests finish alone."""
    events = sorted([(float(r["t0"]), 1) for r in recs] + [(float(r["t1"]), -1) for r in recs],
                    key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    out: list[tuple[float, float]] = []
    active, since = 0, 0.0
    for t, d in events:
        if active >= n and d < 0 and t > since:
            out.append((since, t))
        active += d
        if active >= n and d > 0:
            since = t
    return out


def full_window_busy(recs: Sequence[dict[str, Any]], spans: dict[str, list[tuple[float, float]]],
                     n: int) -> dict[str, Any] | None:
    """How busy every stage was while n requests were on the ring at once (``stage_busy`` is
    over the whole phase, ramp and tail included): the seconds of such windows, their share of
    the phase, and each stage's busy fraction inside them. None when n requests never ran
    together."""
    windows = full_windows(recs, n)
    length = sum(b - a for a, b in windows)
    if length <= 0:
        return None
    busy = {}
    for s, sp in spans.items():
        inside = [(max(a, wa), min(b, wb)) for wa, wb in windows for a, b in sp if min(b, wb) > max(a, wa)]
        busy[s] = round(union_length(inside) / length, 3)
    phase = max(float(r["t1"]) for r in recs) - min(float(r["t0"]) for r in recs)
    return {"seconds": round(length, 3), "share": round(length / phase, 3) if phase > 0 else None,
            "stage_busy": busy}


def trip_breakdown(recs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Where a segment's trip went, over every traced segment of the phase: the trip's
    median, each stage's mean compute and queueing (waiting for its worker), the mean time
    on a link, and the tokens each returned segment brought. None without traces."""
    trips: list[float] = []
    compute: dict[str, list[float]] = {}
    queue: dict[str, list[float]] = {}
    wire: list[float] = []
    for r in recs:
        for seg in (r["stats"].get("trace") or {}).get("segments", []):
            t_sent, t_back = float(seg["t_sent"]), float(seg["t_back"])
            trips.append(t_back - t_sent)
            prev = t_sent
            for name, t_recv, t_start, t_end, t_send, *_ in seg.get("hops", []):
                compute.setdefault(str(name), []).append(float(t_end) - float(t_start))
                queue.setdefault(str(name), []).append(max(0.0, float(t_start) - float(t_recv)))
                wire.append(max(0.0, float(t_recv) - prev))
                prev = float(t_send)
            wire.append(max(0.0, t_back - prev))
    if not trips:
        return None
    ms = lambda xs: round(1000 * statistics.fmean(xs), 1)  # noqa: E731
    segments = sum(int((r["stats"].get("hops") or {}).get("trips", 0)) for r in recs)
    tokens = sum(len(r["token_ids"]) for r in recs)
    gaps = [g for r in recs for g in respond_gaps(r["stats"])]
    return {"median_ms": round(1000 * statistics.median(trips), 1),
            "stages": {s: {"compute_ms": ms(compute[s]), "queue_ms": ms(queue[s])} for s in compute},
            "link_ms": ms(wire) if wire else None,
            "respond_ms": {"median": round(1000 * statistics.median(gaps), 1),
                           "p95": round(1000 * (quantile(gaps, 0.95) or 0.0), 1)} if gaps else None,
            "tokens_per_segment": round(tokens / segments, 2) if segments else None}


def trip_line(name: str, n: str, trip: dict[str, Any]) -> str:
    """One console line: where a segment's trip went at this level."""
    st = trip["stages"].values()
    span = lambda k: (f"{min(v[k] for v in st):.0f}-{max(v[k] for v in st):.0f}" if st else "-")  # noqa: E731
    link = "-" if trip["link_ms"] is None else f"{trip['link_ms']:.1f}"
    rs = trip.get("respond_ms")
    respond = "" if not rs else f"; the source answers a return in {rs['median']:.0f} ms (median, p95 {rs['p95']:.0f})"
    return (f"{name} x{n}: a segment's trip {trip['median_ms']:.0f} ms (median): per stage {span('compute_ms')} ms "
            f"computing, {span('queue_ms')} ms queued (means), {link} ms per link; "
            f"{trip['tokens_per_segment']} tokens per returned segment{respond}")


def summarize_levels(phases: list[dict[str, Any]], stages: Sequence[str], temperature: float) -> dict[str, Any]:
    """{strategy: {level: summary}}, with the ratio to level 1 and, at temperature 0, how
    many answers equal their level-1 answer. Where level 1 ran again after the other levels,
    its summary has that run's rate as ``again_tokens_per_s`` and the ratios are to
    ``baseline_tokens_per_s``, the mean of both runs."""
    out: dict[str, dict[str, Any]] = {}
    alone: dict[tuple[str, int], list[int]] = {}
    base: dict[str, float] = {}
    again: dict[str, float] = {}
    for ph in phases:
        if ph["concurrency"] == 1:
            rate = summarize_phase(ph, stages)["aggregate_tokens_per_s"]
            if ph.get("again"):
                again[ph["strategy"]] = rate
                continue
            base[ph["strategy"]] = rate
            for r in ph["requests"]:
                alone[(ph["strategy"], r["prompt_index"])] = r["token_ids"]
    for name, rate in again.items():
        if name in base:
            base[name] = (base[name] + rate) / 2
    for ph in phases:
        if ph.get("again"):
            continue
        d = summarize_phase(ph, stages)
        if ph["strategy"] in base:
            b = base[ph["strategy"]]
            if ph["concurrency"] == 1 and ph["strategy"] in again:
                d["again_tokens_per_s"] = again[ph["strategy"]]
                d["baseline_tokens_per_s"] = round(b, 2)
            d["x_sequential"] = 1.0 if ph["concurrency"] == 1 else (
                round(d["aggregate_tokens_per_s"] / b, 3) if b else None)
            if temperature == 0:
                same = sum(alone.get((ph["strategy"], r["prompt_index"])) == r["token_ids"] for r in ph["requests"])
                d["same_as_alone"] = f"{same}/{len(ph['requests'])}"
        out.setdefault(ph["strategy"], {})[str(ph["concurrency"])] = d
    return out


def level_records(phases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The requests of the level-1 phases in the layout of the plain bench's records."""
    return [{"prompt_index": r["prompt_index"], "strategy": ph["strategy"], "text": r["text"],
             "token_ids": r["token_ids"], "finish_reason": r["finish_reason"], "stats": r["stats"]}
            for ph in phases if ph["concurrency"] == 1 and not ph.get("again") for r in ph["requests"]]


def print_levels(summary: dict[str, Any], console: Any, title: str) -> None:
    from rich import box
    from rich.table import Table

    t = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False,
              caption="agg: all generated tokens over the phase's wall time (at 1: before / after the other "
                      "levels); x seq: over 1 at a time (the mean of its runs); per request: "
                      "decode tok/s median (slowest / median); ttft: client-side time to first token; busy: "
                      "stages in ring order over the phase (ramp and tail included)")
    for col in ("strategy", "N", "agg tok/s", "x seq", "per request", "ttft med / p95", "busy", "= alone"):
        t.add_column(col, justify="left" if col in ("strategy", "busy") else "right", no_wrap=True)
    for name, levels in summary.items():
        for n, d in levels.items():
            rq, tt = d["request_tokens_per_s"], d["ttft_s"]
            slowest = "-" if rq["min_over_median"] is None else f"{rq['min_over_median']:.2f}"
            agg = f"{d['aggregate_tokens_per_s']:.1f}"
            if "again_tokens_per_s" in d:
                agg += f" / {d['again_tokens_per_s']:.1f}"
            t.add_row(name, n, agg,
                      "-" if d.get("x_sequential") is None else f"{d['x_sequential']:.2f}",
                      f"{rq['median']:.1f} ({slowest})",
                      f"{tt['median']:.2f} / {tt['p95']:.2f} s",
                      " ".join(f"{v:.2f}" for v in d["stage_busy"].values()), d.get("same_as_alone", "-"))
    console.print(t)
    for name, levels in summary.items():
        for n, d in levels.items():
            if d.get("trip"):
                console.print(trip_line(name, n, d["trip"]), highlight=False)
            full = d.get("full")
            if full and n != "1":
                console.print(f"{name} x{n}: while {n} requests ran at once ({full['seconds']:.0f} s, "
                              f"{100 * (full['share'] or 0):.0f}% of the phase) the stages were "
                              + " ".join(f"{v:.2f}" for v in full["stage_busy"].values()) + " busy", highlight=False)
