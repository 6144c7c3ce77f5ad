"""Drafting several requests together (speculative/drafting.py, runtime/drafting.py, issue 16).

* The EAGLE drafter's shared entry point (``EagleDrafter.propose_together``) proposes for
  every request what its own ``propose`` proposes, level after level, while the accepted
  sequence moves and branches are pruned; and it runs fewer passes than the calls alone.
* Requests whose expansions are stepped together grow, round after round, the very trees
  they grow alone (float32), and decode exactly their solo tokens -- greedy for every
  strategy, and seeded sampling.
* The runtime's SharedDrafter on a real compute thread: concurrent requests share drafter
  passes and stay exact; a returned segment waiting for the thread goes before the rest of
  a running expansion; a failure stays with its own request.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch

from flowspec.model.config import ModelConfig
from flowspec.model.pipeline import LocalPipeline, greedy_generate
from flowspec.runtime.drafting import SharedDrafter
from flowspec.runtime.scoring import SharedHead
from flowspec.speculative.drafters.base import DraftCall, Drafter, DraftView, Proposals
from flowspec.speculative.drafters.eagle import EagleDrafter, EagleHead
from flowspec.speculative.drafting import DraftingStats, run_together
from flowspec.speculative.local_ring import deliver, generate_local, run_local_together
from flowspec.speculative.sampling import SamplingParams
from flowspec.speculative.strategies import STRATEGIES, Send, Speculator, TreeParams
from flowspec.speculative.tree import DraftTree, Node

from ring_helpers import tiny_tok_model  # noqa: F401  (a fixture, used by name)
from test_eagle import _head_config, _random_eagle_weights, _target

PROMPTS = ([5, 9, 33, 5, 9, 33, 5, 9, 71, 100, 3], [7, 8, 250, 31, 7, 8, 250], [12, 40, 41, 42, 12, 40, 41, 42, 12],
           [3, 3, 99])
N = 24
TREE = TreeParams(depth=4, top_k=4, total=24, segment=6, expand=12, in_flight=2)


def _head(tiny_llama: Path, draft_vocab: torch.Tensor | None = None) -> EagleHead:
    cfg, emb, lm = _target(tiny_llama)
    return EagleHead(ModelConfig.from_hf_dict(_head_config(cfg)), _random_eagle_weights(cfg), emb, lm, draft_vocab)


@pytest.fixture(scope="module")
def head(tiny_llama: Path) -> EagleHead:
    return _head(tiny_llama)


@pytest.fixture(scope="module")
def pipe(tiny_llama: Path) -> LocalPipeline:
    torch.set_num_threads(1)
    return LocalPipeline.load(tiny_llama, 2, dtype="float32", max_context=512)


def _same_proposals(got: Proposals, want: Proposals) -> None:
    """The same children, in the same order, with the same log-probabilities up to float rounding."""
    assert [[t for t, _ in p] for p in got] == [[t for t, _ in p] for p in want]
    for g, w in zip(got, want):
        if w:
            torch.testing.assert_close(torch.tensor([s for _, s in g]), torch.tensor([s for _, s in w]),
                                       rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- the drafter
@pytest.mark.parametrize("draft_vocab", [False, True])
def test_proposals_together_equal_proposals_alone(tiny_llama: Path, draft_vocab: bool) -> None:
    """Three requests (different lengths, different k), level after level: the shared entry
    point proposes what each drafter alone does. Midway one request accepts a drafted child
    (its head cache commits it and drops the pruned branches) and one node gets the
    target's feature; a request whose frontier is empty rides along."""
    head = _head(tiny_llama, torch.arange(0, 256, 3) if draft_vocab else None)
    g = torch.Generator().manual_seed(7)
    lengths, ks = (9, 5, 13), (4, 2, 4)
    trees, views = [], []
    for n in lengths:
        toks = torch.randint(0, 256, (n,), generator=g).tolist()
        tree = DraftTree()
        ids = tree.take_ids(n - 1)
        root = tree.set_root(toks[-1], ids[-1], n - 1)
        trees.append(tree)
        views.append(DraftView(ids + [root.id], toks, tree, {i: torch.randn(64, generator=g) for i in ids}))
    alone = [EagleDrafter(head, 256) for _ in lengths]
    together = [EagleDrafter(head, 256) for _ in lengths]
    saved = 0
    for level in range(5):
        if level == 2:  # request 0 accepts its best child: the chain moves, its siblings are pruned
            t0, v0 = trees[0], views[0]
            old = t0.root
            best = sorted((t0[c] for c in t0[old].children.values()), key=Node.sort_key)[0]
            v0.hidden[old] = torch.randn(64, generator=g)
            t0.advance(best.id)
            v0.chain_ids.append(best.id)
            v0.chain_tokens.append(best.token)
            deeper = [t0[c] for c in best.children.values()]
            if deeper:
                deeper[0].hidden = torch.randn(64, generator=g)  # came back from the ring
        frontiers = [t.frontier(3, 6) for t in trees]
        if level == 3:
            frontiers[1] = []  # nothing to draft this time
        want = [d.propose(v, f, k) for d, v, f, k in zip(alone, views, frontiers, ks)]
        got, count = EagleDrafter.propose_together(
            [DraftCall(d, v, f, k) for d, v, f, k in zip(together, views, frontiers, ks)])
        for gp, wp in zip(got, want):
            assert not isinstance(gp, Exception)
            _same_proposals(gp, wp)
        assert count.run <= count.alone
        saved += count.alone - count.run
        for t, f, props in zip(trees, frontiers, want):
            for node, plist in zip(f, props):
                node.expanded = True
                for tok, lp in plist:
                    t.add_child(node.id, tok, lp)
    assert saved >= 8  # every level shared its logits pass, and most their layer passes
    for a, b in zip(alone, together):
        assert a.cache.slot_of == b.cache.slot_of and a.cache.committed == b.cache.committed


