"""Where does a ring's time go? Links, stages, and one real generation.

    flowspec profile --topology topologies/local.yaml --local --json profile.json --trace trace.json
    python tools/profile_hops.py ...   # the same command, from a source checkout

Against a running ring (or one it starts with ``--local`` and stops after), it measures

* every link i -> i+1: round trip of an echo (a PROBE frame the successor answers on the
  same connection) and the usable bandwidth (echoes of growing payloads);
* every stage: compute time of a segment of 1 to 64 tokens (after a committed context);
* one real generation (temperature 0): per-stage compute and queueing, per-link wire
  time, and the source's draft / verify / wait time.

It prints tables, writes the numbers as JSON (``--json``) and the generation as a Chrome
trace (``--trace``, open it in https://ui.perfetto.dev): one track per node with its
compute spans and the links' wire spans below, so the pipeline's bubbles show as gaps.
Wire times compare two nodes' clocks: exact on one machine, as good as NTP on a LAN.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from .cli_common import HelpFormatter, add_topology_option, run_reporting
from .config import Topology
from .errors import FlowSpecError, UsageError
from .speculative.params import STRATEGIES

log = logging.getLogger("flowspec.profile")

DEFAULT_PROMPT = "Explain in three sentences why the sky is blue."
NODE_PID = 1  # trace process of the nodes: one thread (track) per node
LINK_PID = 2  # trace process of the links: wire spans as async slices


@dataclass
class Options:
    """What to measure."""

    echo_sizes: list[int]  # payload bytes of the link echoes
    bench_sizes: list[int]  # tokens per timed segment
    reps: int  # repetitions per size (the minimum is reported, and the median)
    context: int  # committed tokens before a timed segment
    prompt: str  # prompt of the traced generation
    max_new_tokens: int  # its length
    strategy: str | None  # its strategy (None: the topology's)
    timeout: float  # seconds to wait for the ring to form


# ------------------------------------------------------------------------ measuring
async def probe(client: Any, meta: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    """One profiler probe through the source (see flowspec/runtime/probes.py)."""
    return await client.probe(meta, timeout)


async def profile(topo: Topology, key: bytes, opts: Options, alive: Callable[[], None] | None = None
                  ) -> dict[str, Any]:
    from .runtime.client import RingClient, wait_formed

    status = await wait_formed(topo, key, opts.timeout, alive)
    c = await RingClient.connect(topo, key)
    try:
        links = await probe(c, {"op": "links", "sizes": opts.echo_sizes, "reps": opts.reps})
        bench = await probe(c, {"op": "bench", "sizes": opts.bench_sizes, "reps": opts.reps,
                                "context": opts.context})
        req: dict[str, Any] = {"prompt": opts.prompt, "max_new_tokens": opts.max_new_tokens,
                               "temperature": 0.0, "trace": True}
        if opts.strategy:
            req["strategy"] = opts.strategy
        done = await c.generate(req)
    finally:
        await c.close()
    stats = dict(done["stats"])
    trace = stats.pop("trace", None) or {"t0": 0.0, "segments": [], "source": []}
    return {"cluster": topo.cluster, "model": str(topo.model.target), "source_name": topo.source.name,
            "ring": status.get("ring", []),
            "links": links["results"], "stages": bench["results"], "bench_context": opts.context,
            "generation": {"text": done["text"], "tokens": len(done["token_ids"]), "stats": stats},
            "breakdown": breakdown(stats), "trace": trace}


def breakdown(stats: dict[str, Any]) -> list[dict[str, Any]]:
    """Where one generation's time went: one row per part, seconds and share of the wall time."""
    total = float(stats.get("total_s") or 0.0)
    rows: list[dict[str, Any]] = []

    def add(part: str, where: str, s: float) -> None:
        rows.append({"part": part, "where": where, "seconds": round(s, 4),
                     "share": round(s / total, 3) if total > 0 else 0.0})

    src = stats.get("source") or {}
    add("draft", "source", float(src.get("draft_s", 0.0)))
    add("verify", "source", float(src.get("verify_s", 0.0)))
    add("wait for the ring", "source", float(src.get("wait_s", 0.0)))
    hops = stats.get("hops") or {}
    for name, st in (hops.get("stages") or {}).items():
        add("compute", name, float(st.get("compute_s", 0.0)))
        add("queueing", name, float(st.get("queue_s", 0.0)))
    for link, lk in (hops.get("links") or {}).items():
        add("wire", link, float(lk.get("wire_s", 0.0)))
    return rows


