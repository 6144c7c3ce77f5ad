"""Command-line side of the testbed: shared flags, choosing the ring, and tools/testbed.py."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any, Sequence

from ..config import LinkSpec, TestbedSpec, Topology
from ..errors import FlowSpecError
from ..runtime.launcher import LocalRing
from .cgroups import cpu_cgroup_root, reclaim_stale
from .links import LinkProxy
from .ring import Testbed, emulation_settings

log = logging.getLogger(__name__)


def _non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text!r}")
    return v


def _probability(text: str) -> float:
    v = _non_negative(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), not {text!r}")
    return v


def _quota(text: str) -> float:
    v = _non_negative(text)
    if v > 16:
        raise argparse.ArgumentTypeError(f"must be at most 16 cores, not {text!r}")
    return v


def add_testbed_args(p: argparse.ArgumentParser) -> None:
    """--emulate / --no-emulate and the link / CPU overrides (shared by `up`, `bench`, tools/testbed.py)."""
    g = p.add_argument_group("testbed (emulated links and CPU caps)")
    g.add_argument("--emulate", action=argparse.BooleanOptionalAction, default=None,
                   help="emulate the topology's testbed section (default: when it has one)")
    g.add_argument("--latency-ms", type=_non_negative, default=None, help="one-way latency of every link")
    g.add_argument("--jitter-ms", type=_non_negative, default=None, help="uniform extra delay up to this")
    g.add_argument("--bandwidth-mbit", type=_non_negative, default=None,
                   help="rate of every link in Mbit/s (0: unlimited)")
    g.add_argument("--stall-prob", type=_probability, default=None, help="probability a chunk stalls")
    g.add_argument("--stall-ms", type=_non_negative, default=None, help="duration of a stall")
    g.add_argument("--cpu-quota", type=_quota, default=None,
                   help="cores per node, e.g. 0.35 (0: uncapped); overrides testbed.cpus")


_OVERRIDES = ("latency_ms", "jitter_ms", "bandwidth_mbit", "stall_prob", "stall_ms", "cpu_quota")


def wants_emulation(topo: Topology, args: argparse.Namespace) -> bool:
    flag = getattr(args, "emulate", None)
    if flag is not None:
        return bool(flag)
    overrides = any(getattr(args, k, None) is not None for k in _OVERRIDES)
    return topo.testbed is not None or overrides


def settings_from_args(topo: Topology, args: argparse.Namespace) -> TestbedSpec:
    kw = {k: getattr(args, k, None) for k in _OVERRIDES}
    return emulation_settings(topo, threads=getattr(args, "threads", None) or None, **kw)


def local_ring_for(args: argparse.Namespace, topo: Topology, node_args: list[str],
                   extra_env: dict[str, str] | None = None) -> LocalRing:
    """A Testbed when emulation is wanted (see wants_emulation), else a plain LocalRing."""
    threads = getattr(args, "threads", None) or None
    if wants_emulation(topo, args):
        return Testbed(args.topology, topo, settings_from_args(topo, args), node_args, extra_env=extra_env)
    return LocalRing(args.topology, topo, node_args, threads=threads, extra_env=extra_env)


def client_topology(ring: Any, topo: Topology) -> Topology:
    """The topology clients of this ring should use (the testbed's private source port)."""
    return ring.client_topology if isinstance(ring, Testbed) else topo


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
        from ..cli import main as flowspec_main

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
    k.add_argument("--latency-ms", type=_non_negative, default=0.0)
    k.add_argument("--jitter-ms", type=_non_negative, default=0.0)
    k.add_argument("--bandwidth-mbit", type=_non_negative, default=0.0, help="0: unlimited")
    k.add_argument("--stall-prob", type=_probability, default=0.0)
    k.add_argument("--stall-ms", type=_non_negative, default=0.0)
    k.set_defaults(func=_cmd_link)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except FlowSpecError as e:
        print(f"testbed: error: {e}", file=sys.stderr)
        return 2
