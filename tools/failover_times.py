#!/usr/bin/env python
"""How long a ring takes to notice a dead stage, to be whole again, and to resume the answer.

Starts the nodes of a topology on this machine (fresh free ports, so it never meets
another ring), asks for an answer, and SIGKILLs a middle stage at the answer's first
tokens; then either

* ``restart``: starts the killed stage again at once (what `flowspec up` or a service
  manager does, without their pause), or
* ``spare``: leaves it dead; a spare node (added to the topology) takes its place after
  ``decoding.failover_after_s``. The killed stage is then started again: it finds its
  place taken and waits as the next spare, so every run kills the node that sits in that
  place now; or
* ``stall``: SIGSTOPs the stage instead (a frozen device: no frame, no heartbeat, its
  connections open) and SIGCONTs it ``--stall`` seconds later.

Every answer is checked against the uninterrupted one. Times come from the nodes' logs
(their timestamps are this machine's clock) and the client's clock:

* detection: kill (or stop) -> the source holds the request (``is unreachable``);
* back: kill -> the killed stage listens again (restart) / the spare holds the layers /
  (stall) the stage is continued;
* re-formation: the node is back -> the source's ``ring formed``;
* first token: kill -> the first token of the resumed answer.

    python tools/failover_times.py --mode restart --runs 3
    python tools/failover_times.py --mode spare --runs 3 --failover-after 5
    python tools/failover_times.py --mode stall --runs 3 --stall 4
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
import signal
import socket
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from flowspec.config import Topology
from flowspec.runtime.client import RingClient, wait_formed
from flowspec.runtime.launcher import LocalRing


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def private_topology(src: str, folder: Path, spare: bool, failover_after: float) -> Path:
    """The topology on free loopback ports, resuming held answers, with a spare if asked."""
    data = yaml.safe_load(Path(src).read_text())
    nodes = data["nodes"] + ([{"name": "spare", "host": "127.0.0.1", "port": 0, "role": "spare"}] if spare else [])
    ports = free_ports(len(nodes) + 1)
    for n, p in zip(nodes, ports):
        n.update(host="127.0.0.1", port=p)
    data["nodes"] = nodes
    data["api"] = {"host": "127.0.0.1", "port": ports[-1]}
    data["decoding"] = dict(data.get("decoding") or {}, resume_window_s=120, failover_after_s=failover_after)
    data.pop("testbed", None)
    path = folder / "ring.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def log_time(ring: LocalRing, name: str, text: str, after: float, timeout: float = 60.0) -> float | None:
    """The wall-clock time of the first line of `name`'s log after `after` that contains text."""
    deadline = time.time() + timeout
    path = ring.log_dir / f"{name}.log"
    while time.time() < deadline:
        for line in path.read_text(errors="replace").splitlines():
            if text in line:
                try:
                    t = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                except ValueError:
                    continue
                if t >= after - 0.002:  # the log's milliseconds are truncated
                    return t
        time.sleep(0.1)
    return None


async def answer(topo: Topology, key: bytes, req: dict[str, Any], kill: Any = None) -> dict[str, Any]:
    """Stream req; call kill() at the first tokens; the done event with the client's times."""
    c = await RingClient.connect(topo, key)
    times: list[float] = []
    t_kill = None
    try:
        async for ev in c.stream(req):
            if ev["type"] == "done":
                return {**ev, "t_kill": t_kill, "times": times}
            if kill is not None and t_kill is None:
                t_kill = kill()
            else:
                times.append(time.time())
    finally:
        await c.close()
    raise RuntimeError("no done event")


def first_after_pause(t_kill: float, times: list[float]) -> float:
    gaps = [(b - a, b) for a, b in zip([t_kill] + times, times)]
    return max(gaps)[1]


