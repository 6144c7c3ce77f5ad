#!/usr/bin/env python
"""How long a decoding answer pauses while a long prompt is prefilled beside it.

Starts the nodes of a topology on this machine (a key of its own, no HTTP API), streams an
answer (request A), and once A has produced 10 tokens sends request B with a long prompt
(about 1,350 tokens: several prefill chunks). Reports, per round, A's longest pause between
two token events while B is being answered, and B's time to first token:

    python tools/prefill_stall.py --topology topologies/local.yaml --rounds 4

Since a request that shares the ring sends its prompt a few chunks at a time (see
Speculator.limit_in_flight), A's pause is about one chunk's passes, not the whole prefill.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import time
from typing import Any

from flowspec.config import Topology
from flowspec.runtime.client import RingClient, wait_formed
from flowspec.runtime.launcher import LocalRing

LONG = ("Summarize the following notes. " + "The committee met on Tuesday to review the budget, the hiring plan "
        "and the schedule for the new building; several members asked for more detail. ") * 45


async def rounds(topo: Topology, key: bytes, n: int, strategy: str) -> list[dict[str, float]]:
    a = await RingClient.connect(topo, key)
    b = await RingClient.connect(topo, key)
    out: list[dict[str, float]] = []
    try:
        for _ in range(n):
            gaps: list[float] = []
            ttft: dict[str, float] = {}

            async def long_one() -> None:
                t0 = time.perf_counter()
                async for ev in b.stream({"prompt": LONG, "max_new_tokens": 8, "strategy": strategy}):
                    if ev["type"] == "tokens" and "t" not in ttft:
                        ttft["t"] = time.perf_counter() - t0

            task: asyncio.Task[None] | None = None
            t_last, got = 0.0, 0
            async for ev in a.stream({"prompt": "Write a long story about a fox.", "max_new_tokens": 160,
                                      "strategy": strategy}):
                if ev["type"] != "tokens":
                    continue
                now = time.perf_counter()
                got += len(ev["ids"])
                if task is not None and not task.done():
                    gaps.append(now - t_last)
                t_last = now
                if got >= 10 and task is None:
                    task = asyncio.create_task(long_one())
            if task is None:
                raise RuntimeError("request A ended before 10 tokens; use a longer answer")
            await task
            row = {"longest_pause_s": max(gaps) if gaps else 0.0, "long_prompt_ttft_s": ttft["t"]}
            out.append(row)
            print(", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
    finally:
        await a.close()
        await b.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--topology", default="topologies/local.yaml", help="default: %(default)s")
    ap.add_argument("--rounds", type=int, default=4, help="default: %(default)s")
    ap.add_argument("--strategy", default="flowspec", help="default: %(default)s")
    args = ap.parse_args()
    topo = Topology.load(args.topology)
    key = secrets.token_hex(16)
    ring = LocalRing(args.topology, topo, ["--no-api"], threads=1,
                     extra_env={topo.security.key_env: key})
    try:
        ring.start()
        asyncio.run(wait_formed(topo, key.encode(), 300, ring.check_alive))
        rows = asyncio.run(rounds(topo, key.encode(), args.rounds, args.strategy))
        print("median: " + ", ".join(f"{k} {statistics.median(r[k] for r in rows):.2f} s" for k in rows[0]))
    finally:
        ring.stop()


if __name__ == "__main__":
    main()
