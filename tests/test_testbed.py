"""The emulated testbed (flowspec/testbed.py, tools/testbed.py).

* the link proxy: a measured round trip and throughput match the emulated latency and
  bandwidth, and bytes pass unchanged, in order, in both directions (jitter and stalls on);
* a testbed ring: nodes sit behind the emulated links (wire time >= latency) and in their
  CPU groups, and stopping it leaves no node process and no cgroup;
* a SIGKILLed testbed: its nodes die with it and `tools/testbed.py cleanup` removes its
  cgroups; stale groups with leftover nodes are reclaimed;
* the CPU caps: the controller is found in cgroup v1 or v2 (fake /proc/mounts files and a
  folder laid out like a cgroup2 mount), caps read back as the kernel holds them, a cap
  that cannot be applied is a warning and shows in the report;
* the calibration: a capped stage process's one-token step takes about 1/quota times as
  long as its uncapped twin's, isolated (after idling) and back to back.

The real-cgroup parts need a writable cpu controller (root); elsewhere they are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowspec.config import LinkSpec, Topology
from flowspec.testbed import (DEFAULT_PERIOD_US, CpuGroup, LinkProxy, LinkShaper, Testbed, cgroup_version,
                              cpu_cgroup_root, describe, emulation_settings, period_for, reclaim_stale,
                              wants_emulation)

from ring_helpers import (formed, kill_leftovers, new_key, node_env, ring_generate, tiny_tok_model, wait_gone,
                          write_topology)

REPO = Path(__file__).resolve().parent.parent
TOOL = [sys.executable, str(REPO / "tools" / "testbed.py")]
__all__ = ["tiny_tok_model"]  # the fixture, imported for this module

CGROUP_ROOT, CGROUP_WHY = cpu_cgroup_root()
needs_cgroup = pytest.mark.skipif(CGROUP_ROOT is None, reason=f"no CPU caps here: {CGROUP_WHY}")


# ------------------------------------------------------------------------------ shaping
def test_shaper_serialises_delays_and_keeps_fifo_order() -> None:
    s = LinkShaper(LinkSpec(latency_ms=10, bandwidth_mbit=8), random.Random(0))
    # 1000 bytes at 8 Mbit/s take 1 ms on the line, then 10 ms of latency
    assert s.arrival(1000, 0.0) == pytest.approx(0.011)
    # the line is busy until 1 ms: the next chunk queues behind the first
    assert s.arrival(1000, 0.0005) == pytest.approx(0.012)
    assert s.arrival(10, 5.0) == pytest.approx(5.01001)
    # jitter never reorders; stalls pause the line
    j = LinkShaper(LinkSpec(latency_ms=1, jitter_ms=50, bandwidth_mbit=None), random.Random(1))
    times = [j.arrival(100, i * 0.001) for i in range(200)]
    assert times == sorted(times) and max(times) > 0.2
    st = LinkShaper(LinkSpec(latency_ms=0, bandwidth_mbit=None, stall_prob=0.5, stall_ms=100), random.Random(2))
    delays = [st.arrival(1, 10.0 * i) - 10.0 * i for i in range(400)]
    stalled = sum(d >= 0.099 for d in delays)
    assert 140 < stalled < 260 and all(d in (0.0, pytest.approx(0.1)) for d in delays)


# ------------------------------------------------------------------------------ proxies
async def _serve(handler: Any) -> tuple[asyncio.base_events.Server, int]:
    srv = await asyncio.start_server(handler, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1]


async def _echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data)
        await w.drain()
    w.close()


def test_proxy_round_trip_is_twice_the_latency() -> None:
    async def main() -> list[float]:
        srv, port = await _serve(_echo)
        px = LinkProxy(("127.0.0.1", 0), ("127.0.0.1", port), LinkSpec(latency_ms=20, bandwidth_mbit=None))
        await px.start()
        r, w = await asyncio.open_connection("127.0.0.1", px.port)
        rtts = []
        for _ in range(12):
            t = time.perf_counter()
            w.write(b"ping" * 16)
            await w.drain()
            await r.readexactly(64)
            rtts.append(time.perf_counter() - t)
        w.close()
        await px.close()
        srv.close()
        return rtts

    rtts = asyncio.run(main())
    assert min(rtts) >= 0.039, rtts
    assert statistics.median(rtts) <= 0.055, rtts


def test_proxy_bandwidth_limits_throughput() -> None:
    size = 1_000_000

    async def main() -> float:
        got = asyncio.Event()
        n = 0

        async def sink(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            nonlocal n
            while data := await r.read(65536):
                n += len(data)
                if n >= size:
                    got.set()
            w.close()

        srv, port = await _serve(sink)
        px = LinkProxy(("127.0.0.1", 0), ("127.0.0.1", port), LinkSpec(latency_ms=0, bandwidth_mbit=8))
        await px.start()
        r, w = await asyncio.open_connection("127.0.0.1", px.port)
        t = time.perf_counter()
        w.write(os.urandom(size))
        await w.drain()
        await asyncio.wait_for(got.wait(), 10)
        took = time.perf_counter() - t
        w.close()
        await px.close()
        srv.close()
        return took

    took = asyncio.run(main())
    assert took == pytest.approx(1.0, rel=0.25), f"1 MB at 8 Mbit/s took {took:.2f} s"


def test_proxy_passes_bytes_exactly_both_ways() -> None:
    rng = random.Random(7)
    up = rng.randbytes(400_000)
    down = rng.randbytes(300_000)
    link = LinkSpec(latency_ms=1, jitter_ms=3, bandwidth_mbit=400, stall_prob=0.05, stall_ms=4)

    async def main() -> tuple[bytes, bytes, bytes]:
        received: list[bytes] = []

        async def both(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            async def send() -> None:
                for i in range(0, len(down), 7001):
                    w.write(down[i:i + 7001])
                    await w.drain()
                w.write_eof()

            sender = asyncio.create_task(send())
            received.append(await r.read(-1))  # until the client's EOF
            await sender
            w.close()

        srv, port = await _serve(both)
        srv2, port2 = await _serve(_echo)
        px = LinkProxy(("127.0.0.1", 0), ("127.0.0.1", port), link, rng=random.Random(1))
        px2 = LinkProxy(("127.0.0.1", 0), ("127.0.0.1", port2), link, rng=random.Random(2))
        await px.start()
        await px2.start()
        # simultaneous traffic in both directions, in odd-sized pieces, with a half-close
        r, w = await asyncio.open_connection("127.0.0.1", px.port)

        async def send_up() -> None:
            i = 0
            while i < len(up):
                k = rng.randint(1, 20000)
                w.write(up[i:i + k])
                await w.drain()
                i += k
            w.write_eof()

        _, got_down = await asyncio.gather(send_up(), r.read(-1))
        w.close()
        # an echo through a jittery, stalling link comes back in order
        r2, w2 = await asyncio.open_connection("127.0.0.1", px2.port)
        w2.write(up[:100_000])
        echoed = await r2.readexactly(100_000)
        w2.close()
        await px.close()
        await px2.close()
        srv.close()
        srv2.close()
        return received[0], got_down, echoed

    got_up, got_down, echoed = asyncio.run(asyncio.wait_for(main(), 30))
    assert got_up == up
    assert got_down == down
    assert echoed == up[:100_000]


def test_proxy_closes_when_the_target_is_down() -> None:
    async def main() -> bytes:
        srv, port = await _serve(_echo)
        srv.close()
        await srv.wait_closed()
        px = LinkProxy(("127.0.0.1", 0), ("127.0.0.1", port), LinkSpec(), connect_timeout=0.2)
        await px.start()
        r, w = await asyncio.open_connection("127.0.0.1", px.port)
        data = await asyncio.wait_for(r.read(-1), 5)
        w.close()
        await px.close()
        return data

    assert asyncio.run(main()) == b""


# ----------------------------------------------------------------------------- settings
def test_settings_come_from_the_topology_and_the_command_line(tmp_path: Path) -> None:
    path = _testbed_topology(tmp_path, "/nonexistent-model", latency_ms=7, cpu_quota=0.25)
    topo = Topology.load(str(path))
    s = emulation_settings(topo)
    assert s.link.latency_ms == 7 and s.cpu_quota == 0.25 and s.threads == 1
    s2 = emulation_settings(topo, latency_ms=1.5, bandwidth_mbit=0, cpu_quota=0, threads=2)
    assert s2.link.latency_ms == 1.5 and s2.link.bandwidth_mbit is None
    assert s2.cpu_quota is None and s2.threads == 2
    assert s.cpu_period_ms is None and emulation_settings(topo, cpu_period_ms=10).cpu_period_ms == 10
    assert describe(s, topo)[-1] == "cpu: source 0.25 core, stage1 0.25 core (CFS period 4 ms); 1 thread(s) per node"
    assert "(CFS period 10 ms)" in describe(emulation_settings(topo, cpu_period_ms=10), topo)[-1]
    assert "(CFS period 4 ms)" in describe(emulation_settings(topo, cpu_period_ms=2), topo)[-1]  # 1 ms / 0.25 core
    ns = argparse.Namespace(emulate=None, latency_ms=None, jitter_ms=None, bandwidth_mbit=None,
                            stall_prob=None, stall_ms=None, cpu_quota=None)
    assert wants_emulation(topo, ns)
    plain = Topology.load(str(write_topology(tmp_path, 2, "/nonexistent-model", name="plain.yaml")))
    assert not wants_emulation(plain, ns)
    assert wants_emulation(plain, argparse.Namespace(**{**vars(ns), "latency_ms": 3.0}))
    assert not wants_emulation(topo, argparse.Namespace(**{**vars(ns), "emulate": False}))


# ------------------------------------------------------------------------------ cgroups
def _mounts(tmp_path: Path, *lines: str) -> str:
    path = tmp_path / "mounts"
    path.write_text("".join(line + "\n" for line in ("proc /proc proc rw 0 0", *lines)))
    return str(path)


def _fake_v1(folder: Path, cfs: bool = True) -> Path:
    folder.mkdir(parents=True)
    (folder / "cgroup.procs").write_text("")
    if cfs:
        (folder / "cpu.cfs_quota_us").write_text("-1\n")
    return folder


def _fake_v2(folder: Path, controllers: str = "cpuset cpu io memory pids", subtree: str = "") -> Path:
    """A folder laid out like the root of a cgroup2 mount (the kernel's files, as plain files)."""
    folder.mkdir(parents=True)
    (folder / "cgroup.controllers").write_text(controllers + "\n")
    (folder / "cgroup.subtree_control").write_text(subtree + "\n")
    (folder / "cgroup.procs").write_text("")
    return folder


def test_the_cpu_controller_is_found_in_v1_or_v2(tmp_path: Path) -> None:
    v1, v2 = _fake_v1(tmp_path / "cpu"), _fake_v2(tmp_path / "unified")
    hybrid = _mounts(tmp_path, f"cgroup {v1} cgroup rw,nosuid,cpu,cpuacct 0 0", f"cgroup2 {v2} cgroup2 rw 0 0",
                     f"cgroup {tmp_path} cgroup rw,memory 0 0")
    assert cpu_cgroup_root(hybrid) == (v1, "")  # v1 owns the cpu controller where it is mounted
    assert cgroup_version(v1) == "v1" and cgroup_version(v2) == "v2"
    assert cpu_cgroup_root(_mounts(tmp_path, f"cgroup2 {v2} cgroup2 rw,nsdelegate 0 0")) == (v2, "")
    no_cfs = _fake_v1(tmp_path / "cpu-no-cfs", cfs=False)
    root, why = cpu_cgroup_root(_mounts(tmp_path, f"cgroup {no_cfs} cgroup rw,cpu 0 0"))
    assert root is None and "CFS bandwidth control is off" in why
    bare = _fake_v2(tmp_path / "no-cpu", controllers="memory pids")
    root, why = cpu_cgroup_root(_mounts(tmp_path, f"cgroup2 {bare} cgroup2 rw 0 0"))
    assert root is None and "does not offer the cpu controller" in why and "memory pids" in why
    root, why = cpu_cgroup_root(_mounts(tmp_path))
    assert root is None and "neither a cgroup v1 cpu controller nor a cgroup v2 hierarchy" in why
    root, why = cpu_cgroup_root(str(tmp_path / "nope"))
    assert root is None and "cannot read" in why


def test_period_is_short_but_gives_the_kernel_its_minimum_quota() -> None:
    assert period_for(0.35) == DEFAULT_PERIOD_US and period_for(2.0) == DEFAULT_PERIOD_US
    assert period_for(0.1) == 10_000  # 1 ms of quota per period at least
    assert period_for(0.35, 100_000) == 100_000 and period_for(0.35, 2_000) == 2_858
    assert period_for(1e-4) == 1_000_000  # the kernel's longest period
    with pytest.raises(ValueError):
        period_for(0)


def test_cgroup_v2_caps_in_a_fake_unified_hierarchy(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path / "cg2")
    g = CpuGroup.create(root, 4242, "edge1", 0.35)
    assert (root / "cgroup.subtree_control").read_text() == "+cpu\n"  # the controller handed to the children
    assert g.version == "v2" and g.path == root / "flowspec-4242-edge1"
    assert (g.path / "cpu.max").read_text() == f"{round(0.35 * DEFAULT_PERIOD_US)} {DEFAULT_PERIOD_US}\n"
    g.add(os.getpid())
    assert g.pids() == [os.getpid()]
    got = g.applied()
    assert got == {"cgroup": "v2", "group": str(g.path), "quota_us": 1400, "period_us": 4000, "cores": 0.35,
                   "burst_us": None, "pids": [os.getpid()]}
    assert g.stats() == {"periods": None, "throttled_periods": None, "throttled_s": None}
    (g.path / "cpu.stat").write_text("usage_usec 900\nnr_periods 50\nnr_throttled 30\nthrottled_usec 25000\n")
    assert g.stats() == {"periods": 50, "throttled_periods": 30, "throttled_s": 0.025}
    (g.path / "cpu.max").write_text("max 100000\n")
    assert g.applied()["quota_us"] is None and g.applied()["cores"] is None
    slow = CpuGroup.create(root, 4242, "slow", 0.1, period_us=2_000)
    assert (slow.path / "cpu.max").read_text() == "1000 10000\n"
    # the controller already on: nothing written; the kernel refusing it: what to do
    on = _fake_v2(tmp_path / "on", subtree="cpu memory")
    CpuGroup.create(on, 1, "a", 0.5)
    assert (on / "cgroup.subtree_control").read_text() == "cpu memory\n"
    off = _fake_v2(tmp_path / "off")
    (off / "cgroup.subtree_control").unlink()
    (off / "cgroup.subtree_control").mkdir()  # writing it fails
    with pytest.raises(OSError, match="cannot enable the cpu controller in"):
        CpuGroup.create(off, 1, "a", 0.5)


@needs_cgroup
def test_a_real_cap_reads_back_as_written() -> None:
    assert CGROUP_ROOT is not None
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    groups = []
    try:
        for quota, period, want in ((0.35, None, (1400, 4000)), (0.5, 10_000, (5000, 10_000)),
                                    (1.5, None, (6000, 4000))):
            g = CpuGroup.create(CGROUP_ROOT, os.getpid(), f"readback{len(groups)}", quota, period)
            groups.append(g)
            g.add(child.pid)
            got = g.applied()
            assert (got["quota_us"], got["period_us"], got["cores"]) == (*want, quota), got
            assert got["pids"] == [child.pid] and got["cgroup"] == cgroup_version(CGROUP_ROOT)
            assert got["burst_us"] in (None, 0)
            st = g.stats()
            assert isinstance(st["periods"], int) and isinstance(st["throttled_s"], float)
    finally:
        child.kill()
        child.wait()
        for g in groups:
            assert g.remove()
            assert not g.path.exists()


def _quick_testbed(tmp_path: Path, **kw: Any) -> Testbed:
    """A testbed of nodes that exit at once (no model): enough to see the caps made and reported."""
    path = _testbed_topology(tmp_path, "/nonexistent-model", cpu_quota=0.35)
    return Testbed(str(path), Topology.load(str(path)), node_args=["--no-api"], log_dir=str(tmp_path / "logs"),
                   extra_env=node_env(new_key()), **kw)


def test_a_cap_that_cannot_be_applied_is_a_loud_warning_and_reported(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    # no usable controller: every node runs uncapped, and says so
    monkeypatch.setattr("flowspec.testbed.ring.cpu_cgroup_root", lambda: (None, "no cpu controller here"))
    tb = _quick_testbed(tmp_path / "a")
    with caplog.at_level("WARNING", logger="flowspec.testbed.ring"):
        try:
            tb.start()
        finally:
            tb.stop()
    rep = tb.cpu_report()
    assert not rep["all_applied"] and rep["mechanism"] is None
    assert all(not c["capped"] and c["wanted"] == 0.35 and "no cpu controller here" in c["reason"]
               for c in rep["nodes"].values()), rep
    assert len(rep["warnings"]) == 1 and "UNCAPPED" in rep["warnings"][0] and "root" in rep["warnings"][0]
    assert any("UNCAPPED" in r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert any(line.startswith("WARNING: cannot cap CPU (no cpu controller here)") for line in tb.describe())
    # the groups cannot be made (the kernel refuses): the same, node by node
    caplog.clear()
    tb = _quick_testbed(tmp_path / "b", cgroup_root=tmp_path / "not-a-cgroup" / "cpu")
    with caplog.at_level("WARNING", logger="flowspec.testbed.ring"):
        try:
            tb.start()
        finally:
            tb.stop()
    rep = tb.cpu_report()
    assert not rep["all_applied"] and len(rep["warnings"]) == 2
    assert all(not c["capped"] and "cannot create its cgroup" in c["reason"] for c in rep["nodes"].values())
    assert sum("cannot cap" in r.getMessage() for r in caplog.records) == 2


def test_caps_through_cgroup_v2_are_read_back_for_the_report(tmp_path: Path) -> None:
    root = _fake_v2(tmp_path / "cg2")
    tb = _quick_testbed(tmp_path, cgroup_root=root)
    try:
        tb.start()
        pids = {p.name: p.proc.pid for p in tb.procs}
    finally:
        tb.stop()
    rep = tb.cpu_report()
    assert rep["mechanism"] == "cgroup v2" and rep["all_applied"] and not rep["warnings"], rep
    for name, cap in rep["nodes"].items():
        assert cap["capped"] and cap["pid"] == pids[name]
        assert (cap["quota_us"], cap["period_us"], cap["cores"], cap["cgroup"]) == (1400, 4000, 0.35, "v2")
    assert "cpu caps applied: source 0.35 core (1400/4000 us, v2)" in "\n".join(tb.describe())


# --------------------------------------------------------------------------- the testbed
def _testbed_topology(folder: Path, target: Any, *, n_nodes: int = 2, latency_ms: float = 5,
                      cpu_quota: float | None = 0.5, name: str = "tb.yaml") -> Path:
    path = write_topology(folder, n_nodes, target, name=name)
    data = yaml.safe_load(path.read_text())
    data["testbed"] = {"link": {"latency_ms": latency_ms, "bandwidth_mbit": 100}, "cpu_quota": cpu_quota,
                       "threads": 1}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _groups_of(pid: int) -> list[Path]:
    if CGROUP_ROOT is None:
        return []
    return sorted(CGROUP_ROOT.glob(f"flowspec-{pid}-*"))


def test_testbed_ring_runs_behind_the_links_and_cleans_up(tiny_tok_model: Path, tmp_path: Path) -> None:
    path = _testbed_topology(tmp_path, tiny_tok_model, latency_ms=5, cpu_quota=0.5)
    topo = Topology.load(str(path))
    key = new_key()
    tb = Testbed(str(path), topo, node_args=["--dtype", "float32", "--no-api"], log_dir=str(tmp_path / "logs"),
                 extra_env=node_env(key))
    pids: list[int] = []
    try:
        tb.start()
        pids = [p.proc.pid for p in tb.procs]
        formed(tb.client_topology, tb.key, 90, tb)
        report = tb.cpu_report()
        if CGROUP_ROOT is not None:
            groups = _groups_of(os.getpid())
            assert [g.name for g in groups] == [f"flowspec-{os.getpid()}-{n}" for n in ("source", "stage1")]
            period = period_for(0.5)
            assert period == DEFAULT_PERIOD_US == 4000  # short: a node's short bursts are slowed too
            for g, pid in zip(groups, pids):
                assert (g / "cpu.cfs_quota_us").read_text().strip() == str(period // 2)
                assert (g / "cpu.cfs_period_us").read_text().strip() == str(period)
                assert pid in [int(x) for x in (g / "cgroup.procs").read_text().split()]
            # the caps as the kernel holds them, for the bench JSON
            assert report["mechanism"] == "cgroup v1" and report["all_applied"] and not report["warnings"]
            for (name, cap), pid in zip(report["nodes"].items(), pids):
                assert cap["capped"] and cap["pid"] == pid, (name, cap)
                assert (cap["quota_us"], cap["period_us"], cap["cores"]) == (period // 2, period, 0.5)
                assert cap["periods"] > 0  # throttling counters, read from cpu.stat
            assert any(line.startswith("cpu caps applied: source 0.5 core (2000/4000 us")
                       for line in tb.describe()), tb.describe()
        else:
            assert not report["all_applied"] and report["warnings"]
        done = asyncio.run(ring_generate(tb.client_topology, tb.key,
                                         {"prompt_ids": [1, 5, 9, 33, 7], "max_new_tokens": 4}))
        assert len(done["token_ids"]) == 4
        links = done["stats"]["hops"]["links"]
        for hop in ("source->stage1", "stage1->source"):
            assert links[hop]["mean_ms"] >= 4.5, links  # every trip crosses the 5 ms links
        # a client dialing the topology's own source address goes through the link into the source
        assert formed(topo, tb.key, 10)["formed"]
    finally:
        tb.stop()
    assert wait_gone(pids, 5.0) == [], "node processes outlived the testbed"
    assert _groups_of(os.getpid()) == [], "cgroups outlived the testbed"
    assert tb.hub.proxies == []


def test_killed_testbed_leaves_no_process_or_cgroup(tiny_tok_model: Path, tmp_path: Path) -> None:
    path = _testbed_topology(tmp_path, tiny_tok_model, latency_ms=1, cpu_quota=0.9)
    env = node_env(new_key())
    log = open(tmp_path / "testbed.out", "w")
    tb = subprocess.Popen([*TOOL, "up", str(path), "--threads", "1", "--dtype", "float32", "--timeout", "90"],
                          stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
    nodes: list[int] = []
    try:
        import psutil

        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert tb.poll() is None, (tmp_path / "testbed.out").read_text()[-3000:]
            if "ring formed" in (tmp_path / "testbed.out").read_text():
                break
            time.sleep(0.2)
        else:
            pytest.fail("the testbed did not form its ring:\n" + (tmp_path / "testbed.out").read_text()[-3000:])
        nodes = [c.pid for c in psutil.Process(tb.pid).children()]
        assert len(nodes) == 2, nodes
        if CGROUP_ROOT is not None:
            in_groups = sorted(p for g in _groups_of(tb.pid) for p in CpuGroup(g, 0.9).pids())
            assert in_groups == sorted(nodes)
        tb.send_signal(signal.SIGKILL)
        tb.wait(10)
        assert wait_gone(nodes, 10.0) == [], "node processes outlived a killed testbed"
        out = subprocess.run([*TOOL, "cleanup"], capture_output=True, text=True, timeout=60, env=env)
        assert out.returncode == 0, out.stderr
        assert _groups_of(tb.pid) == [], out.stdout + out.stderr
    finally:
        kill_leftovers(tb, nodes)
        log.close()


@needs_cgroup
def test_reclaim_stops_stray_nodes_of_a_dead_testbed() -> None:
    assert CGROUP_ROOT is not None
    gone = subprocess.Popen(["true"])
    gone.wait()  # a testbed pid that no longer runs
    group = CpuGroup.create(CGROUP_ROOT, gone.pid, "stray", 0.5)
    # a stand-in for a node that outlived its testbed (its command line names a flowspec node)
    stray = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "flowspec.cli", "node"])
    try:
        group.add(stray.pid)
        assert group.pids() == [stray.pid]
        removed = reclaim_stale(CGROUP_ROOT, timeout=5.0)
        assert group.path.name in removed
        assert stray.wait(5) is not None
        assert not group.path.exists()
    finally:
        if stray.poll() is None:
            stray.kill()
            stray.wait()
        group.remove()


# ---------------------------------------------------------------------------- calibration
# A child process that runs one-token steps of a real stage: 8 decoder layers of the default
# model (an edge-5 stage has 7-8), bfloat16, one torch thread, over a cached prefix of 128
# tokens. Each line "N GAP" on stdin runs N steps, each after GAP seconds of sleep (0: back
# to back), and answers one JSON line: [wall seconds, CPU seconds] per step.
_STEP_WORKER = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
from flowspec.model.stage import Segment, Stage
stage = Stage.load(sys.argv[1], 8, 8 + int(sys.argv[2]), dtype="bfloat16", max_context=256)
prefix, hidden = 128, stage.cfg.hidden_size
gen = torch.Generator().manual_seed(0)
ids = list(range(prefix))
stage(Segment(ids, [i - 1 for i in ids], ids, hidden=torch.randn(prefix, hidden, generator=gen)))
stage.apply_update(ids, [])
x = torch.randn(1, hidden, generator=gen)
node = prefix
def step():
    global node
    t, c = time.perf_counter(), time.thread_time()
    stage(Segment([node], [prefix - 1], [prefix], hidden=x))
    took = (time.perf_counter() - t, time.thread_time() - c)
    stage.cache.drop([node])
    stage.cache.compact()
    node += 1
    return took
for _ in range(10):
    step()
print("ready", flush=True)
for line in sys.stdin:
    n, gap = line.split()
    out = []
    for _ in range(int(n)):
        if float(gap):
            time.sleep(float(gap))
        out.append(step())
    print(json.dumps(out), flush=True)
"""
CAL_QUOTA = 0.35  # edge-5's cap
# Accepted band of (capped / uncapped step time) x quota, 1.0 being a device of exactly that
# speed. Measured here (2-core KVM guest, HZ=250; the 4 ms period; 9 runs of 30 bursts and
# 12 blocks): isolated steps 0.88-1.18, streams 0.88-1.51. Above 1 because a capped step
# also costs 1.1-1.55x the CPU time of an uncapped one on this VM (its caches go cold while
# it is throttled; a warm uncapped stream is the extreme). A cap that does not hold at
# this time scale measures 0.29-0.38 (the old 100 ms period, or no cap at all), a 10 ms
# period 0.57-0.77 for isolated steps. The lower edge lies between the two with room for
# the noise of a shared machine (1 run in ~40 measured a stream at 0.56); a second try
# covers such a run, and cannot rescue a cap that does not hold.
CAL_BAND = (0.6, 1.7)
CAL_Q25_MIN = 0.5  # and the fastest quarter of the isolated steps is slowed too (4 ms: 0.68-1.03; 100 ms: 0.30-0.33)


def calibrate(root: Path, model_dir: Path, quota: float = CAL_QUOTA, period_us: int | None = None, *,
              bursts: int = 30, blocks: int = 12, block: int = 6, gap_s: float = 0.05) -> dict[str, Any]:
    """Step times of a capped stage process against an uncapped twin, interleaved pair by pair
    (so that drifts of the machine's speed hit both alike): ``burst`` = median over pairs of
    (capped / uncapped) for one step after gap_s of idling, ``burst_q25`` its first quartile;
    ``stream`` = median over blocks of `block` back-to-back steps (each block's first step
    left out) of the ratio of the blocks' median step times. All are multiplied by the
    quota: 1.0 is a device of exactly that speed. cpu_*: the same ratios of CPU time."""
    import json

    group = CpuGroup.create(root, os.getpid(), "calibration", quota, period_us)
    procs = {k: subprocess.Popen([sys.executable, "-c", _STEP_WORKER, str(model_dir), "8"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True, cwd=REPO) for k in ("uncapped", "capped")}

    def run(k: str, n: int, gap: float) -> list[list[float]]:
        p = procs[k]
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(f"{n} {gap}\n")
        p.stdin.flush()
        return json.loads(p.stdout.readline())

    try:
        for k, p in procs.items():
            assert p.stdout is not None and p.stdout.readline().strip() == "ready", f"the {k} worker failed"
        group.add(procs["capped"].pid)
        applied = group.applied()
        assert applied["pids"] == [procs["capped"].pid]
        for k in procs:
            run(k, 3, 0)
        burst, cpu_b, unc = [], [], []
        for _ in range(bursts):
            u, c = run("uncapped", 1, gap_s)[0], run("capped", 1, gap_s)[0]
            unc.append(u[0])
            burst.append(c[0] / u[0])
            cpu_b.append(c[1] / u[1])
        stream, cpu_s = [], []
        for _ in range(blocks):
            us, cs = run("uncapped", block, 0)[1:], run("capped", block, 0)[1:]
            stream.append(statistics.median(x[0] for x in cs) / statistics.median(x[0] for x in us))
            cpu_s.append(statistics.median(x[1] for x in cs) / statistics.median(x[1] for x in us))
    finally:
        for p in procs.values():
            p.kill()
            p.wait()
        group.remove()
    return {"quota": quota, "period_us": applied["period_us"], "quota_us": applied["quota_us"],
            "burst": round(statistics.median(burst) * quota, 3), "stream": round(statistics.median(stream) * quota, 3),
            "burst_q25": round(statistics.quantiles(burst, n=4)[0] * quota, 3),
            "cpu_burst": round(statistics.median(cpu_b), 3), "cpu_stream": round(statistics.median(cpu_s), 3),
            "uncapped_ms": round(1e3 * statistics.median(unc), 2)}


def calibration_holds(r: dict[str, Any]) -> bool:
    lo, hi = CAL_BAND
    return lo <= r["burst"] <= hi and lo <= r["stream"] <= hi and r["burst_q25"] >= CAL_Q25_MIN


def calibrated(root: Path, model_dir: Path, period_us: int | None = None, tries: int = 2) -> list[dict[str, Any]]:
    """calibrate() until it holds, at most `tries` times; every result."""
    out: list[dict[str, Any]] = []
    while len(out) < tries and not (out and calibration_holds(out[-1])):
        out.append(calibrate(root, model_dir, period_us=period_us))
    return out


@needs_cgroup
@pytest.mark.slow
def test_a_capped_stage_step_takes_one_over_quota_times_as_long(default_model_dir: Path) -> None:
    """An edge device of speed 0.35 is slow all the time: one token through a capped 8-layer
    stage takes about 1/0.35 times as long as uncapped, after idling (the burst that a 100 ms
    period let run at full speed) and back to back."""
    assert CGROUP_ROOT is not None
    results = calibrated(CGROUP_ROOT, default_model_dir)
    assert results[-1]["period_us"] == period_for(CAL_QUOTA) and results[-1]["quota_us"] == round(
        CAL_QUOTA * period_for(CAL_QUOTA))
    assert calibration_holds(results[-1]), (
        f"(capped / uncapped step time) x quota should lie in {CAL_BAND} (1.0: a device of speed {CAL_QUOTA}), "
        f"for isolated steps and for streams; measured {results}")
