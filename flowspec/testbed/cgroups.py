"""CPU caps: one cgroup per node that holds it to a fraction of one core, and reclaiming stale groups.

A cap is CFS bandwidth control: a budget of ``quota * period`` CPU time per ``period``,
written as cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` where the v1 cpu
controller is mounted, else as cgroup v2 ``cpu.max`` (``"QUOTA PERIOD"``, in a group under
the unified hierarchy, with ``+cpu`` in the parent's ``cgroup.subtree_control``).

The period decides what the cap emulates. A node works in short bursts (a ring trip's
segment costs a few ms to ~25 ms) separated by idle waits. Over a long period (the kernel's
default, 100 ms) such a burst never spends its budget: it runs at full speed, and the cap
only limits the node's average load (a fast device with a duty limit). A slow device is
slow all the time, so the period must be short against one burst: then every burst is
throttled within a few ms of its start and takes about ``1/quota`` times its uncapped time,
as on a device of that speed. The period cannot be arbitrarily short: the kernel wants a
quota of at least 1 ms per period (so ``period >= 1 ms / quota``), and it enforces the
budget at the scheduler tick (4 ms at HZ=250), so periods shorter than a tick let a node
overrun its budget. :data:`DEFAULT_PERIOD_US` is the period that measured best here (see
its comment and tests/test_testbed.py's calibration); ``testbed.cpu_period_ms`` in the
topology overrides it.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import FlowSpecError

log = logging.getLogger(__name__)

# The CFS period of every cap (lengthened to 1 ms / quota for quotas under 0.25). Measured
# on a 2-core KVM guest (HZ=250) by tests/test_testbed.py's calibration (an 8-layer stage
# of the default model per process, one-token steps of ~11 ms uncapped, 2-9 runs each) as
# (capped / uncapped step time) x quota, 1.0 being a device of exactly that speed:
#   quota  period   isolated steps   back-to-back steps
#   0.35   100 ms   0.34-0.36        0.29-0.38   (the old period: a short burst is never capped)
#   0.35    10 ms   0.57-0.77        1.05-1.22   (the first 3.5 ms of every burst run free)
#   0.35     5 ms   0.75-0.98        1.18-1.36
#   0.35     4 ms   0.88-1.18        0.88-1.51   (best: the shortest period at or above the tick)
#   0.35     3 ms   0.63-1.33        1.15-1.48   (below the 4 ms tick the budget is policed erratically)
#   0.5      4 ms   1.00-1.01        1.06-1.19
#   0.5      2 ms   1.35-1.37        1.29-1.58
# Values above 1: a throttled process's caches go cold, so on this VM a capped step also
# costs 1.1-1.35x (isolated) and 1.2-1.55x (back to back) the CPU time of an uncapped one.
# The budget is policed at the scheduler tick, so on a kernel with a longer tick (HZ=100:
# 10 ms) set testbed.cpu_period_ms to at least the tick.
DEFAULT_PERIOD_US = 4_000
MIN_QUOTA_US = 1_000  # the kernel refuses smaller quotas (cgroup v1 and v2)
MIN_PERIOD_US = 1_000  # the kernel's bounds of the period
MAX_PERIOD_US = 1_000_000
GROUP_PREFIX = "flowspec-"  # cgroup folder names: flowspec-<testbed pid>-<node>
_GROUP_RE = re.compile(r"^flowspec-(\d+)-([A-Za-z0-9_-]+)$")

V1 = "v1"
V2 = "v2"
HOW_TO_CAP = ("run the testbed as root on Linux with the cgroup v1 cpu controller mounted (with CFS "
              "bandwidth control) or a cgroup v2 hierarchy that offers the cpu controller")


def cgroup_version(root: Path) -> str:
    """V2 for a folder of the unified (cgroup2) hierarchy, else V1 (a v1 cpu controller folder)."""
    return V2 if (Path(root) / "cgroup.controllers").exists() else V1


def _mounts(mounts: str) -> list[tuple[str, str, list[str]]]:
    """(mount point, fs type, options) of every cgroup mount in a /proc/mounts-style file."""
    out = []
    for line in Path(mounts).read_text().splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
            out.append((parts[1].replace("\\040", " "), parts[2], parts[3].split(",")))
    return out


def cpu_cgroup_root(mounts: str = "/proc/mounts") -> tuple[Path | None, str]:
    """The folder in which CPU-cap groups are created if this process may do so, else (None, why not).

    The cgroup v1 cpu controller's folder where it is mounted (it then owns the cpu
    controller: v2 cannot have it too), else the root of the cgroup v2 hierarchy when that
    offers the cpu controller. :func:`cgroup_version` tells the two apart."""
    try:
        found = _mounts(mounts)
    except OSError as e:
        return None, f"cannot read {mounts}: {e.strerror or e}"
    v1 = next((Path(p) for p, fs, opts in found if fs == "cgroup" and "cpu" in opts), None)
    if v1 is not None:
        if not (v1 / "cpu.cfs_quota_us").exists():
            return None, f"{v1} has no cpu.cfs_quota_us (CFS bandwidth control is off in this kernel)"
        if not os.access(v1, os.W_OK):
            return None, f"{v1} is not writable (CPU caps need root)"
        return v1, ""
    v2 = next((Path(p) for p, fs, _ in found if fs == "cgroup2"), None)
    if v2 is None:
        return None, "neither a cgroup v1 cpu controller nor a cgroup v2 hierarchy is mounted"
    try:
        controllers = (v2 / "cgroup.controllers").read_text().split()
    except OSError as e:
        return None, f"cannot read {v2 / 'cgroup.controllers'}: {e.strerror or e}"
    if "cpu" not in controllers:
        return None, (f"the cgroup v2 hierarchy at {v2} does not offer the cpu controller (cgroup.controllers: "
                      f"{' '.join(controllers) or 'empty'}; on a hybrid system it may be bound to v1 elsewhere)")
    if not os.access(v2, os.W_OK):
        return None, f"{v2} is not writable (CPU caps need root)"
    return v2, ""


def period_for(quota: float, period_us: int | None = None) -> int:
    """The CFS period for a cap of `quota` cores: `period_us` (default :data:`DEFAULT_PERIOD_US`),
    lengthened where needed so that the quota per period is at least the kernel's 1 ms."""
    if not quota > 0:
        raise ValueError(f"quota must be > 0 cores, not {quota!r}")
    p = DEFAULT_PERIOD_US if period_us is None else int(period_us)
    p = max(p, math.ceil(MIN_QUOTA_US / quota))
    return min(max(p, MIN_PERIOD_US), MAX_PERIOD_US)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text) if text is not None else None
    except ValueError:
        return None


