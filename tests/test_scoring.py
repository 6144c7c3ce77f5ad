"""Shared lm_head passes at the source (runtime/scoring.py, Speculator.rows_to_score).

* Results verified in bursts -- several returned segments of one request, and of two
  requests at once, scored in one lm_head pass before each is verified in order -- give
  exactly single-process greedy decoding, for every strategy (float32, tiny models).
* SharedHead on a real compute thread: concurrent requests share passes, the text stays
  exact, and a failure in one request's verification stays with that request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import time
from collections import deque
from typing import Any

import pytest
import torch

from flowspec.model.pipeline import LocalPipeline, greedy_generate
from flowspec.runtime.scoring import SharedHead
from flowspec.speculative.drafters import LookupDrafter
from flowspec.speculative.drafters.draft_model import DraftModelDrafter
from flowspec.speculative.strategies import STRATEGIES, Send, Speculator, TreeParams

PROMPTS = ([5, 17, 99, 3, 42, 7, 5, 17], [9, 4, 4, 120, 33, 61, 2])
N = 32
TREE = TreeParams(depth=4, top_k=3, total=24, segment=4, expand=8, in_flight=3)


@pytest.fixture(scope="module")
def pipe(tiny_mistral) -> LocalPipeline:
    torch.set_num_threads(1)
    return LocalPipeline.load(tiny_mistral, 3, dtype="float32")


class CountingHead:
    """The pipeline's lm_head, counting passes and rows."""

    def __init__(self, head: Any) -> None:
        self.head, self.passes, self.rows = head, 0, 0

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.passes += 1
        self.rows += hidden.shape[0]
        return self.head(hidden)


class Request:
    """One request on its own in-memory ring (a fork of the pipeline: own caches, same weights)."""

    def __init__(self, pipe: LocalPipeline, strategy: str, prompt: list[int], drafter: Any, head: Any) -> None:
        self.pipe = pipe.fork()
        self.pipe.reset()
        self.spec = Speculator(strategy, head, drafter, prompt, N, (), tree=TREE)
        self.results: deque = deque()
        self.deliver(self.spec.start())

    def deliver(self, sends: list[Send]) -> None:
        for s in sends:
            if s.commit or s.drop:
                self.pipe.apply_update(s.commit, s.drop)
            if s.segment is not None:
                out = self.pipe.run_stages(s.segment)
                self.results.append((out.node_ids, out.hidden, None))


def burst_step(reqs: list[Request], rng: random.Random, head: CountingHead) -> None:
    """Take a random number of waiting results from every request, score them all in one
    pass, then let each request verify its own in order and think once."""
    taken = []
    for r in reqs:
        if r.spec.done:
            continue
        k = rng.randint(1, max(1, len(r.results)))
        taken.append((r, [r.results.popleft() for _ in range(min(k, len(r.results)))]))
    parts, owners = [], []
    for r, results in taken:
        for ids, hidden, _ in results:
            rows = r.spec.rows_to_score(ids)
            if rows:
                parts.append(hidden[rows])
                owners.append((r, [ids[i] for i in rows]))
    scored: dict[int, dict[int, torch.Tensor]] = {id(r): {} for r, _ in taken}
    if parts:
        logits = head(torch.cat(parts))
        a = 0
        for r, ids in owners:
            scored[id(r)].update(zip(ids, logits[a : a + len(ids)]))
            a += len(ids)
    for r, results in taken:
        for ids, hidden, _ in results:
            r.deliver(r.spec.respond(ids, hidden, scored[id(r)]))
        r.deliver(r.spec.think())


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", ["lookup", "draft_self"])
def test_bursts_of_two_requests_equal_greedy(pipe, tiny_mistral, strategy, kind) -> None:
    head = CountingHead(pipe.head)
    drafters = [LookupDrafter() if kind == "lookup" else
                DraftModelDrafter(LocalPipeline.load(tiny_mistral, 1, dtype="float32"), target_vocab=pipe.cfg.vocab_size)
                for _ in PROMPTS]
    reqs = [Request(pipe, strategy, list(p), d, head) for p, d in zip(PROMPTS, drafters)]
    rng = random.Random(3)
    results_seen = 0
    for _ in range(10_000):
        if all(r.spec.done for r in reqs):
            break
        results_seen += sum(min(1, len(r.results)) for r in reqs if not r.spec.done)
        burst_step(reqs, rng, head)
    for r, p in zip(reqs, PROMPTS):
        assert r.spec.done
        assert r.spec.output == greedy_generate(pipe.fork(), list(p), N).token_ids
    assert head.passes < results_seen  # the passes were shared


