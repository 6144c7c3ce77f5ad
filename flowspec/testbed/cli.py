"""Command-line side of the testbed: shared flags and choosing the ring (tools/testbed.py is the front end)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ..config import CPU_PERIOD_MS_RANGE, TestbedSpec, Topology
from ..runtime.launcher import LocalRing
from .cgroups import DEFAULT_PERIOD_US
from .ring import Testbed, emulation_settings

log = logging.getLogger(__name__)


def non_negative(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, not {text!r}") from None
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, not {text!r}")
    return v


def probability(text: str) -> float:
    v = non_negative(text)
    if v >= 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), not {text!r}")
    return v


def _quota(text: str) -> float:
    v = non_negative(text)
    if v > 16:
        raise argparse.ArgumentTypeError(f"must be at most 16 cores, not {text!r}")
    return v


def _period_ms(text: str) -> float:
    v = non_negative(text)
    lo, hi = CPU_PERIOD_MS_RANGE
    if not lo <= v <= hi:
        raise argparse.ArgumentTypeError(f"must be from {lo:g} to {hi:g} ms, not {text!r}")
    return v


def add_testbed_args(p: argparse.ArgumentParser) -> None:
    """--emulate / --no-emulate and the link / CPU overrides (shared by `up`, `bench`, tools/testbed.py)."""
    g = p.add_argument_group("testbed (emulated links and CPU caps)")
    g.add_argument("--emulate", action=argparse.BooleanOptionalAction, default=None,
                   help="emulate the topology's testbed section (default: when it has one)")
    g.add_argument("--latency-ms", type=non_negative, default=None, help="one-way latency of every link")
    g.add_argument("--jitter-ms", type=non_negative, default=None, help="uniform extra delay up to this")
    g.add_argument("--bandwidth-mbit", type=non_negative, default=None,
                   help="rate of every link in Mbit/s (0: unlimited)")
    g.add_argument("--stall-prob", type=probability, default=None, help="probability a chunk stalls")
    g.add_argument("--stall-ms", type=non_negative, default=None, help="duration of a stall")
    g.add_argument("--cpu-quota", type=_quota, default=None,
                   help="cores per node, e.g. 0.35 (0: uncapped); overrides testbed.cpus")
    g.add_argument("--cpu-period-ms", type=_period_ms, default=None,
                   help=f"CFS period of the CPU caps (default: testbed.cpu_period_ms, else "
                        f"{DEFAULT_PERIOD_US / 1000:g} ms; short, so that short bursts of work are slowed too)")


_OVERRIDES = ("latency_ms", "jitter_ms", "bandwidth_mbit", "stall_prob", "stall_ms", "cpu_quota", "cpu_period_ms")


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
