"""Command-line side of the testbed: shared flags and choosing the ring (tools/testbed.py is the front end)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import Any, Callable

from ..config import LinkSpec, TestbedSpec, Topology
from ..speculative.bounds import FieldError, rule_of
from ..runtime.launcher import LocalRing
from .cgroups import DEFAULT_PERIOD_US
from .ring import Testbed, emulation_settings

log = logging.getLogger(__name__)


def flag_type(cls: type, name: str, zero: str = "") -> Callable[[str], float]:
    """An argparse type that reads a number by the rule the topology declares on field `name`
    of `cls` (the same bounds, said the same way); `zero`, when given, says what 0 means on
    the command line (where the file would say null)."""
    rule = rule_of(cls, name)
    if getattr(rule, "null", ""):
        rule = dataclasses.replace(rule, null="")  # no null on a command line
    allowed = rule.allowed + (f", or 0 ({zero})" if zero else "")

    def read(text: str) -> float:
        try:
            v = float(text)
            return 0.0 if zero and v == 0 else float(rule.read(v))
        except (ValueError, FieldError):
            raise argparse.ArgumentTypeError(f"must be {allowed}, not {text!r}") from None

    return read


def add_testbed_args(p: argparse.ArgumentParser) -> None:
    """--emulate / --no-emulate and the link / CPU overrides (shared by `up`, `bench`, tools/testbed.py)."""
    g = p.add_argument_group("testbed (emulated links and CPU caps)")
    g.add_argument("--emulate", action=argparse.BooleanOptionalAction, default=None,
                   help="emulate the topology's testbed section (default: when it has one)")
    g.add_argument("--latency-ms", type=flag_type(LinkSpec, "latency_ms"), default=None,
                   help="one-way latency of every link")
    g.add_argument("--jitter-ms", type=flag_type(LinkSpec, "jitter_ms"), default=None,
                   help="uniform extra delay up to this")
    g.add_argument("--bandwidth-mbit", type=flag_type(LinkSpec, "bandwidth_mbit", "unlimited"), default=None,
                   help="rate of every link in Mbit/s (0: unlimited)")
    g.add_argument("--stall-prob", type=flag_type(LinkSpec, "stall_prob"), default=None,
                   help="probability a chunk stalls")
    g.add_argument("--stall-ms", type=flag_type(LinkSpec, "stall_ms"), default=None,
                   help="duration of a stall")
    g.add_argument("--cpu-quota", type=flag_type(TestbedSpec, "cpu_quota", "uncapped"), default=None,
                   help="cores per node, e.g. 0.35 (0: uncapped); overrides testbed.cpus")
    g.add_argument("--cpu-period-ms", type=flag_type(TestbedSpec, "cpu_period_ms"), default=None,
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