# ---------------------------------------------------------------------------- trace
def chrome_trace(report: dict[str, Any]) -> dict[str, Any]:
    """The traced generation in Chrome's trace event format (one track per node)."""
    trace = report["trace"]
    t0 = float(trace.get("t0") or 0.0)
    segs = trace.get("segments") or []
    src_name = str(report.get("source_name", "source"))
    names = [src_name] + [str(r["name"]) for r in report["ring"]]
    tid = {n: i for i, n in enumerate(names)}
    ev: list[dict[str, Any]] = [
        {"ph": "M", "name": "process_name", "pid": NODE_PID, "tid": 0, "args": {"name": "ring nodes"}},
        {"ph": "M", "name": "process_sort_index", "pid": NODE_PID, "tid": 0, "args": {"sort_index": 0}},
        {"ph": "M", "name": "process_name", "pid": LINK_PID, "tid": 0, "args": {"name": "links (wire time)"}},
        {"ph": "M", "name": "process_sort_index", "pid": LINK_PID, "tid": 0, "args": {"sort_index": 1}},
    ]
    for n, i in tid.items():
        ev.append({"ph": "M", "name": "thread_name", "pid": NODE_PID, "tid": i, "args": {"name": n}})
        ev.append({"ph": "M", "name": "thread_sort_index", "pid": NODE_PID, "tid": i, "args": {"sort_index": i}})

    def us(t: float) -> float:
        return round((float(t) - t0) * 1e6, 1)

    for a, b, sends in trace.get("source") or []:
        ev.append({"ph": "X", "name": "draft + verify", "cat": "source", "pid": NODE_PID, "tid": tid[src_name],
                   "ts": us(a), "dur": max(0.1, round((b - a) * 1e6, 1)), "args": {"sends": sends}})
    links: dict[str, int] = {}
    # a stage's passes: segments that waited together ran in one pass (same start and end),
    # which is one span on its track, not one per segment stacked on each other
    passes: dict[tuple[str, float, float], list[dict[str, Any]]] = {}
    for k, seg in enumerate(segs):
        prev, prev_send = src_name, float(seg["t_sent"])
        ev.append({"ph": "i", "name": "send", "cat": "source", "s": "t", "pid": NODE_PID, "tid": tid[src_name],
                   "ts": us(prev_send), "args": {"segment": k}})
        hops = list(seg.get("hops") or [])
        for h in hops + [[src_name, seg["t_back"], None, None, None, None, None]]:
            name, t_recv = str(h[0]), float(h[1])
            link = f"{prev}->{name}"
            lt = links.setdefault(link, len(links))
            ev.append({"ph": "b", "name": link, "cat": "wire", "id": f"{lt}.{k}", "pid": LINK_PID, "tid": lt,
                       "ts": us(prev_send), "args": {"segment": k}})
            ev.append({"ph": "e", "name": link, "cat": "wire", "id": f"{lt}.{k}", "pid": LINK_PID, "tid": lt,
                       "ts": us(max(t_recv, prev_send))})
            if h[2] is None:
                break
            _, _, t_start, t_end, t_send, b_in, b_out = h
            if name not in tid:
                tid[name] = len(tid)
                ev.append({"ph": "M", "name": "thread_name", "pid": NODE_PID, "tid": tid[name], "args": {"name": name}})
            passes.setdefault((name, float(t_start), float(t_end)), []).append(
                {"segment": k, "rows": seg.get("rows", "?"), "queue_ms": round(1000 * (float(t_start) - t_recv), 3),
                 "bytes_in": b_in, "bytes_out": b_out})
            prev, prev_send = name, float(t_send)
    for (name, t_start, t_end), parts in passes.items():
        rows = [p["rows"] for p in parts]
        what = (f"compute ({rows[0]} rows out)" if len(parts) == 1 else
                f"compute ({len(parts)} segments, {sum(r for r in rows if isinstance(r, int))} rows out)")
        ev.append({"ph": "X", "name": what, "cat": "stage", "pid": NODE_PID, "tid": tid[name], "ts": us(t_start),
                   "dur": max(0.1, round((t_end - t_start) * 1e6, 1)),
                   "args": parts[0] if len(parts) == 1 else {"segments": parts}})
    for link, lt in links.items():
        ev.append({"ph": "M", "name": "thread_name", "pid": LINK_PID, "tid": lt, "args": {"name": link}})
    return {"traceEvents": ev, "displayTimeUnit": "ms",
            "otherData": {"cluster": report["cluster"], "model": report["model"],
                          "note": "wire spans compare two nodes' clocks (exact on one machine)"}}