@dataclass
class CpuGroup:
    """One cgroup capping the processes in it to a fraction of one core (cgroup v1 or v2)."""

    path: Path  # the group's folder
    quota: float  # fraction of one core asked for
    version: str = V1  # V1 or V2 (the hierarchy the group lives in)
    period_us: int = DEFAULT_PERIOD_US  # the CFS period written

    @classmethod
    def create(cls, root: Path, owner: int, node: str, quota: float, period_us: int | None = None) -> "CpuGroup":
        """Make (or reuse an empty) group ``root/flowspec-<owner>-<node>`` and write the cap.

        OSError when the kernel refuses a step (the caller warns and runs the node uncapped)."""
        root = Path(root)
        version = cgroup_version(root)
        period = period_for(quota, period_us)
        quota_us = max(MIN_QUOTA_US, int(round(quota * period)))
        if version == V2:
            _enable_cpu_controller(root)
        path = root / f"{GROUP_PREFIX}{owner}-{node}"
        try:
            path.mkdir()
        except FileExistsError:
            if _group_pids(path):
                raise FlowSpecError(f"cgroup {path} is in use by another testbed of this process") from None
        g = cls(path, quota, version, period)
        if version == V2:
            g._write("cpu.max", f"{quota_us} {period}")
            if (path / "cpu.max.burst").exists():
                g._write("cpu.max.burst", 0)  # no budget saved up while idle: bursts stay slow
        else:
            g._write("cpu.cfs_period_us", period)
            g._write("cpu.cfs_quota_us", quota_us)
            if (path / "cpu.cfs_burst_us").exists():
                g._write("cpu.cfs_burst_us", 0)
        return g

    def _write(self, leaf: str, value: int | str) -> None:
        (self.path / leaf).write_text(f"{value}\n")

    def add(self, pid: int) -> None:
        """Move a process (all its threads) into the group."""
        self._write("cgroup.procs", pid)

    def pids(self) -> list[int]:
        return _group_pids(self.path)

    def applied(self) -> dict[str, Any]:
        """The cap as the kernel holds it, read back from the group's files: quota_us (None:
        unlimited), period_us, cores (quota / period), burst_us, and the pids in the group."""
        if self.version == V2:
            parts = (_read(self.path / "cpu.max") or "").split()
            quota_us = None if not parts or parts[0] == "max" else _int(parts[0])
            period = _int(parts[1]) if len(parts) > 1 else None
            burst = _int(_read(self.path / "cpu.max.burst"))
        else:
            q = _int(_read(self.path / "cpu.cfs_quota_us"))
            quota_us = None if q is None or q < 0 else q
            period = _int(_read(self.path / "cpu.cfs_period_us"))
            burst = _int(_read(self.path / "cpu.cfs_burst_us"))
        cores = round(quota_us / period, 4) if quota_us is not None and period else None
        return {"cgroup": self.version, "group": str(self.path), "quota_us": quota_us, "period_us": period,
                "cores": cores, "burst_us": burst, "pids": self.pids()}

    def stats(self) -> dict[str, Any]:
        """Throttling so far, from cpu.stat: periods, throttled_periods, throttled_s (None where unreadable)."""
        text = _read(self.path / "cpu.stat")
        if text is None:
            return {"periods": None, "throttled_periods": None, "throttled_s": None}
        st = {k: _int(v) for k, v in (line.split(None, 1) for line in text.splitlines() if " " in line)}
        ns = st.get("throttled_time")  # v1: ns
        us = st.get("throttled_usec")  # v2: us
        throttled = ns / 1e9 if ns is not None else (us / 1e6 if us is not None else None)
        return {"periods": st.get("nr_periods"), "throttled_periods": st.get("nr_throttled"),
                "throttled_s": None if throttled is None else round(throttled, 3)}

    def remove(self, timeout: float = 3.0) -> bool:
        """rmdir the group once its processes are gone; False when it is still busy."""
        return _rmdir_group(self.path, timeout)


