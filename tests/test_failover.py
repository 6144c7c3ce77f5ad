"""A spare takes a dead stage's place, and the answer completes as if nothing happened.

Real `flowspec node` processes on loopback (tiny model, float32, greedy). A stage is
SIGKILLed in the middle of an answer and not restarted: a spare loads its layers, the ring
forms again around it and the held answer resumes, equal to the uninterrupted one. The
dead stage, started again later, finds its place taken and waits as a spare without
disturbing the ring. The ring plan itself is checked without processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from flowspec.api_health import ring_health
from flowspec.chat import health_text
from flowspec.config import Topology
from flowspec.runtime.client import RingClient
from flowspec.runtime.failover import unfit
from flowspec.runtime.protocol import ProtocolError
from flowspec.runtime.ring_plan import RingPlan

from ring_helpers import free_ports, generate, running_ring, tiny_tok_model, wait_log, write_topology  # noqa: F401

FAST = {"heartbeat_s": 0.2, "dead_after_s": 1.0, "read_timeout_s": 5.0}
PROMPT = [1, 504, 3458, 282, 4649, 314, 30, 198, 28, 216]


def with_spares(path: Path, spares: list[dict[str, Any]]) -> Path:
    """Add spare nodes (free ports on 127.0.0.1) to a topology file written by write_topology."""
    data = yaml.safe_load(path.read_text())
    for spec, port in zip(spares, free_ports(len(spares))):
        data["nodes"].append({"host": "127.0.0.1", "port": port, "role": "spare", **spec})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


async def stream_killing(topo: Topology, key: bytes, req: dict[str, Any], pid: int) -> dict[str, Any]:
    """Stream `req`; at its first tokens SIGKILL `pid`. The done event, with the streamed ids,
    when the kill happened and when each later tokens event came."""
    c = await RingClient.connect(topo, key)
    streamed: list[int] = []
    t_kill: float | None = None
    times: list[float] = []
    try:
        async for ev in c.stream(req):
            if ev["type"] != "tokens":
                return {**ev, "streamed": streamed, "t_kill": t_kill, "times": times}
            if t_kill is None:
                os.kill(pid, signal.SIGKILL)
                t_kill = time.monotonic()
            else:
                times.append(time.monotonic())
            streamed += ev["ids"]
    finally:
        await c.close()
    raise AssertionError("the stream ended without a done event")


def health(topo: Topology) -> dict[str, Any]:
    """GET /health of the ring's source (200 or 503), as JSON."""
    try:
        with urllib.request.urlopen(f"http://{topo.api.host}:{topo.api.port}/health", timeout=5) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:
        return json.load(e)


def ring_of(h: dict[str, Any]) -> list[tuple[Any, ...]]:
    """/health's nodes as (name, role, status, layers, in_place_of)."""
    return [(n["name"], n["role"], n["status"], n.get("layers"), n.get("in_place_of")) for n in h["nodes"]]


def first_after_pause(t_kill: float, times: list[float]) -> float:
    """The first tokens event after the longest pause since the kill: the resumed answer
    (events right after the kill carry what the ring had computed before it)."""
    gaps = [(b - a, b) for a, b in zip([t_kill] + times, times)]
    return max(gaps)[1]


def test_a_spare_takes_the_place_of_a_killed_stage(tmp_path: Path, tiny_tok_model: Path) -> None:
    path = write_topology(tmp_path, 4, tiny_tok_model, drafter="lookup", security=FAST,
                          decoding={"resume_window_s": 60, "failover_after_s": 0.5})
    with_spares(path, [{"name": "spare"}])
    topo = Topology.load(str(path))
    with running_ring(path, node_args=("--dtype", "float32")) as ring:  # the source serves /health
        wait_log(ring, "spare", "waiting for a place in the ring", 30)
        wait_log(ring, "source", "spare 'spare' is ready", 10)
        h = health(topo)
        assert h["formed"] and h["epoch"] == 0 and ring_of(h) == [
            ("source", "source", "up", None, None), ("stage1", "stage", "up", [0, 2], None),
            ("stage2", "stage", "up", [2, 4], None), ("stage3", "stage", "up", [4, 6], None)], h
        assert [(s["name"], s["status"]) for s in h["spares"]] == [("spare", "waiting")], h
        assert health_text(h)[0] == "ring ok: 4/4 nodes up; 1 spare waiting: spare"
        req = {"prompt_ids": PROMPT, "max_new_tokens": 64, "temperature": 0.0, "strategy": "flowspec"}
        truth = generate(topo, ring.key, req)["token_ids"]
        assert len(truth) >= 40, "the tiny model stopped early; the test needs a long answer"
        victim = next(p for p in ring.procs if p.name == "stage2")

        done = asyncio.run(stream_killing(topo, ring.key, req, victim.proc.pid))
        victim.proc.wait(5)
        ring.procs.remove(victim)
        assert done["token_ids"] == truth  # equal to the uninterrupted answer
        assert done["streamed"] == truth  # every token streamed exactly once
        assert done["stats"]["resumed"] >= 1
        took = first_after_pause(done["t_kill"], done["times"]) - done["t_kill"]
        print(f"failover: kill -> first token after resume {took:.2f} s")
        assert took < 15
        src = (ring.log_dir / "source.log").read_text()
        assert "spare 'spare' takes its place (layers 2-3)" in src, src[-3000:]
        assert "stage1 -> spare -> stage3" in (ring.log_dir / "stage1.log").read_text()
        h = health(topo)  # who holds which layers now; the dead stage is out of the ring
        assert h["formed"] and h["epoch"] == 1 and ring_of(h) == [
            ("source", "source", "up", None, None), ("stage1", "stage", "up", [0, 2], None),
            ("spare", "stage", "up", [2, 4], "stage2"), ("stage3", "stage", "up", [4, 6], None)], h
        assert [(s["name"], s["status"]) for s in h["spares"]] == [("stage2", "not connected")], h
        assert health_text(h)[0] == "ring ok: 4/4 nodes up (spare holds stage2's layers 2-3)"

        # the dead stage comes back: its place is taken, it waits as a spare, the ring is untouched
        before = len(src)
        ring.spawn("stage2", str(path), append=True)
        log = wait_log(ring, "stage2", "announced to the source", 30)
        assert "waits as a spare now" in log and "announced to the source" in log, log[-3000:]
        assert generate(topo, ring.key, req)["token_ids"] == truth
        after = (ring.log_dir / "source.log").read_text()[before:]
        assert "unreachable" not in after and "spare 'stage2' is ready" in after, after
        h = health(topo)
        assert [(s["name"], s["status"]) for s in h["spares"]] == [("stage2", "waiting")], h
        assert [n["name"] for n in h["nodes"]] == ["source", "stage1", "spare", "stage3"], h
        assert health_text(h)[0] == ("ring ok: 4/4 nodes up (spare holds stage2's layers 2-3); "
                                     "1 spare waiting: stage2")