def test_a_call_that_fails_fails_alone(head: EagleHead) -> None:
    """A request whose head cache is full gets its own error; the others their proposals."""
    views, drafters = [], []
    for n, cap in ((6, 256), (40, 8)):
        toks = list(range(1, n + 1))
        tree = DraftTree()
        ids = tree.take_ids(n - 1)
        root = tree.set_root(toks[-1], ids[-1], n - 1)
        views.append(DraftView(ids + [root.id], toks, tree, {i: torch.ones(64) for i in ids}))
        drafters.append(EagleDrafter(head, cap))
    got, _ = EagleDrafter.propose_together([DraftCall(d, v, [v.tree[v.tree.root]], 3) for d, v in zip(drafters, views)])
    assert not isinstance(got[0], Exception) and len(got[0][0]) == 3
    assert isinstance(got[1], Exception) and "max_context" in str(got[1])
    _same_proposals(got[0], EagleDrafter(head, 256).propose(views[0], [views[0].tree[views[0].tree.root]], 3))


# --------------------------------------------------------------------------- whole requests
def _snapshot(spec: Speculator) -> list[tuple[int, int, int, float]]:
    return sorted((n.id, n.parent, n.token, n.score) for n in spec.tree)


def _drive(pipe: LocalPipeline, specs: list[Speculator], together: bool) -> list[list[Any]]:
    """Rounds as the source runs them: every live request verifies its next returned segment,
    then grows its tree; stepped and served together, or each alone through respond() and
    think(). Each request's tree after every round, and its tokens at the end."""
    pipes = [pipe.fork() for _ in specs]
    queues: list[deque] = [deque() for _ in specs]
    seen: list[list[Any]] = [[] for _ in specs]

    def deliver(i: int, sends: list[Send]) -> None:
        for s in sends:
            if s.commit or s.drop:
                pipes[i].apply_update(s.commit, s.drop)
            if s.segment is not None:
                out = pipes[i].run_stages(s.segment)
                queues[i].append((out.node_ids, out.hidden))

    for i, spec in enumerate(specs):
        pipes[i].reset()
        deliver(i, spec.start())
    while live := [i for i, s in enumerate(specs) if not s.done]:
        items = [queues[i].popleft() for i in live]
        if together:
            answered = run_together([specs[i].respond_steps(*it) for i, it in zip(live, items)])
        else:
            answered = [specs[i].respond(*it) for i, it in zip(live, items)]
        for i, sends in zip(live, answered):
            deliver(i, sends)
        thought = (run_together([specs[i].think_steps() for i in live]) if together
                   else [specs[i].think() for i in live])
        for i, sends in zip(live, thought):
            deliver(i, sends)
            seen[i].append(_snapshot(specs[i]))
    for i, spec in enumerate(specs):
        seen[i].append(spec.output)
    return seen


