"""`flowspec bench`: the decoding strategies side by side on one ring, in one run.

Every prompt is decoded by every strategy before the next prompt starts (the order of the
strategies rotates from prompt to prompt), on the same ring, with the same settings, so
that machine noise hits all strategies alike. The ring is started once (behind the
emulated testbed when the topology has a ``testbed`` section or with ``--emulate``), or
joined (``--join`` / ``--url``). Requests go over the binary :class:`RingClient` with a
per-request ``strategy`` and ``trace`` (per-segment timings, for busy fractions over the
decode phase and the timeline plot).

Per strategy: decode tokens/s (excluding prefill) and end to end, speedups over
``autoregressive`` and ``chunked``, mean accepted tokens per verification, tau, stage
busy fractions, the source's time split and bytes per hop; at temperature 0 it checks
that every strategy produced the same tokens.

With ``--concurrency 1,2,4`` every strategy decodes the prompts with N requests at once,
for each N (see flowspec/bench/concurrent.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import sys
from pathlib import Path
from typing import Any

from ..cli_common import add_topology_option, drafter_arg
from ..config import DTYPES, STRATEGIES, Topology
from ..errors import FlowSpecError, UsageError
from ..speculative.bounds import FieldError
from ..speculative.request import check_field
from .options import BenchOptions
from .output import check_plot_available, plot_report, print_report
from .prompts import MTBENCH, load_prompts, parse_strategies
from .concurrent import level_records, parse_levels, print_levels, run_levels, summarize_levels
from .run import run_requests
from .summary import build_report


def _joined_topology(topo: Topology, url: str | None) -> Topology:
    if not url:
        return topo
    scheme, sep, rest = url.partition("://")
    if sep and scheme not in ("tcp", "flowspec"):
        raise UsageError(f"--url {url!r}: give the source's ring address HOST:PORT (the binary protocol "
                         "of the topology's source node), not an HTTP API URL")
    text = (rest if sep else url).rstrip("/")
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"--url {url!r}: give the source's ring address as HOST:PORT")
    src = topo.source.name
    nodes = tuple(dataclasses.replace(n, host=host.strip("[]"), port=int(port)) if n.name == src else n
                  for n in topo.nodes)
    return dataclasses.replace(topo, nodes=nodes)


def cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..runtime.client import wait_formed
    from ..commands import node_flags, load_topology, run_async
    from ..testbed import Testbed, client_topology, local_ring_for

    if args.plot:
        check_plot_available()
    if args.max_new_tokens < 1 or args.warmup < 0 or args.limit < 0:
        raise UsageError("--max-new-tokens must be >= 1, --warmup and --limit >= 0")
    try:  # a request's bound, as the ring will check it
        check_field("temperature", args.temperature)
    except FieldError as e:
        raise UsageError(f"--temperature: {e.reason}") from None
    join = bool(args.join or args.url)
    if join and args.emulate:
        raise UsageError("--emulate starts a ring; it cannot be combined with --join / --url")
    try:  # a bad --strategies or --concurrency: exit 2, like any bad argument
        strategies = parse_strategies(args.strategies)
        levels = parse_levels(args.concurrency) if args.concurrency else ()
    except FlowSpecError as e:
        raise UsageError(str(e)) from None
    prompts = load_prompts(args.prompts, args.field, args.limit)
    topo = load_topology(args)
    opts = BenchOptions(strategies, tuple(prompts), args.max_new_tokens, args.temperature, args.seed,
                        args.warmup, args.request_timeout, args.keep_traces)
    out = Console(width=None if sys.stdout.isatty() else 120)  # tables stay whole in a log file
    err = Console(stderr=True)

    ring = None if join else local_ring_for(args, topo, node_flags(args))
    mode = "joined" if ring is None else ("testbed" if isinstance(ring, Testbed) else "local")

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        if ring is not None:
            err.print(f"starting the ring of {args.topology} ({mode}) ...")
            ring.start()
            key = ring.key
            ctopo = client_topology(ring, topo)
            alive = ring.check_alive
        else:
            key = topo.cluster_key()
            ctopo = _joined_topology(topo, args.url)
            alive = None
        run_async(lambda: wait_formed(ctopo, key, args.timeout, alive))
        total = len(opts.prompts) * len(strategies) * max(1, len(levels)) + opts.warmup * len(strategies)
        with Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=err, transient=False) as bar:
            task = bar.add_task("bench", total=total)

            def progress(what: str, finished: int) -> None:
                bar.update(task, description=what, advance=finished)

            if levels:
                status, phases = run_async(lambda: run_levels(ctopo, key, opts, levels, progress))
                records = level_records(phases)
            else:
                status, records = run_async(lambda: run_requests(ctopo, key, opts, progress))
            bar.update(task, completed=total, description="done")
    except KeyboardInterrupt:
        err.print("bench interrupted; stopping the ring ...")
        return 130
    finally:
        signal.signal(signal.SIGTERM, old)
        if ring is not None:
            ring.stop()
    report = build_report(records, opts, topology=args.topology, topo=topo, status=status, mode=mode,
                          testbed=ring.describe() if isinstance(ring, Testbed) else None,
                          cpu_caps=ring.cpu_report() if isinstance(ring, Testbed) else None,
                          prompts_source=args.prompts)
    if levels:
        stages = [r.get("name") for r in report["ring"]]
        report["concurrency"] = summarize_levels(phases, stages, opts.temperature)
        if 1 in levels:
            print_report(report, out)
        print_levels(report["concurrency"], out, f"flowspec bench: {topo.cluster}, {len(opts.prompts)} prompts x "
                     f"{opts.max_new_tokens} new tokens, N requests at once")
    else:
        print_report(report, out)
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report, indent=1))
        except OSError as e:
            raise FlowSpecError(f"--json {args.json}: cannot write ({e.strerror or e})") from None
        err.print(f"wrote {args.json}")
    if args.plot:
        plot_report(report, args.plot)
        err.print(f"wrote {args.plot}")
    return 0


def add_bench_command(sub: Any) -> None:
    from ..testbed import add_testbed_args

    b = sub.add_parser("bench", help="compare the decoding strategies on one ring, prompt by prompt",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_topology_option(b)
    b.add_argument("--strategies", default=",".join(STRATEGIES),
                   help=f"comma-separated subset of {','.join(STRATEGIES)} (default: all); a name may "
                        "carry its own draft-tree settings to compare variants side by side, e.g. "
                        "flowspec,flowspec:in_flight=6:segment=16 (keys: depth, top_k, total, segment, "
                        "expand, in_flight; and verify=source|last_stage on a ring formed with "
                        "decoding.verify: last_stage)")
    b.add_argument("--prompts", default=MTBENCH, help="'mt-bench' (first turns) or a JSONL file")
    b.add_argument("--field", default=None, help="JSONL field holding the prompt (default: prompt)")
    b.add_argument("--limit", type=int, default=0, help="use the first K prompts (0: all)")
    b.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer at most")
    b.add_argument("--warmup", type=int, default=1, help="unrecorded requests per strategy first")
    b.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the texts are compared)")
    b.add_argument("--seed", type=int, default=0, help="sampling seed, the same for every strategy")
    b.add_argument("--json", default=None, metavar="OUT", help="write the full data as JSON")
    b.add_argument("--plot", default=None, metavar="OUT.png", help="bar chart and timelines (matplotlib)")
    b.add_argument("--keep-traces", action="store_true", help="keep every request's trace in --json")
    b.add_argument("--concurrency", default=None, metavar="N[,N...]",
                   help="run every strategy with N requests at once, for each N (e.g. 1,2,4,8): aggregate "
                        "tokens/s, per-request rates, time to first token, stage busy (see decoding.max_active)")
    b.add_argument("--join", action="store_true", help="use the running ring of the topology")
    b.add_argument("--url", default=None, metavar="HOST:PORT",
                   help="use a running ring whose source listens at HOST:PORT (implies --join)")
    b.add_argument("--threads", type=int, default=0, help="torch threads per node (0: testbed.threads, else "
                   "cores / nodes)")
    b.add_argument("--dtype", choices=DTYPES, default=None, help="override model.dtype (default: the topology's)")
    b.add_argument("--drafter", type=drafter_arg, default=None,
                   help="override model.drafter: lookup | model:PATH | eagle[:PATH] | none (default: the topology's)")
    b.add_argument("--max-context", type=int, default=0,
                   help="override model.max_context, KV-cache slots (0: the topology's)")
    b.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the ring to form")
    b.add_argument("--request-timeout", type=float, default=900.0, help="seconds one request may take")
    add_testbed_args(b)
    b.set_defaults(func=cmd_bench)
