"""Many requests on one ring at once (issue 16): exactness, cancellation, admission.

Unit tests of the pieces (grouped stage passes, the cache pool, the admission gate) run
in process; the ring tests start real node processes on loopback (float32, greedy, the
tiny model with SmolLM2's tokenizer) and check every concurrent answer against
single-process greedy decoding of the same target.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import yaml

from flowspec.config import Topology
from flowspec.errors import CausalityError, FlowSpecError, RingError
from flowspec.model.kvcache import CachePool
from flowspec.model.pipeline import LocalPipeline
from flowspec.model.stage import Segment
from flowspec.runtime.admission import Admission
from flowspec.runtime.client import RingClient

from ring_helpers import tiny_tok_model  # noqa: F401  (a fixture, used by name)
from ring_helpers import generate, running_ring, write_topology
from test_ring import TINY_PROMPTS, reference

STRATEGIES = ("autoregressive", "chunked", "pipedec", "flowspec")


# --------------------------------------------------------------------------- in process
def _chain(ids: list[int], first_parent: int, start: int, tokens: list[int]) -> Segment:
    return Segment(ids, [first_parent] + ids[:-1], list(range(start, start + len(ids))), tokens=torch.tensor(tokens))


def test_grouped_pass_equals_separate_passes(tiny_llama: Path) -> None:
    """Segments of two sequences (and two segments of one) in one pass give the rows and the
    caches that separate passes give; a broken segment fails alone."""
    pipe = LocalPipeline.load(tiny_llama, 1, dtype="float32")
    stage = pipe.stages[0]
    a_tok, b_tok = [5, 17, 99, 3, 42], [7, 8, 250, 31]
    # separately
    ca, cb = stage.new_cache(), stage.new_cache()
    ra = stage.forward(_chain([0, 1, 2], -1, 0, a_tok[:3]), ca)
    ra2 = stage.forward(_chain([3, 4], 2, 3, a_tok[3:]), ca)
    rb = stage.forward(_chain([0, 1, 2, 3], -1, 0, b_tok), cb)
    # together: a's two segments share a cache and are planned as one
    ga, gb, gbad = stage.new_cache(), stage.new_cache(), stage.new_cache()
    bad = Segment([0], [7], [0], tokens=torch.tensor([1]))  # names a parent nobody sent
    outs = stage.forward_many([(_chain([0, 1, 2], -1, 0, a_tok[:3]), ga), (bad, gbad),
                               (_chain([0, 1, 2, 3], -1, 0, b_tok), gb), (_chain([3, 4], 2, 3, a_tok[3:]), ga)])
    assert isinstance(outs[1], CausalityError)
    for got, want in ((outs[0], ra), (outs[2], rb), (outs[3], ra2)):
        assert not isinstance(got, FlowSpecError)
        assert got.node_ids == want.node_ids and got.positions == want.positions
        torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-5, atol=1e-5)
    for sep, grp in ((ca, ga), (cb, gb)):
        assert sep.slot_of == grp.slot_of
        for j in range(len(sep.keys)):
            torch.testing.assert_close(grp.keys[j][:, :grp.span], sep.keys[j][:, :sep.span], rtol=1e-5, atol=1e-5)
    # rows whose parent was dropped are skipped in a grouped pass too
    stage.apply_update([], [4], ga)
    out = stage.forward_many([(_chain([5], 4, 5, [9]), ga), (_chain([4, 5], 3, 4, [1, 2]), gb)])
    assert out[0].node_ids == [] and out[0].hidden.shape == (0, stage.cfg.hidden_size)
    assert out[1].node_ids == [4, 5] and out[1].hidden.shape[0] == 2


def test_cache_pool_opens_frees_and_takes_over_the_least_recent() -> None:
    from flowspec.model.kvcache import KVCache

    caches = [KVCache(1, 1, 4, 8, torch.float32) for _ in range(2)]
    pool = CachePool(caches)
    a, gone = pool.open(1)
    assert gone is None and a is caches[0]
    pool.open(2)
    assert pool.get(1) is a and pool.active == [2, 1]  # 1 was used last
    c, gone = pool.open(3)  # full: request 2, used least recently, never sent FREE
    assert gone == 2 and pool.active == [1, 3] and pool.get(2) is None
    assert pool.close(3) and not pool.close(3)
    d, gone = pool.open(4)
    assert gone is None and d is c


def test_admission_is_fifo_bounded_and_exclusive() -> None:
    async def main() -> list[str]:
        gate = Admission(2)
        order: list[str] = []
        release = {n: asyncio.Event() for n in "abcd"}

        async def request(name: str) -> None:
            async with gate.slot():
                order.append(f"+{name}")
                await release[name].wait()
            order.append(f"-{name}")

        async def probe() -> None:
            async with gate.ring_to_itself():
                order.append("probe")

        tasks = [asyncio.create_task(request("a")), asyncio.create_task(request("b"))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(probe()))  # waits for a and b; c waits behind it
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(request("c")))
        cancelled = asyncio.create_task(request("d"))
        await asyncio.sleep(0.01)
        assert gate.active == 2 and gate.waiting == 3
        cancelled.cancel()  # a waiter that gives up loses its turn and nothing else
        await asyncio.sleep(0.01)
        assert gate.waiting == 2
        release["a"].set()
        await asyncio.sleep(0.01)
        assert "probe" not in order  # b is still decoding
        release["b"].set()
        release["c"].set()
        await asyncio.gather(*tasks)
        assert gate.active == 0 and gate.waiting == 0
        return order

    assert asyncio.run(main()) == ["+a", "+b", "-a", "-b", "probe", "+c", "-c"]


# ------------------------------------------------------------------------------- rings
@pytest.fixture(scope="module")
def ring(tiny_tok_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Topology, Any]]:
    folder = tmp_path_factory.mktemp("concurrent")
    path = write_topology(folder, 4, tiny_tok_model, max_context=1024,
                          decoding={"max_active": 4, "tree": {"segment": 4, "in_flight": 3}})
    with running_ring(path, log_dir=folder) as r:
        yield Topology.load(str(path)), r


async def _concurrently(topo: Topology, key: bytes, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    clients = [await RingClient.connect(topo, key) for _ in requests]
    try:
        return list(await asyncio.wait_for(asyncio.gather(*[c.generate(r) for c, r in zip(clients, requests)]), 300))
    finally:
        for c in clients:
            await c.close()


def test_concurrent_requests_return_exactly_their_solo_tokens(ring: tuple[Topology, Any],
                                                              tiny_tok_model: Path) -> None:
    topo, r = ring
    reqs = [{"prompt_ids": TINY_PROMPTS[i % len(TINY_PROMPTS)], "max_new_tokens": 24 + 4 * i, "strategy": s,
             "trace": True} for i, s in enumerate(STRATEGIES)]
    done = asyncio.run(_concurrently(topo, r.key, reqs))
    for req, res in zip(reqs, done):
        assert res["token_ids"] == reference(tiny_tok_model, req["prompt_ids"], req["max_new_tokens"]), req["strategy"]
    # they really shared the ring: every request's decoding overlapped every other's
    spans = [(t["segments"][0]["t_sent"], t["segments"][-1]["t_back"]) for t in (d["stats"]["trace"] for d in done)]
    assert all(a0 < b1 and b0 < a1 for a0, a1 in spans for b0, b1 in spans), spans
    # and every cache was freed at the end
    assert _cached_requests(topo, r.key) == {n.name: [] for n in topo.stages}


def test_concurrent_sampling_with_seeds_equals_solo(ring: tuple[Topology, Any]) -> None:
    topo, r = ring
    reqs = [{"prompt_ids": TINY_PROMPTS[i % 2] + [11 * i + 3], "max_new_tokens": 20, "strategy": s, "temperature": 0.9,
             "seed": 1000 + i} for i, s in enumerate(("flowspec", "pipedec", "autoregressive"))]
    solo = [generate(topo, r.key, q)["token_ids"] for q in reqs]
    together = [d["token_ids"] for d in asyncio.run(_concurrently(topo, r.key, reqs))]
    assert together == solo


def _cached_requests(topo: Topology, key: bytes) -> dict[str, list[int]]:
    async def main() -> dict[str, Any]:
        c = await RingClient.connect(topo, key)
        try:
            return await c.probe({"op": "caches"}, 30)
        finally:
            await c.close()

    return {rec["node"]: rec["requests"] for rec in asyncio.run(main())["results"]}


def test_cancelling_one_request_leaves_the_others_exact_and_frees_its_caches(
        ring: tuple[Topology, Any], tiny_tok_model: Path) -> None:
    topo, r = ring

    async def main() -> tuple[list[dict[str, Any]], int]:
        victim = await RingClient.connect(topo, r.key)
        got = 0

        async def doomed() -> None:
            nonlocal got
            async for ev in victim.stream({"prompt_ids": TINY_PROMPTS[0] + [77, 5], "max_new_tokens": 400,
                                           "strategy": "flowspec"}):
                got += len(ev.get("ids") or [])
                if got >= 8:
                    await victim.cancel()

        others = [{"prompt_ids": TINY_PROMPTS[i], "max_new_tokens": 60, "strategy": s}
                  for i, s in enumerate(("flowspec", "pipedec"))]
        task = asyncio.create_task(doomed())
        rest = asyncio.create_task(_concurrently(topo, r.key, others))
        with pytest.raises(FlowSpecError, match="cancelled"):
            await asyncio.wait_for(task, 120)
        await victim.close()
        return await rest, got

    done, got = asyncio.run(main())
    assert got >= 8
    assert done[0]["token_ids"] == reference(tiny_tok_model, TINY_PROMPTS[0], 60)
    assert done[1]["token_ids"] == reference(tiny_tok_model, TINY_PROMPTS[1], 60)
    assert _cached_requests(topo, r.key) == {n.name: [] for n in topo.stages}


# -------------------------------------------------------------------------------- HTTP
def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_full_queue_is_a_429_with_retry_after_and_a_dead_stage_fails_every_request(
        tiny_tok_model: Path, tmp_path: Path) -> None:
    path = write_topology(tmp_path, 3, tiny_tok_model, max_context=2048, decoding={"max_active": 2})
    d = yaml.safe_load(path.read_text())
    d["api"]["queue_size"] = 1
    path.write_text(yaml.safe_dump(d, sort_keys=False))
    topo = Topology.load(str(path))
    url = f"http://{topo.api.host}:{topo.api.port}/v1/chat/completions"
    with running_ring(path, node_args=("--dtype", "float32")) as r:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url.replace("/v1/chat/completions", "/health"), timeout=2)
                break
            except (OSError, urllib.error.URLError):
                assert time.monotonic() < deadline, "the API did not come up"
                time.sleep(0.2)

        async def main() -> tuple[list[Any], tuple[int, dict[str, Any], dict[str, str]]]:
            long = {"prompt_ids": TINY_PROMPTS[0], "max_new_tokens": 1500, "strategy": "autoregressive"}
            clients = [await RingClient.connect(topo, r.key) for _ in range(3)]
            running = [asyncio.create_task(c.generate(long)) for c in clients]  # 2 decode, 1 waits
            await asyncio.sleep(1.0)
            loop = asyncio.get_running_loop()
            refused = await loop.run_in_executor(None, _post, url, {
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
            victim = next(p for p in r.procs if p.name == "stage2")
            victim.proc.kill()
            results = await asyncio.gather(*running, return_exceptions=True)
            for c in clients:
                await c.close()
            return results, refused

        results, (status, body, headers) = asyncio.run(main())
        assert status == 429 and body["error"]["code"] == "queue_full", body
        assert "decoding.max_active" in body["error"]["message"] and int(headers["Retry-After"]) >= 1
        # the stage died: both active requests fail with a message that names it, the queued one too
        assert len(results) == 3 and all(isinstance(e, (RingError, FlowSpecError)) for e in results), results
        assert sum("stage2" in str(e) for e in results) >= 2, results