def test_rows_to_score_only_shrinks_and_is_empty_when_done(pipe) -> None:
    head = CountingHead(pipe.head)
    r = Request(pipe, "flowspec", list(PROMPTS[0]), LookupDrafter(), head)
    waiting = list(r.results)
    r.results.clear()
    before = [set(r.spec.rows_to_score(ids)) for ids, _, _ in waiting]
    scored: dict[int, torch.Tensor] = {}
    first_ids, first_hidden, _ = waiting[0]
    rows = r.spec.rows_to_score(first_ids)
    scored.update(zip([first_ids[i] for i in rows], pipe.head(first_hidden[rows])))
    r.deliver(r.spec.respond(first_ids, first_hidden, scored))
    after = [set(r.spec.rows_to_score(ids)) for ids, _, _ in waiting[1:]]
    for b, a in zip(before[1:], after):
        assert a <= b
    assert head.passes == 0  # respond used the logits it was given
    r.spec.done = True
    assert r.spec.rows_to_score(first_ids) == []


def test_shared_head_on_a_compute_thread(pipe) -> None:
    """Two requests driven by asyncio tasks through one SharedHead: exact, and passes shared."""
    head = CountingHead(pipe.head)
    pool = concurrent.futures.ThreadPoolExecutor(1)
    shared = SharedHead(head, pool)

    def unused_head(hidden: torch.Tensor) -> torch.Tensor:  # every row is scored by the shared passes
        raise AssertionError("a request ran its own lm_head pass")

    async def drive(r: Request) -> list[int]:
        loop = asyncio.get_running_loop()
        while not r.spec.done:
            results = [r.results.popleft() for _ in range(len(r.results))]
            assert results, "nothing in flight"

            def then(sc: dict[int, torch.Tensor], results=results) -> None:
                for ids, hidden, _ in results:
                    r.deliver(r.spec.respond(ids, hidden, sc))

            await shared.respond(r.spec, results, then)
            await loop.run_in_executor(pool, lambda: r.deliver(r.spec.think()))
        return r.spec.output

    async def main() -> list[list[int]]:
        reqs = [Request(pipe, "flowspec", list(p), LookupDrafter(), unused_head) for p in PROMPTS]
        return list(await asyncio.gather(*(drive(r) for r in reqs)))

    try:
        outs = asyncio.run(main())
    finally:
        pool.shutdown()
    for out, p in zip(outs, PROMPTS):
        assert out == greedy_generate(pipe.fork(), list(p), N).token_ids
    assert shared.stats.passes == head.passes and shared.stats.results > shared.stats.passes


def test_a_failing_request_does_not_fail_the_others(pipe) -> None:
    pool = concurrent.futures.ThreadPoolExecutor(1)
    shared = SharedHead(pipe.head, pool)
    reqs = [Request(pipe, "autoregressive", list(p), None, pipe.head) for p in PROMPTS]

    def boom(sc: dict[int, torch.Tensor]) -> None:
        raise ValueError("verification failed")

    async def main() -> list[Any]:
        block = asyncio.get_running_loop().run_in_executor(pool, lambda: time.sleep(0.2))
        jobs = [shared.respond(reqs[0].spec, [reqs[0].results[0]], boom),
                shared.respond(reqs[1].spec, [reqs[1].results[0]], lambda sc: sorted(sc))]
        await asyncio.sleep(0)
        await block
        return await asyncio.gather(*jobs, return_exceptions=True)

    try:
        first, second = asyncio.run(main())
    finally:
        pool.shutdown()
    assert isinstance(first, ValueError) and "verification failed" in str(first)
    assert second == [reqs[1].results[0][0][-1]]  # the last prompt row (the root) was scored
