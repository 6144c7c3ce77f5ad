"""What the source accepts as a formed ring: the FORM reply checked against the topology.

Pure: the FORM frame's ``ring`` list (one entry per stage, collected as the frame went
around) in, the reason the ring is unusable (or None) out; the source's formation loop
retries while there is one."""

from __future__ import annotations

from typing import Any

from ..config import Topology


def ring_problem(topo: Topology, num_layers: int, ring: Any, expected: list[str] | None = None) -> str | None:
    """Why the stages of a FORM reply cannot serve this topology, or None: the right nodes
    in ring order (`expected`: the stages of the ring plan, where a spare may sit in a dead
    stage's place; default: the file's), enough KV caches, the model's layers exactly once,
    the lm_head where decoding.verify puts it."""
    if not isinstance(ring, list) or not all(
            isinstance(r, dict) and isinstance(r.get("layers"), list) and len(r["layers"]) == 2
            and all(isinstance(x, int) for x in r["layers"]) for r in ring):
        return f"the ring's FORM reply is malformed ({str(ring)[:120]}); is every node the same FlowSpec version?"
    if expected is None:
        expected = [n.name for n in topo.stages]
    got = [str(r.get("name")) for r in ring]
    if got != expected:
        return f"the ring passes through {got}, but the ring plan lists the stages {expected}"
    need = topo.decoding.max_active
    short = [f"{r['name']} ({r['caches']})" for r in ring if isinstance(r.get("caches"), int) and r["caches"] < need]
    if short:
        return (f"stages hold fewer KV caches than decoding.max_active ({need}) asks for: {', '.join(short)}; "
                "every node must run with the same topology file")
    if topo.decoding.verify == "last_stage" and ring[-1].get("lm_head") is not True:
        return (f"decoding.verify is last_stage, but the last stage {ring[-1]['name']!r} holds no lm_head; "
                "every node must run with the same topology file")
    nxt, prev = 0, None
    for r in ring:
        a, b = r["layers"]
        if a != nxt:
            what = "overlap" if a < nxt else "leave a gap"
            after = f"node {prev['name']!r} has layers {prev['layers'][0]}-{prev['layers'][1] - 1}" \
                if prev else "the ring starts"
            return (f"layer ranges {what}: {after} but node {r['name']!r} has layers {a}-{b - 1}; "
                    f"the stages must cover layers 0-{num_layers - 1} exactly once in ring order")
        nxt, prev = b, r
    if nxt != num_layers:
        return (f"the stages end at layer {nxt - 1} (node {prev['name'] if prev else '?'!r}) but the "
                f"model has {num_layers} layers")
    return None
