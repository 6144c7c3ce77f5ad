"""The testbed ring: every node of a topology behind emulated links and CPU caps."""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import socket
from pathlib import Path
from typing import Any

import yaml

from ..config import LinkSpec, NodeSpec, TestbedSpec, Topology
from ..errors import FlowSpecError
from ..runtime.launcher import LocalRing, NodeProcess, check_ports_free
from .cgroups import HOW_TO_CAP, CpuGroup, cgroup_version, cpu_cgroup_root, period_for, reclaim_stale
from .links import LinkProxy, ProxyHub

log = logging.getLogger(__name__)


# ========================================================================= settings
def emulation_settings(topo: Topology, *, latency_ms: float | None = None, jitter_ms: float | None = None,
                       bandwidth_mbit: float | None = None, stall_prob: float | None = None,
                       stall_ms: float | None = None, cpu_quota: float | None = None,
                       threads: int | None = None, cpu_period_ms: float | None = None) -> TestbedSpec:
    """The topology's testbed (or the defaults) with overrides applied to every link / node.

    bandwidth_mbit 0 means unlimited, cpu_quota 0 uncapped; None leaves a setting as it is."""
    base = topo.testbed or TestbedSpec()
    link_kw: dict[str, Any] = {k: v for k, v in (("latency_ms", latency_ms), ("jitter_ms", jitter_ms),
                                                 ("stall_prob", stall_prob), ("stall_ms", stall_ms))
                               if v is not None}
    if bandwidth_mbit is not None:
        link_kw["bandwidth_mbit"] = bandwidth_mbit or None

    def over(link: LinkSpec) -> LinkSpec:
        return dataclasses.replace(link, **link_kw)

    out = dataclasses.replace(base, link=over(base.link), links={k: over(v) for k, v in base.links.items()})
    if cpu_quota is not None:
        out = dataclasses.replace(out, cpu_quota=cpu_quota or None, cpus={})
    if threads:
        out = dataclasses.replace(out, threads=threads)
    if cpu_period_ms is not None:
        out = dataclasses.replace(out, cpu_period_ms=cpu_period_ms)
    return out


def _link_of(settings: TestbedSpec, topo: Topology, src: str) -> LinkSpec:
    return settings.links.get((src, topo.successor(src).name), settings.link)


def _cpu_of(settings: TestbedSpec, name: str) -> float | None:
    return settings.cpus.get(name, settings.cpu_quota)


def _period_us(settings: TestbedSpec) -> int | None:
    """The configured CFS period in us (None: cgroups.DEFAULT_PERIOD_US)."""
    return None if settings.cpu_period_ms is None else int(round(settings.cpu_period_ms * 1000))


def describe(settings: TestbedSpec, topo: Topology) -> list[str]:
    """One line per link and the CPU caps, for the console."""
    lines = []
    for n in topo.nodes:
        ln = _link_of(settings, topo, n.name)
        bw = f"{ln.bandwidth_mbit:g} Mbit/s" if ln.bandwidth_mbit else "unlimited"
        extra = f", jitter {ln.jitter_ms:g} ms" if ln.jitter_ms else ""
        if ln.stall_prob:
            extra += f", stalls {ln.stall_ms:g} ms with p={ln.stall_prob:g}"
        lines.append(f"link {n.name}->{topo.successor(n.name).name}: {ln.latency_ms:g} ms, {bw}{extra}")
    caps = {n.name: _cpu_of(settings, n.name) for n in topo.nodes}
    periods = sorted({period_for(v, _period_us(settings)) for v in caps.values() if v is not None})
    period = f" (CFS period {'/'.join(f'{p / 1000:g}' for p in periods)} ms)" if periods else ""
    lines.append("cpu: " + ", ".join(f"{k} {'uncapped' if v is None else f'{v:g} core'}" for k, v in caps.items())
                 + f"{period}; {settings.threads} thread(s) per node")
    return lines


# =========================================================================== testbed
def _free_ports(host: str, n: int, avoid: set[int]) -> list[int]:
    """n distinct ports free on host a moment ago, none of them in avoid (held together, then released)."""
    socks = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
            port = int(s.getsockname()[1])
            if port not in avoid:
                ports.append(port)
        return ports
    finally:
        for s in socks:
            s.close()


def _with_port(topo: Topology, name: str, port: int) -> Topology:
    nodes = tuple(dataclasses.replace(n, port=port) if n.name == name else n for n in topo.nodes)
    return dataclasses.replace(topo, nodes=nodes)