@pytest.mark.parametrize("strategy", ["flowspec", "pipedec", "chunked"])
def test_requests_drafted_together_grow_their_solo_trees(pipe: LocalPipeline, head: EagleHead, strategy: str) -> None:
    """Three requests stepped together grow, round after round, the trees each grows alone
    (node ids, parents and tokens exactly; scores up to float rounding), and their tokens
    are plain greedy decoding's."""
    def specs(prompts: Sequence[list[int]]) -> list[Speculator]:
        return [Speculator(strategy, pipe.head, EagleDrafter(head, 512), p, N, (2,), tree=TREE) for p in prompts]

    together = _drive(pipe, specs(PROMPTS[:3]), True)
    for p, got in zip(PROMPTS[:3], together):
        want = _drive(pipe, specs([p]), False)[0]
        assert got[-1] == want[-1] == greedy_generate(pipe.fork(), p, N, (2,)).token_ids
        assert len(got) == len(want)
        for g, w in zip(got[:-1], want[:-1]):
            assert [n[:3] for n in g] == [n[:3] for n in w]
            # cumulative scores: a matrix product over more rows rounds differently, level after level
            torch.testing.assert_close(torch.tensor([n[3] for n in g]), torch.tensor([n[3] for n in w]),
                                       rtol=1e-4, atol=1e-4)
        assert max(len(t) for t in got[:-1]) > 3  # trees were drafted


@pytest.mark.parametrize("strategies", [STRATEGIES, ("flowspec",) * 4])
def test_in_memory_requests_together_equal_greedy_and_share_passes(pipe: LocalPipeline, head: EagleHead,
                                                                   strategies: tuple[str, ...]) -> None:
    specs = [Speculator(s, pipe.head, EagleDrafter(head, 512), p, N + 4 * i, (2,), tree=TREE)
             for i, (s, p) in enumerate(zip(strategies, PROMPTS))]
    stats = DraftingStats()
    got = run_local_together(specs, [pipe.fork() for _ in specs], stats)
    for i, (out, p) in enumerate(zip(got, PROMPTS)):
        assert out == greedy_generate(pipe.fork(), p, N + 4 * i, (2,)).token_ids, strategies[i]
    assert stats.shared_calls > 0 and stats.passes_saved > 0
    assert stats.passes.run + stats.passes_saved == stats.passes.alone


def test_in_memory_sampling_together_equals_alone(pipe: LocalPipeline, head: EagleHead) -> None:
    sp = [SamplingParams(temperature=0.9, seed=1000 + i) for i in range(3)]
    solo = [generate_local(pipe.fork(), "flowspec", p, N, EagleDrafter(head, 512), (2,), s, TREE)["token_ids"]
            for p, s in zip(PROMPTS, sp)]
    specs = [Speculator("flowspec", pipe.head, EagleDrafter(head, 512), p, N, (2,), s, TREE)
             for p, s in zip(PROMPTS, sp)]
    assert run_local_together(specs, [pipe.fork() for _ in specs]) == solo


def test_bundled_head_together_on_the_default_model(default_model_dir: Path) -> None:
    """The real head (a 12k drafting vocabulary over SmolLM2's lm_head), three requests at
    once in float32: each answer is plain greedy decoding's, and passes were shared."""
    from flowspec.model.tokenizer import Tokenizer
    from flowspec.speculative.drafters import make_drafter

    tok = Tokenizer(default_model_dir)
    big = LocalPipeline.load(default_model_dir, 2, dtype="float32", max_context=512)
    first = make_drafter("eagle", None, 49152, "float32", 512, target_folder=default_model_dir)
    prompts = [tok.encode_prompt(q) for q in ("Name three colours.", "What is a prime number?", "Say hello in French.")]
    specs = [Speculator("flowspec", big.head, first if i == 0 else first.spawn(), p, 16, tok.eos_ids,
                        tree=TreeParams(in_flight=2)) for i, p in enumerate(prompts)]
    stats = DraftingStats()
    got = run_local_together(specs, [big.fork() for _ in specs], stats)
    for out, p in zip(got, prompts):
        assert out == greedy_generate(big.fork(), p, 16, tok.eos_ids).token_ids
    assert stats.passes_saved > 0