# ---------------------------------------------------------------------------- output
def tables(report: dict[str, Any]) -> list[Table]:
    out: list[Table] = []
    t = Table(title="links: echo round trip and usable bandwidth", title_justify="left")
    for col, j in (("link", "left"), ("RTT ms", "right"), ("Mbit/s", "right"), ("largest echo", "right")):
        t.add_column(col, justify=j)  # type: ignore[arg-type]
    for r in report["links"]:
        name = f"{r.get('from')}->{r.get('to')}"
        if r.get("error"):
            t.add_row(name, "-", "-", f"[red]{r['error']}[/]")
            continue
        big = r["samples"][-1]
        bw = r.get("bandwidth_mbit")
        t.add_row(name, f"{r['rtt_ms']:.3f}", f"{bw:,.0f}" if bw else "n/a",
                  f"{_bytes(big[0])} in {big[1]:.2f} ms")
    out.append(t)
    stages = report["stages"]
    sizes = [s[0] for s in next((r["sizes"] for r in stages if r.get("sizes")), [])]
    t = Table(title=f"stage compute: ms per segment of n tokens (after {report['bench_context']} tokens)",
              title_justify="left")
    t.add_column("stage")
    t.add_column("layers")
    for n in sizes:
        t.add_column(f"n={n}", justify="right")
    for r in stages:
        a, b = r.get("layers", [0, 0])
        if r.get("error"):
            t.add_row(r.get("node", "?"), f"{a}-{b - 1}", f"[red]{r['error']}[/]")
            continue
        t.add_row(r["node"], f"{a}-{b - 1}", *[f"{s[1]:.2f}" for s in r["sizes"]])
    out.append(t)
    g = report["generation"]
    st = g["stats"]
    caption = (f"{g['tokens']} tokens in {st.get('total_s', 0):.3f} s · {st.get('tokens_per_s', 0):.1f} tok/s "
               f"decode · {st.get('strategy')} · {st.get('mean_accepted', 0):.2f} accepted/verify")
    t = Table(title="one generation: where the time went", title_justify="left", caption=caption,
              caption_justify="left", min_width=len(caption))
    for col, j in (("where", "left"), ("part", "left"), ("seconds", "right"), ("of wall time", "right")):
        t.add_column(col, justify=j)  # type: ignore[arg-type]
    for r in report["breakdown"]:
        t.add_row(r["where"], r["part"], f"{r['seconds']:.4f}", f"{100 * r['share']:.1f}%")
    out.append(t)
    return out


def _bytes(n: float) -> str:
    for unit, k in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:g} {unit}"
    return f"{int(n)} B"


# ------------------------------------------------------------------------------ main
def _sizes(text: str) -> list[int]:
    try:
        out = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, not {text!r}") from None
    if not out:
        raise argparse.ArgumentTypeError("expected at least one size")
    return out


def _csv(sizes: list[int]) -> str:
    return ",".join(str(n) for n in sizes)


ECHO_SIZES = [0, 16 << 10, 64 << 10, 256 << 10, 1 << 20]
BENCH_SIZES = [1, 2, 4, 8, 16, 32, 64]


