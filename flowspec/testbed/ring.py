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
from ..runtime.launcher import LocalRing
from .cgroups import CpuGroup, cpu_cgroup_root, reclaim_stale
from .links import LinkProxy, ProxyHub

log = logging.getLogger(__name__)


# ========================================================================= settings
def emulation_settings(topo: Topology, *, latency_ms: float | None = None, jitter_ms: float | None = None,
                       bandwidth_mbit: float | None = None, stall_prob: float | None = None,
                       stall_ms: float | None = None, cpu_quota: float | None = None,
                       threads: int | None = None) -> TestbedSpec:
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
    return out


def _link_of(settings: TestbedSpec, topo: Topology, src: str) -> LinkSpec:
    return settings.links.get((src, topo.successor(src).name), settings.link)


def _cpu_of(settings: TestbedSpec, name: str) -> float | None:
    return settings.cpus.get(name, settings.cpu_quota)


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
    lines.append("cpu: " + ", ".join(f"{k} {'uncapped' if v is None else f'{v:g} core'}" for k, v in caps.items())
                 + f"; {settings.threads} thread(s) per node")
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
        return describe(self.settings, self.topo)

    # ------------------------------------------------------------------ start
    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
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
            if root is not None and quota is not None:
                self.groups[n.name] = CpuGroup.create(root, os.getpid(), n.name, quota)
        for n in nodes:
            self._spawn(n)
        log.info("testbed: %d nodes behind emulated links; logs in %s", len(self.procs), self.log_dir)
        for line in self.describe():
            log.info("testbed: %s", line)

    def _cgroups(self) -> Path | None:
        wanted = any(_cpu_of(self.settings, n.name) is not None for n in self.topo.nodes)
        if self.cgroup_root is None:
            return None
        if self.cgroup_root == "auto":
            root, why = cpu_cgroup_root()
        else:
            root, why = Path(self.cgroup_root), ""
        if root is not None:
            reclaim_stale(root)
        if wanted and root is None:
            log.warning("testbed: cannot cap CPU (%s); the nodes run uncapped", why)
        return root if wanted else None

    def _write_topology(self, n: NodeSpec) -> Path:
        data = _with_port(self.topo, n.name, self.private[n.name]).to_dict()
        data.pop("testbed", None)
        path = self.log_dir / f"{n.name}.topology.yaml"
        head = (f"# derived by the flowspec testbed from {self.topo.origin}: node {n.name} listens on "
                f"port {self.private[n.name]}\n# behind the emulated link on port {n.port}\n")
        path.write_text(head + yaml.safe_dump(data, sort_keys=False))
        return path

    def _spawn(self, n: NodeSpec) -> None:
        p = self.spawn(n.name, str(self.paths[n.name])).proc
        group = self.groups.get(n.name)
        if group is not None:
            try:
                group.add(p.pid)
            except OSError as e:
                log.warning("testbed: cannot cap %s (%s); it runs uncapped", n.name, e.strerror or e)

    # ------------------------------------------------------------------- stop
    def stop(self, timeout: float = 5.0) -> None:
        try:
            super().stop(timeout)
        finally:
            self.hub.stop()
            for name, g in list(self.groups.items()):
                if g.remove():
                    del self.groups[name]