# --------------------------------------------------------------------------- the runtime
class Request:
    """One request on its own in-memory ring (a fork of the pipeline: own caches, same weights)."""

    def __init__(self, pipe: LocalPipeline, prompt: list[int], drafter: Drafter, strategy: str = "flowspec") -> None:
        self.pipe = pipe.fork()
        self.pipe.reset()
        self.spec = Speculator(strategy, pipe.head, drafter, prompt, N, (2,), tree=TREE)
        self.results: deque = deque()
        self.deliver(self.spec.start())

    def deliver(self, sends: list[Send]) -> None:
        deliver(self.pipe, sends, self.results)


def test_shared_drafter_on_a_compute_thread(pipe: LocalPipeline, head: EagleHead) -> None:
    """Three requests driven by asyncio tasks as the source drives them (scoring shared by
    SharedHead, trees grown by SharedDrafter): exact, and drafter passes shared."""
    pool = concurrent.futures.ThreadPoolExecutor(1)
    drafting = SharedDrafter(pool)
    scorer = SharedHead(pipe.head, pool, drafting.stats)

    async def drive(r: Request) -> list[int]:
        while not r.spec.done:
            results = [r.results.popleft() for _ in range(len(r.results))]
            assert results, "nothing in flight"
            drafting.make_way()

            def then(sc: dict[int, torch.Tensor], results=results) -> Any:
                sends: list[Send] = []
                for ids, hidden, _, _ in results:
                    sends += yield from r.spec.respond_steps(ids, hidden, sc)
                return sends

            r.deliver(await scorer.respond(r.spec, results, then))
            r.deliver(await drafting.think(r.spec.think_steps))
        return r.spec.output

    async def main() -> list[list[int]]:
        reqs = [Request(pipe, list(p), EagleDrafter(head, 512)) for p in PROMPTS[:3]]
        return list(await asyncio.gather(*(drive(r) for r in reqs)))

    try:
        outs = asyncio.run(main())
    finally:
        pool.shutdown()
    for out, p in zip(outs, PROMPTS):
        assert out == greedy_generate(pipe.fork(), list(p), N, (2,)).token_ids
    st = drafting.stats
    assert st.shared_calls > 0 and st.passes_saved > 0 and st.calls > st.steps


class SlowLevels(Drafter):
    """Every call takes `seconds` and proposes one confident child; `log` records the calls.
    Not ready until `on` is set (so that start() drafts nothing)."""

    def __init__(self, log: list[str], name: str, seconds: float = 0.03, fail_at: int | None = None) -> None:
        self.log, self.who, self.seconds, self.fail_at, self.calls = log, name, seconds, fail_at, 0
        self.on = False

    def ready(self, view: DraftView, node: Node) -> bool:
        return self.on

    def propose(self, view: DraftView, frontier: list[Node], k: int) -> list[list[tuple[int, float]]]:
        self.calls += 1
        if self.calls == self.fail_at:
            raise ValueError(f"{self.who} broke")
        time.sleep(self.seconds)
        self.log.append(f"{self.who}{self.calls}")
        return [[(7, -0.01)] for _ in frontier]


