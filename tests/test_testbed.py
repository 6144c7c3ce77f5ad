"""The emulated testbed (flowspec/testbed.py, tools/testbed.py).

* the link proxy: a measured round trip and throughput match the emulated latency and
  bandwidth, and bytes pass unchanged, in order, in both directions (jitter and stalls on);
* a testbed ring: nodes sit behind the emulated links (wire time >= latency) and in their
  CPU groups, and stopping it leaves no node process and no cgroup;
* a SIGKILLed testbed: its nodes die with it and `tools/testbed.py cleanup` removes its
  cgroups; stale groups with leftover nodes are reclaimed.

The cgroup parts need a writable cgroup v1 cpu controller (root); elsewhere they are skipped.
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
from flowspec.testbed import (CpuGroup, LinkProxy, LinkShaper, Testbed, cpu_cgroup_root, reclaim_stale,
                              emulation_settings, wants_emulation)

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
    ns = argparse.Namespace(emulate=None, latency_ms=None, jitter_ms=None, bandwidth_mbit=None,
                            stall_prob=None, stall_ms=None, cpu_quota=None)
    assert wants_emulation(topo, ns)
    plain = Topology.load(str(write_topology(tmp_path, 2, "/nonexistent-model", name="plain.yaml")))
    assert not wants_emulation(plain, ns)
    assert wants_emulation(plain, argparse.Namespace(**{**vars(ns), "latency_ms": 3.0}))
    assert not wants_emulation(topo, argparse.Namespace(**{**vars(ns), "emulate": False}))


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
        if CGROUP_ROOT is not None:
            groups = _groups_of(os.getpid())
            assert [g.name for g in groups] == [f"flowspec-{os.getpid()}-{n}" for n in ("source", "stage1")]
            for g, pid in zip(groups, pids):
                assert (g / "cpu.cfs_quota_us").read_text().strip() == "50000"
                assert (g / "cpu.cfs_period_us").read_text().strip() == "100000"
                assert pid in [int(x) for x in (g / "cgroup.procs").read_text().split()]
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
