#!/usr/bin/env python3
"""Run a topology as an emulated edge testbed on this machine.

    python tools/testbed.py up topologies/edge-5.yaml            # = flowspec up --emulate
    python tools/testbed.py up topologies/local.yaml --latency-ms 10 --bandwidth-mbit 50 --cpu-quota 0.5
    python tools/testbed.py cleanup                              # after a testbed was killed
    python tools/testbed.py link --listen 127.0.0.1:9000 --to 127.0.0.1:9001 --latency-ms 20

Each node runs as its own process with one compute thread, capped to a fraction of one
core (cgroup v1 or v2, as root; over a 4 ms CFS period, so that it is slow in short bursts
too); every link node -> successor goes through a proxy adding latency, jitter, a
bandwidth limit and stalls. Settings come from the topology's `testbed` section; the flags
override them for every link / node. Ctrl-C stops everything; see flowspec/testbed/ for
how it works.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowspec.cli import run_reporting  # noqa: E402
from flowspec.config import LinkSpec  # noqa: E402
from flowspec.errors import FlowSpecError  # noqa: E402
from flowspec.testbed import LinkProxy, cpu_cgroup_root, reclaim_stale  # noqa: E402
from flowspec.config import LinkSpec  # noqa: E402
from flowspec.testbed.cli import flag_type  # noqa: E402


def _cmd_cleanup(args: argparse.Namespace) -> int:
    root, why = cpu_cgroup_root()
    if root is None:
        print(f"nothing to clean: {why}")
        return 0
    removed = reclaim_stale(root)
    print(f"removed {len(removed)} stale cgroup(s)" + (f": {', '.join(removed)}" if removed else ""))
    return 0


def _cmd_link(args: argparse.Namespace) -> int:
    def addr(text: str) -> tuple[str, int]:
        host, _, port = text.rpartition(":")
        if not host or not port.isdigit():
            raise FlowSpecError(f"{text!r}: give an address as HOST:PORT")
        return host, int(port)

    link = LinkSpec(latency_ms=args.latency_ms or 0.0, jitter_ms=args.jitter_ms or 0.0,
                    bandwidth_mbit=args.bandwidth_mbit or None, stall_prob=args.stall_prob or 0.0,
                    stall_ms=args.stall_ms or 0.0)

    async def serve() -> None:
        proxy = LinkProxy(addr(args.listen), addr(args.to), link, f"{args.listen}->{args.to}")
        await proxy.start()
        print(f"emulated link {args.listen} -> {args.to}: {link}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await proxy.close()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


def main(argv: Sequence[str] | None = None, description: str | None = None) -> int:
    """tools/testbed.py: `up` (= flowspec up --emulate), `cleanup`, `link`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "up":
        from flowspec.cli import main as flowspec_main

        return flowspec_main(["up", *argv[1:], *([] if "--no-emulate" in argv else ["--emulate"])])
    p = argparse.ArgumentParser(prog="tools/testbed.py", description=description or __doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up", help="start a topology's nodes behind emulated links (flowspec up --emulate; "
                              "see `flowspec up -h` for the options)")
    c = sub.add_parser("cleanup", help="remove the cgroups and stop the nodes a killed testbed left behind")
    c.set_defaults(func=_cmd_cleanup)
    k = sub.add_parser("link", help="run one emulated link in the foreground (HOST:PORT -> HOST:PORT)")
    k.add_argument("--listen", required=True, help="HOST:PORT to accept on")
    k.add_argument("--to", required=True, help="HOST:PORT to forward to")
    k.add_argument("--latency-ms", type=flag_type(LinkSpec, "latency_ms"), default=0.0)
    k.add_argument("--jitter-ms", type=flag_type(LinkSpec, "jitter_ms"), default=0.0)
    k.add_argument("--bandwidth-mbit", type=flag_type(LinkSpec, "bandwidth_mbit", "unlimited"), default=0.0,
                   help="0: unlimited")
    k.add_argument("--stall-prob", type=flag_type(LinkSpec, "stall_prob"), default=0.0)
    k.add_argument("--stall-ms", type=flag_type(LinkSpec, "stall_ms"), default=0.0)
    k.set_defaults(func=_cmd_link)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_reporting("testbed", lambda: int(args.func(args)))


if __name__ == "__main__":
    sys.exit(main(description=__doc__))
