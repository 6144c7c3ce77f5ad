"""CPU caps: one cgroup v1 cpu group per node (cpu.cfs_quota_us), and reclaiming stale groups."""

from __future__ import annotations

import errno
import logging
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import FlowSpecError

log = logging.getLogger(__name__)

CFS_PERIOD_US = 100_000  # cpu.cfs_period_us written to every group
MIN_QUOTA_US = 1_000  # the kernel refuses smaller quotas
GROUP_PREFIX = "flowspec-"  # cgroup folder names: flowspec-<testbed pid>-<node>
_GROUP_RE = re.compile(r"^flowspec-(\d+)-([A-Za-z0-9_-]+)$")


def cpu_cgroup_root(mounts: str = "/proc/mounts") -> tuple[Path | None, str]:
    """The cgroup v1 cpu controller's folder if this process may create groups in it, else
    (None, why not)."""
    root: Path | None = None
    try:
        for line in Path(mounts).read_text().splitlines():
            parts = line.split()
            if len(parts) >= 4 and parts[2] == "cgroup" and "cpu" in parts[3].split(","):
                root = Path(parts[1])
                break
    except OSError as e:
        return None, f"cannot read {mounts}: {e.strerror or e}"
    if root is None:
        return None, "no cgroup v1 cpu controller is mounted"
    if not (root / "cpu.cfs_quota_us").exists():
        return None, f"{root} has no cpu.cfs_quota_us (CFS bandwidth control is off)"
    if not os.access(root, os.W_OK):
        return None, f"{root} is not writable (CPU caps need root)"
    return root, ""


@dataclass
class CpuGroup:
    """One cgroup v1 cpu group capping the processes in it to a fraction of one core."""

    path: Path  # the group's folder
    quota: float  # fraction of one core

    @classmethod
    def create(cls, root: Path, owner: int, node: str, quota: float) -> "CpuGroup":
        path = root / f"{GROUP_PREFIX}{owner}-{node}"
        try:
            path.mkdir()
        except FileExistsError:
            if _group_pids(path):
                raise FlowSpecError(f"cgroup {path} is in use by another testbed of this process") from None
        g = cls(path, quota)
        g._write("cpu.cfs_period_us", CFS_PERIOD_US)
        g._write("cpu.cfs_quota_us", max(MIN_QUOTA_US, int(round(quota * CFS_PERIOD_US))))
        return g

    def _write(self, leaf: str, value: int) -> None:
        (self.path / leaf).write_text(f"{value}\n")

    def add(self, pid: int) -> None:
        """Move a process (all its threads) into the group."""
        self._write("cgroup.procs", pid)

    def pids(self) -> list[int]:
        return _group_pids(self.path)

    def remove(self, timeout: float = 3.0) -> bool:
        """rmdir the group once its processes are gone; False when it is still busy."""
        return _rmdir_group(self.path, timeout)


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
