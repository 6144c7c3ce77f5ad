"""From the requests' stats to per-strategy numbers, the text agreement and the JSON report."""

from __future__ import annotations

import bisect
import time
from typing import Any, Sequence

from ..config import Topology
from ..model.dtypes import dtype_name
from .machine import machine_info
from .options import BenchOptions

REPORT_VERSION = 1  # of the --json layout
TARGET_SPEEDUP = 3.0  # FlowSpec's goal over plain pipelined decoding: the report works out the tau it needs


def union_length(spans: Sequence[tuple[float, float]]) -> float:
    """Seconds covered by the (start, end) spans: where they overlap (one pass that served
    several segments records the same span in each of them) it counts once."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


def _window_busy(stats: dict[str, Any]) -> tuple[dict[str, float], float, float] | None:
    """Per-stage compute seconds and the source's seconds inside the decode window, and the
    window's length; None without a complete trace. A stage's pass that served several of the
    request's segments at once (they queued behind each other) counts once."""
    tr = stats.get("trace")
    hops = stats.get("hops") or {}
    if not isinstance(tr, dict) or len(tr.get("segments", [])) < int(hops.get("trips", 0)):
        return None
    t0 = float(tr["t0"])
    a, b = t0 + float(stats.get("prefill_s", 0.0)), t0 + float(stats.get("total_s", 0.0))
    if b <= a:
        return None
    spans: dict[str, list[tuple[float, float]]] = {}
    for seg in tr["segments"]:
        for h in seg.get("hops", []):
            name, start, end = str(h[0]), max(a, float(h[2])), min(b, float(h[3]))
            spans.setdefault(name, [])
            if end > start:
                spans[name].append((start, end))
    busy = {name: union_length(sp) for name, sp in spans.items()}
    src = sum(max(0.0, min(float(e), b) - max(float(s), a)) for s, e, *_ in tr.get("source", []))
    return busy, src, b - a


def respond_gaps(stats: dict[str, Any]) -> list[float]:
    """Seconds from each segment's return to the source to the next segment's departure
    (from the request's trace; a return after the last departure has none)."""
    tr = stats.get("trace")
    if not isinstance(tr, dict):
        return []
    segs = tr.get("segments") or []
    departures = sorted(float(s["t_sent"]) for s in segs)
    gaps = []
    for s in segs:
        k = bisect.bisect_left(departures, float(s["t_back"]))
        if k < len(departures):
            gaps.append(departures[k] - float(s["t_back"]))
    return gaps


def round_bound(tau: float, trip_ms: float | None, respond_ms: float | None,
                tokens_per_s: float) -> dict[str, float | None]:
    """The most a draft-and-verify strategy can decode with this drafter on this ring.

    A round ends with a token nobody drafted (the target's own, at a miss); the next round's
    first verification needs that token to go around the ring first, so a round lasts at
    least one ring trip plus the source's turnaround (``floor_ms``), and decoding runs at most
    ``tau / floor``. Measured trips include the queueing of a full ring, so this is the
    ceiling of scheduling alone: beyond it only a larger tau (a better drafter, a larger
    tree) or cheaper trips (smaller segments, faster stages) help."""
    if not trip_ms or tau <= 0:
        return {"trip_ms": trip_ms, "floor_ms": None, "tokens_per_s": None, "reached": None}
    floor_ms = trip_ms + (respond_ms or 0.0)
    bound = 1000 * tau / floor_ms
    return {"trip_ms": round(trip_ms, 2), "floor_ms": round(floor_ms, 2),
            "tokens_per_s": round(bound, 3), "reached": _ratio(tokens_per_s, bound)}


def tau_needed(speedup: float, base_tokens_per_s: float, bound: dict[str, float | None]) -> float | None:
    """The tau a strategy would need to decode `speedup` x the baseline at its round's floor."""
    floor = bound.get("floor_ms")
    if not floor or base_tokens_per_s <= 0:
        return None
    return round(speedup * base_tokens_per_s * floor / 1000, 2)


def decode_trips(stats: dict[str, Any]) -> list[float]:
    """Seconds around the ring of each segment sent during decoding (prefill segments, which
    carry the prompt, excluded), from the request's trace."""
    tr = stats.get("trace")
    if not isinstance(tr, dict):
        return []
    start = float(tr.get("t0", 0.0)) + float(stats.get("prefill_s", 0.0))
    return [float(s["t_back"]) - float(s["t_sent"]) for s in tr.get("segments") or [] if float(s["t_sent"]) >= start]


def quantile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _ratio(a: float, b: float, digits: int = 3) -> float | None:
    return round(a / b, digits) if b else None