def _enable_cpu_controller(root: Path) -> None:
    """cgroup v2: make the cpu controller available to root's child groups (``+cpu`` in its
    cgroup.subtree_control); OSError with what to do when the kernel refuses."""
    ctl = root / "cgroup.subtree_control"
    if "cpu" in (_read(ctl) or "").split():
        return
    try:
        ctl.write_text("+cpu\n")
    except OSError as e:
        hint = (" (a non-root cgroup that holds processes cannot hand controllers to children: "
                "run in a delegated cgroup, or move its processes into a child group first)"
                if e.errno in (errno.EBUSY, errno.ENOTSUP, errno.EOPNOTSUPP) else "")
        raise OSError(e.errno, f"cannot enable the cpu controller in {ctl}: {e.strerror or e}{hint}") from None


def _group_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def _rmdir_group(path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as e:
            if e.errno != errno.EBUSY or time.monotonic() > deadline:
                log.warning("could not remove cgroup %s: %s", path, e.strerror or e)
                return False
        time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_flowspec_node(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"flowspec.cli" in argv and b"node" in argv


def reclaim_stale(root: Path, timeout: float = 5.0) -> list[str]:
    """Remove the groups of testbeds that no longer run (killed): their leftover node
    processes are stopped (SIGTERM, then SIGKILL), other processes moved out. Returns the
    removed groups' names."""
    stale: list[Path] = []
    for p in sorted(root.glob(f"{GROUP_PREFIX}*")):
        m = _GROUP_RE.match(p.name)
        if m and p.is_dir() and not _pid_alive(int(m.group(1))):
            stale.append(p)
    if not stale:
        return []
    nodes: list[int] = []
    for p in stale:
        for pid in _group_pids(p):
            if _is_flowspec_node(pid):
                nodes.append(pid)
            else:  # not ours to stop: move it out so the group can go
                try:
                    (root / "cgroup.procs").write_text(f"{pid}\n")
                except OSError:
                    pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in nodes:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while any(_pid_alive(pid) and not _is_zombie(pid) for pid in nodes) and time.monotonic() < deadline:
            time.sleep(0.05)
        nodes = [pid for pid in nodes if _pid_alive(pid) and not _is_zombie(pid)]
        if not nodes:
            break
        log.warning("stale testbed nodes %s did not stop on SIGTERM; killing them", nodes)
    removed = [p.name for p in stale if _rmdir_group(p, timeout)]
    if removed:
        log.warning("removed %d cgroup(s) left by a testbed that was killed: %s", len(removed),
                    ", ".join(removed))
    return removed


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False