class _Source:
    """What ring_health reads of a source node: its status and whether its two links are up."""

    def __init__(self, status: dict[str, Any], downstream: bool, upstream: bool) -> None:
        self._status = status
        self.links = type("Links", (), {"downstream": object() if downstream else None,
                                        "upstream": object() if upstream else None})()

    def status(self) -> dict[str, Any]:
        return self._status


def test_health_of_a_broken_ring_follows_the_plan() -> None:
    """A spare in a's place, then the ring broken: statuses go by the plan, not the file's order."""
    topo = small_ring()
    plan = RingPlan.initial(topo).replaced("a", "sp", 1).as_meta()
    formed_ring = [{"name": "a", "layers": [0, 15]}, {"name": "b", "layers": [15, 30]}]  # before the failover
    st = {"formed": False, "error": "node 'sp' is unreachable", "ring": formed_ring, "plan": plan,
          "spares": [], "down": ["sp"]}
    h = ring_health(_Source(st, downstream=False, upstream=True), topo)  # type: ignore[arg-type]
    assert ring_of(h) == [("src", "source", "up", None, None), ("sp", "stage", "unreachable", [0, 15], "a"),
                          ("b", "stage", "up", [15, 30], None)], h
    assert [(s["name"], s["status"]) for s in h["spares"]] == [("a", "not connected")] and h["epoch"] == 1
    h = ring_health(_Source(dict(st, down=[], spares=["a"]), downstream=True, upstream=False), topo)  # type: ignore[arg-type]
    assert [n["status"] for n in h["nodes"]] == ["up", "up", "not connected"], h
    assert h["spares"][0]["status"] == "waiting" and h["status"] == "unavailable"
    assert health_text(h)[0] == "ring unavailable: node 'sp' is unreachable"


def small_ring(**spare: Any) -> Topology:
    return Topology.from_dict({
        "cluster": "c", "model": {"target": "default", "dtype": "auto"},
        "nodes": [{"name": "src", "host": "127.0.0.1", "port": 7700, "role": "source"},
                  {"name": "a", "host": "127.0.0.1", "port": 7701, "role": "stage"},
                  {"name": "sp", "host": "127.0.0.1", "port": 7709, "role": "spare", **spare},
                  {"name": "b", "host": "127.0.0.1", "port": 7702, "role": "stage"}]})


def test_a_spare_that_cannot_hold_the_weights_is_not_chosen() -> None:
    stage = {"name": "b", "layers": [15, 30], "params": 50_000_000, "lm_head": False}  # 200 MB in float32
    assert unfit(small_ring(), "sp", stage, 28_000_000) is None  # no memory_gb: unlimited
    assert unfit(small_ring(memory_gb=0.25), "sp", stage, 28_000_000) is None
    msg = unfit(small_ring(memory_gb=0.25), "sp", dict(stage, lm_head=True), 28_000_000)  # + 112 MB
    assert msg == "its memory_gb 0.25 (256.0 MiB) cannot hold that stage's 297.5 MiB of weights", msg
    assert unfit(small_ring(memory_gb=0.1), "sp", stage, 0) is not None


def test_the_ring_plan() -> None:
    topo = small_ring()
    plan = RingPlan.initial(topo)
    assert plan.order == ("src", "a", "b") and plan.epoch == 0 and "sp" not in plan
    new = plan.replaced("a", "sp", 1)
    assert new.order == ("src", "sp", "b") and new.slot_of("sp") == "a"
    assert (new.successor("src"), new.predecessor("b")) == ("sp", "sp")
    assert RingPlan.from_meta(topo, new.as_meta()) == new
    assert RingPlan.from_meta(topo, None) is None
    for bad in ({"epoch": -1, "order": ["src", "a", "b"]}, {"epoch": 1, "order": ["a", "src", "b"]},
                {"epoch": 1, "order": ["src", "a", "a"]}, {"epoch": 1, "order": ["src", "a", "x"]},
                {"epoch": 1, "order": ["src", "a"]}, ["src", "a", "b"]):
        with pytest.raises(ProtocolError):
            RingPlan.from_meta(topo, bad)
    with pytest.raises(ValueError):
        plan.replaced("src", "sp", 1)  # the source has no spare
    with pytest.raises(ValueError):
        new.replaced("b", "sp", 2)  # a node sits in one place at a time