def add_profile_args(p: argparse.ArgumentParser) -> None:
    """The options of `flowspec profile` (and of tools/profile_hops.py)."""
    add_topology_option(p)
    p.add_argument("--local", action="store_true", help="start the topology's local nodes, stop them after")
    p.add_argument("--json", metavar="OUT", help="write the measurements as JSON")
    p.add_argument("--trace", metavar="OUT.json", help="write the generation as a Chrome trace (Perfetto)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per size")
    p.add_argument("--echo-sizes", type=_sizes, default=ECHO_SIZES,
                   help=f"echo payload bytes, comma-separated (default: {_csv(ECHO_SIZES)})")
    p.add_argument("--bench-sizes", type=_sizes, default=BENCH_SIZES,
                   help=f"segment sizes in tokens, comma-separated (default: {_csv(BENCH_SIZES)})")
    p.add_argument("--context", type=int, default=128, help="committed tokens before a timed segment")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt of the traced generation")
    p.add_argument("--max-new-tokens", type=int, default=64, help="length of the traced generation")
    p.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="strategy of the traced generation (default: the topology's decoding.strategy)")
    p.add_argument("--threads", type=int, default=0, help="--local: torch threads per node (0: cores / nodes)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the ring to form")
    from .testbed import add_testbed_args

    add_testbed_args(p)  # --local: emulated links and CPU caps (default: when the topology has a testbed)


def build_parser(prog: str = "profile_hops.py") -> argparse.ArgumentParser:
    """The stand-alone parser (tools/profile_hops.py): the options and -v."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_profile_args(p)
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    return p


def add_profile_command(sub: Any) -> None:
    p = sub.add_parser("profile", help="where a ring's time goes: links, stages and one traced generation",
                       description=__doc__)
    add_profile_args(p)
    p.set_defaults(func=cmd_profile)


def cmd_profile(args: argparse.Namespace) -> int:
    return _run(args, Console())


def main(argv: list[str] | None = None, prog: str = "profile_hops.py") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.basicConfig(level=max(logging.DEBUG, logging.WARNING - 10 * args.verbose), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    console = Console()
    return run_reporting(prog.removesuffix(".py"), lambda: _run(args, console))


def _run(args: argparse.Namespace, console: Console) -> int:
    from .commands import run_async
    from .runtime.probes import check_probe
    from .testbed import Testbed, client_topology, local_ring_for

    topo = Topology.load(args.topology)
    try:  # bad numbers are refused before anything starts
        check_probe({"op": "links", "sizes": args.echo_sizes, "reps": args.reps})
    except FlowSpecError as e:
        raise UsageError(f"--echo-sizes / --reps: {e}") from None
    try:
        check_probe({"op": "bench", "sizes": args.bench_sizes, "reps": args.reps, "context": args.context})
    except FlowSpecError as e:
        raise UsageError(f"--bench-sizes / --context: {e}") from None
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, not {args.max_new_tokens}")
    opts = Options(args.echo_sizes, args.bench_sizes, args.reps, args.context, args.prompt,
                   args.max_new_tokens, args.strategy, args.timeout)
    ring = None
    try:
        ctopo = topo
        if args.local:
            ring = local_ring_for(args, topo, ["--no-api"])
            ring.start()
            if isinstance(ring, Testbed):
                console.print("emulated: " + "; ".join(ring.describe()))
            key, alive, ctopo = ring.key, ring.check_alive, client_topology(ring, topo)
        else:
            key, alive = topo.cluster_key(), None
        with console.status("profiling the ring ..."):
            report = run_async(lambda: profile(ctopo, key, opts, alive))
    finally:
        if ring is not None:
            ring.stop()
    for t in tables(report):
        console.print(t)
    if args.json:
        data = {k: v for k, v in report.items() if k != "trace"}
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
        console.print(f"measurements written to {args.json}")
    if args.trace:
        Path(args.trace).write_text(json.dumps(chrome_trace(report)) + "\n")
        console.print(f"trace written to {args.trace} (open it in https://ui.perfetto.dev)")
    return 0