class Testbed(LocalRing):
    """Every node of a topology on this machine, behind emulated links and CPU caps.

    Used like LocalRing (start / check_alive / stop / context manager, ``key``); clients
    connect with :attr:`client_topology`."""

    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, topo_path: str, topo: Topology, settings: TestbedSpec | None = None,
                 node_args: list[str] | None = None, log_dir: str | None = None,
                 extra_env: dict[str, str] | None = None, cgroup_root: Path | None | str = "auto",
                 seed: int | None = None) -> None:
        self.settings = settings or emulation_settings(topo)  # links, caps, threads in effect
        super().__init__(topo_path, topo, node_args, threads=self.settings.threads, log_dir=log_dir,
                         extra_env=extra_env)
        remote = [n.name for n in topo.nodes if n not in self.local]
        if remote:
            raise FlowSpecError(f"{topo.origin}: the testbed runs every node on this machine, but "
                                f"{', '.join(remote)} live(s) elsewhere; use 127.0.0.1 hosts")
        self.cgroup_root = cgroup_root  # "auto": find the cpu controller; None: no caps
        self.hub = ProxyHub()  # the emulated links
        self.groups: dict[str, CpuGroup] = {}  # node -> its CPU cap
        self.caps: dict[str, dict[str, Any]] = {}  # node -> its cap as applied (see cpu_report)
        self.cap_warnings: list[str] = []  # what could not be capped, and what to do
        self._cgroup_kind: str | None = None  # "cgroup v1" / "cgroup v2" once caps are made
        self._no_caps_why = ""  # why there is no cgroup root, when there is none
        self.private: dict[str, int] = {}  # node -> the port it really listens on
        self.paths: dict[str, Path] = {}  # node -> its derived topology file
        self._rng = random.Random(seed)  # seeds of the links' jitter and stalls
        self.env.setdefault("OMP_NUM_THREADS", str(self.threads))

    @property
    def client_topology(self) -> Topology:
        """The topology as a client sees it: the source at its private port (no emulated link)."""
        src = self.topo.source.name
        return _with_port(self.topo, src, self.private[src]) if src in self.private else self.topo

    def describe(self) -> list[str]:
        """The settings (see :func:`describe`); once started, also the CPU caps as applied."""
        lines = describe(self.settings, self.topo)
        if self.caps:
            lines.append("cpu caps applied: " + ", ".join(f"{n} {_cap_text(c)}" for n, c in self.caps.items()))
        lines += [f"WARNING: {w}" for w in self.cap_warnings]
        return lines

    def cpu_report(self) -> dict[str, Any]:
        """The CPU caps as the kernel applied them, per node (for the bench JSON): wanted
        (cores asked for, None: uncapped by the settings), capped (the node's process is in
        its group with a quota), quota_us / period_us / cores / burst_us read back from the
        group's files, the group's throttling (periods, throttled_periods, throttled_s, as
        of the stop, or of now while running), and why a cap is missing. all_applied is
        False when a wanted cap is missing; warnings say what to do."""
        for name, g in self.groups.items():  # throttling so far, while the groups exist
            if name in self.caps:
                self.caps[name].update(g.stats())
        applied = all(c["capped"] or c["wanted"] is None for c in self.caps.values())
        return {"mechanism": self._cgroup_kind, "all_applied": applied and not self.cap_warnings,
                "warnings": list(self.cap_warnings), "nodes": {k: dict(v) for k, v in self.caps.items()}}

    def _warn_cap(self, text: str) -> None:
        self.cap_warnings.append(text)
        log.warning("testbed: %s", text)

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        # the proxies take the topology's ports, the source its API port: fail before starting anything
        check_ports_free(self.topo, [n.name for n in self.topo.nodes], self.serves_api)
        self.caps, self.cap_warnings = {}, []
        root = self._cgroups()
        nodes = self.topo.nodes
        taken = {m.port for m in nodes} | {self.topo.api.port}  # the proxies and the API take these
        for host in {n.host for n in nodes}:
            on_host = [n for n in nodes if n.host == host]
            for n, port in zip(on_host, _free_ports(host, len(on_host), taken)):
                self.private[n.name] = port
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for n in nodes:
            self.paths[n.name] = self._write_topology(n)
        self.hub.start()
        for n in nodes:
            pred = self.topo.predecessor(n.name)
            link = _link_of(self.settings, self.topo, pred.name)
            self.hub.add(LinkProxy((n.host, n.port), (n.host, self.private[n.name]), link,
                                   f"{pred.name}->{n.name}", random.Random(self._rng.getrandbits(64))))
        for n in nodes:
            quota = _cpu_of(self.settings, n.name)
            self.caps[n.name] = {"wanted": quota, "capped": False,
                                 "reason": "uncapped by the settings" if quota is None else self._no_caps_why or None}
            if root is None or quota is None:
                continue
            try:
                self.groups[n.name] = CpuGroup.create(root, os.getpid(), n.name, quota, _period_us(self.settings))
            except OSError as e:
                self.caps[n.name]["reason"] = f"cannot create its cgroup: {e.strerror or e}"
                self._warn_cap(f"cannot cap {n.name} to {quota:g} core ({e.strerror or e}); it runs UNCAPPED, at "
                               f"full speed: {HOW_TO_CAP}, or run with --cpu-quota 0 to say so")
        for n in nodes:
            self._spawn(n)
        log.info("testbed: %d nodes behind emulated links; logs in %s", len(self.procs), self.log_dir)
        for line in self.describe():
            if not line.startswith("WARNING"):  # the warnings were logged as they came
                log.info("testbed: %s", line)

    def _cgroups(self) -> Path | None:
        wanted = [n.name for n in self.topo.nodes if _cpu_of(self.settings, n.name) is not None]
        if self.cgroup_root is None:  # the caller switched the caps off: no warning
            self._no_caps_why = "CPU caps are switched off for this testbed (cgroup_root=None)"
            return None
        if self.cgroup_root == "auto":
            root, why = cpu_cgroup_root()
        else:
            root, why = Path(self.cgroup_root), ""
        if root is not None:
            reclaim_stale(root)
            self._cgroup_kind = f"cgroup {cgroup_version(root)}"
        if wanted and root is None:
            self._no_caps_why = f"cannot cap CPU: {why}"
            self._warn_cap(f"cannot cap CPU ({why}): {', '.join(wanted)} run UNCAPPED, at full speed, so the ring "
                           f"does not emulate slow devices; {HOW_TO_CAP}, or run with --cpu-quota 0 to say so")
        return root if wanted else None

    def _write_topology(self, n: NodeSpec) -> Path:
        data = _with_port(self.topo, n.name, self.private[n.name]).to_dict()
        data.pop("testbed", None)
        path = self.log_dir / f"{n.name}.topology.yaml"
        head = (f"# derived by the flowspec testbed from {self.topo.origin}: node {n.name} listens on "
                f"port {self.private[n.name]}\n# behind the emulated link on port {n.port}\n")
        path.write_text(head + yaml.safe_dump(data, sort_keys=False))
        return path

    def _start_node(self, name: str) -> NodeProcess:
        """A restart: the node's derived topology, its log appended to, back into its cgroup."""
        self._spawn(self.topo.node(name), append=True)
        return self.procs[-1]

    def _spawn(self, n: NodeSpec, append: bool = False) -> None:
        p = self.spawn(n.name, str(self.paths[n.name]), append).proc
        group = self.groups.get(n.name)
        if group is None:
            return
        cap = self.caps[n.name]
        try:
            group.add(p.pid)
        except OSError as e:
            cap["reason"] = f"cannot move its process into {group.path}: {e.strerror or e}"
            self._warn_cap(f"cannot cap {n.name} ({e.strerror or e}); it runs UNCAPPED, at full speed")
            return
        got = group.applied()
        cap.update({k: got[k] for k in ("cgroup", "group", "quota_us", "period_us", "cores", "burst_us")})
        cap["pid"] = p.pid
        problems = []
        if p.pid not in got["pids"]:
            problems.append(f"its process {p.pid} is not in {group.path}")
        if got["quota_us"] is None:
            problems.append(f"{group.path} has no quota")
        elif got["cores"] is not None and abs(got["cores"] - group.quota) > max(0.01, 0.05 * group.quota):
            problems.append(f"the kernel holds {got['quota_us']}/{got['period_us']} us = {got['cores']:g} core, "
                            f"not {group.quota:g}")
        if got["period_us"] != group.period_us:
            problems.append(f"the kernel holds a period of {got['period_us']} us, not {group.period_us}")
        if got["burst_us"]:
            problems.append(f"{group.path} allows a burst of {got['burst_us']} us: idle time saves up budget")
        cap["capped"] = got["quota_us"] is not None and p.pid in got["pids"]
        if problems:
            cap["reason"] = "; ".join(problems)
            self._warn_cap(f"the CPU cap of {n.name} is not as asked: {cap['reason']}")

    # ------------------------------------------------------------------- stop
    def stop(self, timeout: float = 5.0) -> None:
        for name, g in self.groups.items():  # the throttling counters die with the groups
            if name in self.caps:
                self.caps[name].update(g.stats())
        try:
            super().stop(timeout)
        finally:
            self.hub.stop()
            for name, g in list(self.groups.items()):
                if g.remove():
                    del self.groups[name]


def _cap_text(cap: dict[str, Any]) -> str:
    if cap.get("capped"):
        return f"{cap['cores']:g} core ({cap['quota_us']}/{cap['period_us']} us, {cap.get('cgroup')})"
    if cap.get("wanted") is None:
        return "uncapped"
    return f"UNCAPPED (wanted {cap['wanted']:g} core: {cap.get('reason')})"
