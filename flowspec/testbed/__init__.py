"""An emulated edge testbed on one machine: slow links between the nodes, CPU-capped nodes.

Every node of a topology runs as its own process (like :class:`LocalRing`), but

* each link ``pred -> node`` goes through a TCP proxy that adds latency, jitter, a
  bandwidth limit and loss-like stalls, byte-exact, in both directions (no root needed):
  the node listens on a private port and the proxy takes the node's port from the
  topology, so every node dials its successor through the emulated link without any
  change to the node code. Each node reads a derived topology (in the log folder) that
  differs from the original only in its own, private port;
* each node is capped to a fraction of one core (cgroup v1 ``cpu.cfs_quota_us``, one
  group ``/sys/fs/cgroup/cpu/flowspec-<pid>-<node>`` per node; needs root, else a warning
  and no cap) and runs one compute thread.

Settings come from the topology's ``testbed`` section, with command-line overrides
(:func:`add_testbed_args`). Everything is undone on stop, Ctrl-C or failure; the cgroups
of a testbed that was killed (SIGKILL) are reclaimed by the next start or by
``tools/testbed.py cleanup``. Clients of the ring should use :attr:`Testbed.client_topology`
(the source's private port); a client that dials the topology's source address is served
too, through the emulated link into the source.
"""

from .cgroups import CpuGroup, cpu_cgroup_root, reclaim_stale
from .cli import add_testbed_args, client_topology, local_ring_for, settings_from_args, wants_emulation
from .links import LinkProxy, LinkShaper, ProxyHub
from .ring import Testbed, describe, emulation_settings

__all__ = ["CpuGroup", "LinkProxy", "LinkShaper", "ProxyHub", "Testbed", "add_testbed_args", "client_topology",
           "cpu_cgroup_root", "describe", "emulation_settings", "local_ring_for", "reclaim_stale",
           "settings_from_args", "wants_emulation"]