def test_a_returned_segment_goes_before_the_rest_of_an_expansion(pipe: LocalPipeline) -> None:
    """While a request grows a deep tree, another's returned segment is verified after the
    current level, not after the whole expansion; a request that starts drafting meanwhile
    joins the expansion at its next level; one that fails fails alone."""
    log: list[str] = []
    deep = TreeParams(depth=8, top_k=1, total=8, segment=8, expand=8, in_flight=1)
    a = Speculator("flowspec", pipe.head, SlowLevels(log, "a"), [1, 2, 3], 4, tree=deep)
    b = Speculator("flowspec", pipe.head, SlowLevels(log, "b"), [4, 5, 6], 4, tree=deep)
    c = Speculator("flowspec", pipe.head, SlowLevels(log, "c", fail_at=2), [4, 5, 6], 4, tree=deep)
    for s in (a, b, c):
        assert len(s.start()) == 1 and len(s.tree) == 1  # the prompt's segment, nothing drafted
        s.drafter.on = True  # type: ignore[attr-defined]
    pool = concurrent.futures.ThreadPoolExecutor(1)
    drafting = SharedDrafter(pool)
    seen = threading.Event()

    async def main() -> list[Any]:
        loop = asyncio.get_running_loop()
        first = drafting.think(a.think_steps)
        deadline = time.monotonic() + 30
        while not log:  # a drafts its first level
            assert time.monotonic() < deadline, "a's expansion never drafted"
            await asyncio.sleep(0.005)
        drafting.make_way()
        verified = loop.run_in_executor(pool, lambda: log.append("verify") or seen.set())
        late = [drafting.think(b.think_steps), drafting.think(c.think_steps)]
        await verified
        return await asyncio.gather(first, *late, return_exceptions=True)

    try:
        got = asyncio.run(main())
    finally:
        pool.shutdown()
    assert seen.is_set()
    assert log.index("verify") <= 2  # after a's current level (or the next), not after its 8 levels
    # a and b drafted their whole trees (8 levels), to send when the prompt's segment is back
    assert a.tree.frontier(1, 8) == [] and len(a.tree) == 9 and got[0] == []
    assert len(b.tree) == 9 and got[1] == []
    assert isinstance(got[2], ValueError) and "c broke" in str(got[2])
    # b joined a's expansion: some of their levels were served in the same step
    assert drafting.stats.calls > drafting.stats.steps
    assert log.index("b1") < log.index("a8")


# --------------------------------------------------------------------------- a real ring
def test_concurrent_requests_on_a_ring_share_eagle_passes(tiny_tok_model: Path, tmp_path: Path) -> None:
    """Three flowspec requests at once on a real local ring whose source drafts with an EAGLE
    head (random weights, written for the tiny model): each returns exactly its greedy
    tokens, and the source's /metrics shows drafter passes that were shared."""
    import json
    import urllib.request

    from flowspec.config import Topology
    from ring_helpers import running_ring, write_topology
    from test_concurrency import _concurrently
    from test_ring import TINY_PROMPTS, reference

    _head(tiny_tok_model).save(tmp_path / "head")
    path = write_topology(tmp_path, 3, tiny_tok_model, drafter=f"eagle:{tmp_path / 'head'}",
                          # 2 of the tree's 4 segments each: their trees grow while the ring works,
                          # together (with one segment each, a request drafts only when it returns)
                          decoding={"max_active": 3, "tree": {"segment": 4, "in_flight": 4}})
    topo = Topology.load(str(path))
    reqs = [{"prompt_ids": TINY_PROMPTS[i % 2] + [40 + i], "max_new_tokens": 20, "strategy": "flowspec"}
            for i in range(3)]
    with running_ring(path, node_args=("--dtype", "float32"), log_dir=tmp_path) as r:
        done = asyncio.run(_concurrently(topo, r.key, reqs))
        url = f"http://{topo.api.host}:{topo.api.port}/metrics"
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url, timeout=5) as resp:
                    text = resp.read().decode()
                break
            except OSError:
                assert time.monotonic() < deadline, "the API did not come up"
                time.sleep(0.2)
    for req, res in zip(reqs, done):
        assert res["token_ids"] == reference(tiny_tok_model, req["prompt_ids"], req["max_new_tokens"])
    values = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln.startswith("flowspec_draft")}
    assert values["flowspec_draft_calls_total"] > 0 and values["flowspec_draft_passes_total"] > 0, json.dumps(values)
    assert values["flowspec_draft_calls_shared_total"] > 0 and values["flowspec_draft_passes_saved_total"] > 0