def rounds_profile(stats: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How the requests' rounds ended and how far they got: ``ends`` counts rounds that ended
    because the drafter's children missed the target's token (``missed``) or because the tree
    had not grown to that token yet (``undrafted``); ``by_depth[d]`` is the share of tokens with
    d drafted tokens accepted before them in their round whose next token was a drafted child
    (with shares p0, p1, ..., tau is about 1 + p0 + p0 p1 + p0 p1 p2 + ...)."""
    steps: list[int] = []
    acc: list[int] = []
    for s in stats:
        for i, (n, a) in enumerate(zip(s.get("depth_steps") or [], s.get("depth_accepted") or [])):
            if i == len(steps):
                steps.append(0)
                acc.append(0)
            steps[i] += int(n)
            acc[i] += int(a)
    missed = sum(int(s.get("ends_missed", 0)) for s in stats)
    undrafted = sum(int(s.get("ends_undrafted", 0)) for s in stats)
    return {"ends": {"missed": missed, "undrafted": undrafted},
            "by_depth": [round(a / n, 3) for n, a in zip(steps, acc) if n],
            "steps_by_depth": steps}


def summarize_strategy(recs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Totals and rates over one strategy's requests (speedups are added by summarize)."""
    st = [r["stats"] for r in recs]
    new = sum(int(s.get("new_tokens", 0)) for s in st)
    decode_s = sum(float(s.get("decode_s", 0.0)) for s in st)
    total_s = sum(float(s.get("total_s", 0.0)) for s in st)
    decode_tokens = sum(max(0, int(s.get("new_tokens", 0)) - 1) for s in st if float(s.get("decode_s", 0)) > 0)
    counts = {k: sum(int(s.get(k, 0)) for s in st)
              for k in ("verifications", "rounds", "drafted", "verified", "pruned", "pruned_sent",
                        "accepted_drafts", "segments_sent")}
    # busy fractions: over the decode phase from the traces, else over whole requests
    windows = [_window_busy(s) for s in st]
    busy: dict[str, float] = {}
    source_busy: float | None = None
    if st and all(w is not None for w in windows):
        basis = "decode"
        span = sum(w[2] for w in windows if w is not None)
        for w in windows:
            assert w is not None
            for k, v in w[0].items():
                busy[k] = busy.get(k, 0.0) + v
        busy = {k: round(v / span, 3) for k, v in busy.items()} if span else {}
        source_busy = _ratio(sum(w[1] for w in windows if w is not None), span)
    else:
        basis = "request"
        for s in st:
            for k, v in ((s.get("hops") or {}).get("stages") or {}).items():
                busy[k] = busy.get(k, 0.0) + float(v.get("compute_s", 0.0))
        busy = {k: round(v / total_s, 3) for k, v in busy.items()} if total_s else {}
    src = {k: round(sum(float((s.get("source") or {}).get(k, 0.0)) for s in st), 4)
           for k in ("draft_s", "verify_s", "wait_s")}
    src.update({k.replace("_s", "_frac"): _ratio(v, total_s) for k, v in list(src.items())})
    hop_bytes: dict[str, int] = {}
    hop_wire: dict[str, float] = {}
    trips = sum(int((s.get("hops") or {}).get("trips", 0)) for s in st)
    for s in st:
        for k, v in ((s.get("hops") or {}).get("links") or {}).items():
            hop_bytes[k] = hop_bytes.get(k, 0) + int(v.get("bytes", 0))
            hop_wire[k] = hop_wire.get(k, 0.0) + float(v.get("wire_s", 0.0))
    per_req = [float(s.get("tokens_per_s", 0.0)) for s in st]
    gaps = [g for s in st for g in respond_gaps(s)]
    med, p95 = quantile(gaps, 0.5), quantile(gaps, 0.95)
    dtrips = [t for s in st for t in decode_trips(s)]
    tps = round(decode_tokens / decode_s, 3) if decode_s > 0 else 0.0
    tau = _ratio(new, counts["rounds"]) or 0.0
    return {
        "requests": len(st),
        "new_tokens": new,
        "tokens_per_s": tps,
        "tokens_per_s_mean": round(sum(per_req) / len(per_req), 3) if per_req else 0.0,
        "e2e_tokens_per_s": round(new / total_s, 3) if total_s > 0 else 0.0,
        "speedup_vs_autoregressive": None, "speedup_vs_chunked": None,
        "e2e_speedup_vs_autoregressive": None, "e2e_speedup_vs_chunked": None,
        "mean_accepted": _ratio(new, counts["verifications"]) or 0.0,
        "tau": tau,
        "prefill_s_mean": round(sum(float(s.get("prefill_s", 0.0)) for s in st) / len(st), 4) if st else 0.0,
        "decode_s": round(decode_s, 4),
        "total_s": round(total_s, 4),
        **counts,
        "stage_busy": busy,
        "stage_busy_basis": basis,
        "source_busy": source_busy,
        "source": src,
        "bytes_per_hop": hop_bytes,
        "bytes_per_token": {k: round(v / new, 1) for k, v in hop_bytes.items()} if new else {},
        "wire_ms_per_trip": {k: round(1000 * v / trips, 3) for k, v in hop_wire.items()} if trips else {},
        # the source's turnaround: a segment's return to the next segment's departure
        "respond_ms": {"median": None if med is None else round(1000 * med, 2),
                       "p95": None if p95 is None else round(1000 * p95, 2), "segments": len(gaps)},
        # ring work spent on rows that were pruned after they were sent, per generated token
        "wasted_rows_per_token": _ratio(counts["pruned_sent"], new, 2) if new else None,
        # why rounds ended, and the drafter's acceptance by depth in a round
        "rounds_profile": rounds_profile(st),
        # a round lasts at least one ring trip: tau / (trip + turnaround) bounds tokens/s
        "round_bound": round_bound(tau, 1000 * sum(dtrips) / len(dtrips) if dtrips else None,
                                   None if med is None else 1000 * med, tps),
    }


def agreement(records: Sequence[dict[str, Any]], strategies: Sequence[str], temperature: float) -> dict[str, Any]:
    """Whether every strategy produced the same tokens as the reference on every prompt."""
    ref = "autoregressive" if "autoregressive" in strategies else strategies[0]
    by: dict[tuple[int, str], list[int]] = {(r["prompt_index"], r["strategy"]): r["token_ids"] for r in records}
    prompts = sorted({r["prompt_index"] for r in records})
    mismatches = []
    for i in prompts:
        want = by.get((i, ref))
        for s in strategies:
            got = by.get((i, s))
            if s == ref or want is None or got is None or got == want:
                continue
            k = next((j for j, (x, y) in enumerate(zip(got, want)) if x != y), min(len(got), len(want)))
            mismatches.append({"prompt": i, "strategy": s, "reference": ref, "first_diff": k,
                               "tokens": len(got), "reference_tokens": len(want)})
    return {"checked": temperature == 0, "reference": ref, "prompts": len(prompts),
            "all_agree": not mismatches, "mismatches": mismatches}


def summarize(records: Sequence[dict[str, Any]], opts: BenchOptions) -> dict[str, Any]:
    out = {s: summarize_strategy([r for r in records if r["strategy"] == s]) for s in opts.strategies}
    for s, d in out.items():
        for base in ("autoregressive", "chunked"):
            if base in out:
                d[f"speedup_vs_{base}"] = _ratio(d["tokens_per_s"], out[base]["tokens_per_s"])
                d[f"e2e_speedup_vs_{base}"] = _ratio(d["e2e_tokens_per_s"], out[base]["e2e_tokens_per_s"])
        if "autoregressive" in out:
            d["round_bound"]["tau_for_target"] = tau_needed(
                TARGET_SPEEDUP, out["autoregressive"]["tokens_per_s"], d["round_bound"])
            d["round_bound"]["target_speedup"] = TARGET_SPEEDUP
    return out


def build_report(records: list[dict[str, Any]], opts: BenchOptions, *, topology: str, topo: Topology,
                 status: dict[str, Any], mode: str, testbed: list[str] | None, prompts_source: str,
                 cpu_caps: dict[str, Any] | None = None) -> dict[str, Any]:
    """The --json report. testbed: the emulation in words; cpu_caps: the CPU caps as the
    kernel applied them (Testbed.cpu_report: per node wanted / capped / quota_us / period_us
    / throttling, all_applied, warnings), None when no testbed ran the ring."""
    strategies = summarize(records, opts)
    agree = agreement(records, opts.strategies, opts.temperature)
    if not opts.keep_traces:  # the traces are bulky; the first prompt's feed the timeline plot
        first = min((r["prompt_index"] for r in records), default=0)
        records = [r if r["prompt_index"] == first
                   else {**r, "stats": {k: v for k, v in r["stats"].items() if k != "trace"}} for r in records]
    return {
        "version": REPORT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "topology": topology,
        "cluster": topo.cluster,
        "model": status.get("model"),
        "ring": status.get("ring", []),
        "mode": mode,
        "testbed": testbed,
        "cpu_caps": cpu_caps,
        "machine": machine_info(),  # where the bench ran (the nodes of a local ring or testbed run here too)
        "settings": {"strategies": list(opts.strategies), "prompts": prompts_source, "count": len(opts.prompts),
                     "max_new_tokens": opts.max_new_tokens, "temperature": opts.temperature,
                     "seed": opts.seed, "warmup": opts.warmup, "order": "interleaved by prompt, rotating",
                     "drafter": str(topo.model.drafter), "dtype": topo.model.dtype,
                     "dtype_here": dtype_name(topo.model.dtype)},  # what `auto` is on this machine
        "prompts": list(opts.prompts),
        "strategies": strategies,
        "agreement": agree,
        "requests": records,
    }
