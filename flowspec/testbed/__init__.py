"""An emulated edge testbed on one machine: slow links between the nodes, CPU-capped nodes.

Every node of a topology runs as its own process (like :class:`LocalRing`), but

* each link ``pred -> node`` goes through a TCP proxy that adds latency, jitter, a
  bandwidth limit and loss-like stalls, byte-exact, in both directions (no root needed):
  the node listens on a private port and the proxy takes the node's port from the
  topology, so every node dials its successor through the emulated link without any
  change to the node code. Each node reads a derived topology (in the log folder) that
  differs from the original only in its own, private port;
* each node is capped to a fraction of one core and runs one compute thread. The cap is
  CFS bandwidth control in one group ``flowspec-<pid>-<node>`` per node: cgroup v1
  ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` under the v1 cpu controller (e.g.
  ``/sys/fs/cgroup/cpu``) where it is mounted, else cgroup v2 ``cpu.max`` under the
  unified hierarchy (``+cpu`` in its ``cgroup.subtree_control``); it needs root. The
  period is short (``testbed.cpu_period_ms``, default 4 ms, see :mod:`.cgroups`), so that
  a node is slow all the time, also in the short burst of one segment: over the kernel's
  100 ms period such a burst would run at full speed. The caps as the kernel applied them
  (read back: quota, period, the node's process in its group, throttling counts) are
  logged, shown by :meth:`Testbed.describe` and returned by :meth:`Testbed.cpu_report`
  (``flowspec bench`` writes it to its JSON as ``cpu_caps``); a cap that could not be
  applied is a warning that says what to do, and the node runs uncapped.

Settings come from the topology's ``testbed`` section, with command-line overrides
(:func:`add_testbed_args`). Everything is undone on stop, Ctrl-C or failure; the cgroups
of a testbed that was killed (SIGKILL) are reclaimed by the next start or by
``tools/testbed.py cleanup``. Clients of the ring should use :attr:`Testbed.client_topology`
(the source's private port); a client that dials the topology's source address is served
too, through the emulated link into the source.
"""

from .cgroups import DEFAULT_PERIOD_US, CpuGroup, cgroup_version, cpu_cgroup_root, period_for, reclaim_stale
from .cli import add_testbed_args, client_topology, local_ring_for, settings_from_args, wants_emulation
from .links import LinkProxy, LinkShaper, ProxyHub
from .ring import Testbed, describe, emulation_settings

__all__ = ["DEFAULT_PERIOD_US", "CpuGroup", "LinkProxy", "LinkShaper", "ProxyHub", "Testbed", "add_testbed_args",
           "cgroup_version", "client_topology", "cpu_cgroup_root", "describe", "emulation_settings", "local_ring_for",
           "period_for", "reclaim_stale", "settings_from_args", "wants_emulation"]
