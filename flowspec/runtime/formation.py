"""Ring formation at the source: FORM around the ring, and what it accepts as a formed ring.

``RingFormer`` sends a FORM frame whenever both of the source's links are up and the ring
is not formed; every stage appends what it holds, and ``ring_problem`` (pure: the FORM
frame's ``ring`` list in, the reason the ring is unusable or None out) checks the reply
against the topology. The source is told of a formed ring or of a problem, and retries."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from ..config import Topology
from .links import RingLinks
from .protocol import Frame, FrameType
from .transport import PeerGone

log = logging.getLogger(__name__)

# a FORM that has not come back around the ring by then is sent again (it is lost at a stage with no
# successor; 1 s bounds how long a ring that is whole again waits before it forms)
FORM_TIMEOUT_S = 1.0
PROBLEM_RETRY_S = 5.0  # a ring that came back unusable (a wrong topology somewhere) is asked again after this


class RingFormer:
    """The source's formation loop: whenever both links are up and the ring is not formed
    (``ready`` clear), send FORM around it and check the reply."""

    def __init__(self, topo: Topology, name: str, num_layers: int, links: RingLinks, ready: asyncio.Event,
                 on_formed: Callable[[list[dict[str, Any]]], None], on_problem: Callable[[str], None]) -> None:
        self.topo, self.name, self.num_layers, self.links, self.ready = topo, name, num_layers, links, ready
        self.on_formed = on_formed  # the ring's stages, as the FORM reply lists them: the ring is formed
        self.on_problem = on_problem  # why the ring that answered cannot serve (it is asked again later)
        self._waiter: asyncio.Future[Frame] | None = None  # the FORM in flight's reply

    def reply(self, f: Frame) -> None:
        """A FORM frame came back around the ring (from the last stage)."""
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(f)

    async def run(self) -> None:
        while True:
            await self.links.down_ready.wait()
            await self.links.up_ready.wait()
            if self.ready.is_set():
                await asyncio.sleep(0.2)
                continue
            self._waiter = asyncio.get_running_loop().create_future()
            down = self.links.downstream
            if down is None:
                await asyncio.sleep(0.1)
                continue
            try:
                plan = self.links.plan  # the stages follow it (a spare may sit in a dead stage's place)
                await down.send(Frame(FrameType.FORM, meta={"ring": [], "plan": plan.as_meta()}))
                f = await asyncio.wait_for(self._waiter, FORM_TIMEOUT_S)
            except (asyncio.TimeoutError, PeerGone, ConnectionError, OSError) as e:
                log.debug("%s: ring formation will be tried again: %s", self.name, e or type(e).__name__)
                await asyncio.sleep(0.1)
                continue
            if f.meta.get("plan", plan.as_meta()) != plan.as_meta():
                continue  # a late reply to a FORM sent under an older plan: ask again
            ring = f.meta.get("ring") or []
            problem = ring_problem(self.topo, self.num_layers, ring, list(plan.order[1:]))
            if problem:
                log.error("%s: ring formation failed (trying again in %g s): %s", self.name, PROBLEM_RETRY_S,
                          problem)
                self.on_problem(problem)
                await asyncio.sleep(PROBLEM_RETRY_S)
                continue
            self.on_formed(ring)


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
    if topo.decoding.lm_head_at_last_stage and ring[-1].get("lm_head") is not True:
        return (f"decoding.verify is {topo.decoding.verify}, but the last stage {ring[-1]['name']!r} holds no "
                "lm_head; every node must run with the same topology file")
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