def run(args: argparse.Namespace) -> None:
    spare = args.mode == "spare"
    folder = Path(tempfile.mkdtemp(prefix="flowspec-failover-"))
    path = private_topology(args.topology, folder, spare, args.failover_after)
    topo = Topology.load(str(path))
    ring = LocalRing(str(path), topo, ["--no-api"] + (["--dtype", args.dtype] if args.dtype else []),
                     log_dir=str(folder))
    slot = topo.stages[len(topo.stages) // 2].name  # a middle stage: its neighbours are both stages
    req = {"prompt": args.prompt, "max_new_tokens": args.max_new_tokens, "temperature": 0.0}
    rows: list[dict[str, float]] = []
    try:
        ring.start()
        asyncio.run(wait_formed(topo, ring.key, 300, ring.check_alive))
        if spare:
            log_time(ring, "spare", "waiting for a place in the ring", 0.0)
        truth = asyncio.run(answer(topo, ring.key, req))["token_ids"]
        for i in range(args.runs):
            st = asyncio.run(_status(topo, ring.key))
            position = [n.name for n in topo.stages].index(slot) + 1
            victim_name = st["plan"]["order"][position]
            victim = next(p for p in ring.procs if p.name == victim_name and p.proc.poll() is None)

            def kill() -> float:
                t = time.time()
                if args.mode == "stall":
                    os.kill(victim.proc.pid, signal.SIGSTOP)
                    return t
                os.kill(victim.proc.pid, signal.SIGKILL)
                if not spare:
                    victim.proc.wait(5)
                    ring.procs.remove(victim)
                    ring.spawn(victim_name, str(path), append=True)
                return t

            if args.mode == "stall":  # continued from another thread while the answer is held
                cont = {"t": 0.0}

                def resume_later() -> None:
                    time.sleep(args.stall)
                    cont["t"] = time.time()
                    os.kill(victim.proc.pid, signal.SIGCONT)

                def kill_and_resume() -> float:
                    t = kill()
                    threading.Thread(target=resume_later, daemon=True).start()
                    return t

                done = asyncio.run(answer(topo, ring.key, req, kill_and_resume))
            else:
                done = asyncio.run(answer(topo, ring.key, req, kill))
            t_kill = done["t_kill"]
            assert done["token_ids"] == truth, "the resumed answer differs from the uninterrupted one"
            held = log_time(ring, "source", "is unreachable", t_kill)
            if spare:
                back = log_time(ring, "source", "holds layers", t_kill)
            elif args.mode == "stall":
                back = cont["t"]
            else:
                back = log_time(ring, victim_name, "listening on", t_kill)
            formed = log_time(ring, "source", "ring formed", t_kill)
            if held is None or back is None or formed is None:
                print(f"run {i + 1}: {victim_name} was not declared dead (a stall shorter than "
                      f"security.dead_after_s only pauses the ring)" if held is None else
                      f"run {i + 1}: the ring did not form again within a minute (logs: {ring.log_dir})", flush=True)
                continue
            first = first_after_pause(t_kill, done["times"])
            row = {"detection": held - t_kill, "back": back - t_kill, "re-formation": formed - back,
                   "first token": first - t_kill}
            rows.append(row)
            print(f"run {i + 1}: {'stopped' if args.mode == 'stall' else 'killed'} {victim_name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in row.items()),
                  flush=True)
            if spare:  # the killed stage comes back and becomes the next spare
                victim.proc.wait(5)
                ring.procs.remove(victim)
                t = time.time()
                ring.spawn(victim_name, str(path), append=True)
                log_time(ring, victim_name, "announced to the source", t)
        if not rows:
            return
        print("median: " + ", ".join(f"{k} {statistics.median(r[k] for r in rows):.2f} s" for k in rows[0]))
        print(f"logs: {ring.log_dir}")
    finally:
        ring.stop()


async def _status(topo: Topology, key: bytes) -> dict[str, Any]:
    c = await RingClient.connect(topo, key)
    try:
        return await c.status()
    finally:
        await c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default="topologies/local.yaml")
    ap.add_argument("--mode", choices=("restart", "spare", "stall"), default="restart")
    ap.add_argument("--stall", type=float, default=4.0, help="seconds a stage stays stopped (stall mode)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--failover-after", type=float, default=5.0, help="decoding.failover_after_s (spare mode)")
    ap.add_argument("--dtype", default=None, help="override model.dtype")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--prompt", default="Explain in a few sentences why the sky is blue.")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
