"""Decoding strategies over in-memory rings: exactness, lossless sampling, reproducibility.

* Every strategy, greedy, equals single-process greedy decoding token for token (float32,
  tiny random models, rings of 2 to 6 stages) whatever the drafter: prompt lookup, a draft
  model (a noisy copy of the target, and the target itself), an oracle that is always
  right, a drafter that is always wrong, random drafts, and all-zero scores (ties); with EOS
  inside the tree, max_new_tokens landing inside a segment, long prompts prefilled in
  chunks and many tree shapes.
* Sampling is lossless: the empirical distribution of the first generated tokens matches
  the target's exact distribution (enumerated from its logits), and a deliberately wrong
  acceptance rule is rejected by the same test; the same for SpecInfer's multi-candidate
  rule. Token choice is keyed by (seed, position), so every strategy samples exactly the
  text plain autoregressive sampling does.
* Unit tests of the draft tree, prompt lookup and the sampling helpers.
"""

from __future__ import annotations

import copy
import math
import random
import signal
from collections import Counter, deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowspec.model.pipeline import LocalPipeline, greedy_generate
from flowspec.speculative import strategies as strategies_mod
from flowspec.speculative.drafters import LookupDrafter
from flowspec.speculative.drafters.base import Drafter, DraftView
from flowspec.speculative.drafters.draft_model import DraftModelDrafter
from flowspec.speculative.local_ring import deliver, generate_local, run_local
from flowspec.speculative.schedules import SHARED_LEVELS
from flowspec.speculative.sampling import SamplingParams, choose_token, position_uniform, sample_from, target_probs
from flowspec.speculative.strategies import STRATEGIES, Speculator, TreeParams
from flowspec.speculative.tree import DraftTree, Node
from flowspec.speculative.verify import accept_deterministic, accept_multi_candidate

from conftest import build_tiny_hf_model, save_tiny_model, tiny_hf_config
from drafters_for_tests import (
    AlwaysWrong,
    FixedDrafter,
    NotReadyDrafter,
    Oracle,
    RandomDrafter,
    ReferenceModel,
    ZeroLogprob,
    context_rng,
)

stats_mod = pytest.importorskip("scipy.stats")

# The tiny Mistral's greedy continuation of this prompt falls into a loop
# (... 100 152 242 100 152 242 ...), so prompt lookup gets drafts accepted.
PROMPT = [5, 17, 99, 3, 42, 7, 5, 17]
N = 40
SPEC = ("chunked", "pipedec", "flowspec")
DRAFTERS = ("lookup", "draft_noisy", "draft_self", "oracle", "wrong", "random", "ties")
SMALL_VOCAB = 8
P_MIN = 1e-3  # a lossless run must not be rejected at this level
P_WRONG = 1e-6  # a wrong rule must be rejected at this level


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run faster on one thread (and the machine has two cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Env:
    """Tiny models by name, pipelines per (model, stages), cached references and drafters."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders
        self._pipes: dict[tuple[str, int], LocalPipeline] = {}
        self._greedy: dict[tuple, list[int]] = {}
        self._refs: dict[tuple[str, SamplingParams], ReferenceModel] = {}

    def pipe(self, model: str, stages: int) -> LocalPipeline:
        key = (model, stages)
        if key not in self._pipes:
            self._pipes[key] = LocalPipeline.load(self.folders[model], stages, dtype="float32")
            assert len(self._pipes[key].stages) == stages
        return self._pipes[key]

    def vocab(self, model: str) -> int:
        return self.pipe(model, 1).cfg.vocab_size

    def greedy(self, model: str, prompt: Sequence[int], n: int, eos: Sequence[int] = (),
               chunk: int = 256) -> list[int]:
        """Single-process greedy decoding (one stage): the ground truth."""
        key = (model, tuple(prompt), n, tuple(eos), chunk)
        if key not in self._greedy:
            self._greedy[key] = greedy_generate(self.pipe(model, 1), list(prompt), n, eos, chunk).token_ids
        return self._greedy[key]

    def autoregressive(self, model: str, prompt: Sequence[int], n: int, sampling: SamplingParams,
                       eos: Sequence[int] = ()) -> list[int]:
        """Plain autoregressive decoding (one stage) with the same sampling parameters."""
        key = (model, tuple(prompt), n, tuple(eos), sampling)
        if key not in self._greedy:
            self._greedy[key] = generate_local(self.pipe(model, 1), "autoregressive", list(prompt), n,
                                               eos_ids=eos, sampling=sampling)["token_ids"]
        return self._greedy[key]

    def ref(self, model: str, sampling: SamplingParams = SamplingParams()) -> ReferenceModel:
        key = (model, sampling)
        if key not in self._refs:
            self._refs[key] = ReferenceModel(self.folders[model], sampling)
        return self._refs[key]

    def drafter(self, kind: str, model: str, prompt: Sequence[int], n: int,
                sampling: SamplingParams = SamplingParams()) -> Drafter | None:
        if kind == "none":
            return None
        if kind == "lookup":
            return LookupDrafter()
        if kind == "draft_noisy":  # a second model with the same vocabulary: sometimes right
            return DraftModelDrafter(self.pipe("noisy", 1), target_vocab=self.vocab(model))
        if kind == "draft_self":  # the target as its own draft model: top-1 always right (greedy)
            return DraftModelDrafter(LocalPipeline.load(self.folders[model], 1, dtype="float32"),
                                     target_vocab=self.vocab(model))
        if kind == "oracle":
            return Oracle(self.ref(model, sampling), wrong=2)
        if kind == "wrong":
            cont = (self.greedy(model, prompt, n + 12) if sampling.greedy
                    else self.autoregressive(model, prompt, n + 12, sampling))
            return AlwaysWrong(list(prompt) + cont, self.vocab(model))
        if kind == "random":
            return RandomDrafter(self.vocab(model), seed=11)
        if kind == "ties":
            return ZeroLogprob(seed=3)
        raise KeyError(kind)


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A tiny Llama with a vocabulary of 8: exact distributions can be enumerated."""
    model = build_tiny_hf_model(tiny_hf_config("tiny_llama", vocab_size=SMALL_VOCAB), seed=4321)
    return save_tiny_model(model, tmp_path_factory.mktemp("small_vocab")), model


@pytest.fixture(scope="module")
def env(tiny_mistral, tiny_qwen2, tiny_llama3_tied, tiny_hf_model, small_vocab_model,
        tmp_path_factory) -> Env:
    # a noisy copy of the tiny Mistral: a draft model that agrees with the target only sometimes
    noisy = copy.deepcopy(tiny_hf_model("tiny_mistral"))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.03 * torch.randn(p.shape, generator=g))
    noisy_dir = save_tiny_model(noisy, tmp_path_factory.mktemp("noisy_mistral"))
    return Env({"mistral": tiny_mistral, "qwen2": tiny_qwen2, "llama3": tiny_llama3_tied,
                "noisy": noisy_dir, "small": small_vocab_model[0]})


def check_stats(res: dict, strategy: str, prompt_len: int, chunk: int = 256) -> dict:
    """Invariants every run's counters satisfy."""
    s, out = res["stats"], res["token_ids"]
    assert s["new_tokens"] == len(out)
    assert s["verified"] <= s["drafted"]
    assert s["accepted_drafts"] <= s["drafted"]
    assert s["pruned_sent"] <= s["pruned"] <= s["drafted"]
    assert s["pruned_sent"] <= s["verified"]
    assert 1 <= s["rounds"] <= s["new_tokens"]
    assert s["tau"] >= 1
    # every output token is an accepted draft or ends a round (the last one may do both)
    assert s["accepted_drafts"] + s["rounds"] in (s["new_tokens"], s["new_tokens"] + 1)
    assert 1 <= s["verifications"] <= s["new_tokens"]
    assert s["mean_accepted"] == round(s["new_tokens"] / s["verifications"], 3)
    # acceptance by depth: one step per output token, one accepted step per accepted draft;
    # a round ends missed or undrafted, unless the request's end cut it
    assert sum(s["depth_steps"]) == s["new_tokens"]
    assert sum(s["depth_accepted"]) == s["accepted_drafts"]
    assert all(0 <= a <= n for a, n in zip(s["depth_accepted"], s["depth_steps"], strict=True))
    assert s["depth_steps"][0] == s["rounds"]  # every round starts at depth 0
    assert s["ends_missed"] + s["ends_undrafted"] in (s["rounds"], s["rounds"] - 1)
    if strategy == "autoregressive":
        assert s["drafted"] == s["accepted_drafts"] == 0
        assert s["ends_undrafted"] == s["rounds"] == s["new_tokens"] and s["ends_missed"] == 0
        assert s["depth_steps"] == [s["new_tokens"]] and s["depth_accepted"] == [0]
        assert s["segments_sent"] == math.ceil(prompt_len / chunk) + len(out) - 1
    return s


def check_caches(spec: Speculator, pipe: LocalPipeline) -> None:
    """After a run every stage has committed a prefix of the accepted chain (the rest is still
    queued for commit) and holds no speculative node the source has forgotten: everything
    pruned was dropped in band, or is queued to be."""
    pending = set(spec.tree.nodes) | set(spec._to_drop) | set(spec._to_commit)
    for i, stage in enumerate(pipe.stages):
        cache = stage.cache
        assert cache.committed + spec._to_commit == spec._chain_ids, f"stage {i}: committed prefix"
        stray = set(cache.parent_of) - pending
        assert not stray, f"stage {i} still holds pruned nodes {sorted(stray)[:10]}"


def run(env: Env, model: str, stages: int, strategy: str, prompt: Sequence[int], n: int,
        drafter: Drafter | None, eos: Sequence[int] = (), sampling: SamplingParams = SamplingParams(),
        tree: TreeParams = TreeParams(), chunk: int = 256, verify: str = "source") -> dict:
    pipe = env.pipe(model, stages)
    spec = Speculator(strategy, pipe.head, drafter, list(prompt), n, eos, sampling, tree, chunk)
    res = run_local(spec, pipe, verify)
    assert res["token_ids"] == spec.output and spec.done
    check_stats(res, strategy, len(prompt), chunk)
    check_caches(spec, pipe)
    return res


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Turn a hang (an endless loop in a strategy) into a test failure."""

    def boom(signum, frame):  # pragma: no cover - only on a regression
        raise TimeoutError(f"no result within {seconds} s: the strategy loops")

    old = signal.signal(signal.SIGALRM, boom)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


# -------------------------------------------------------- 1. greedy: exactly the reference
RINGS = [("mistral", 2), ("mistral", 3), ("qwen2", 6), ("mistral", 5), ("llama3", 4), ("mistral", 4)]
MATRIX = [(s, d, RINGS[(i + j) % len(RINGS)]) for i, s in enumerate(SPEC) for j, d in enumerate(DRAFTERS)]


@pytest.mark.parametrize("strategy,kind,ring", MATRIX, ids=[f"{s}-{d}-{m}{k}" for s, d, (m, k) in MATRIX])
def test_greedy_equals_single_process(env, strategy, kind, ring) -> None:
    model, stages = ring
    expected = env.greedy(model, PROMPT, N)
    res = run(env, model, stages, strategy, PROMPT, N, env.drafter(kind, model, PROMPT, N))
    assert res["token_ids"] == expected
    s = res["stats"]
    if kind == "wrong":
        assert s["accepted_drafts"] == 0 and s["tau"] == 1.0 and s["drafted"] > 0
        assert s["rounds"] == N
    if kind in ("oracle", "draft_self"):
        assert s["accepted_drafts"] > N // 3
        if strategy != "pipedec":  # pipedec verifies one level per trip by design
            assert s["mean_accepted"] > 1
    if kind == "oracle" and strategy in ("chunked", "flowspec"):
        assert s["tau"] > 2
    if kind in ("lookup", "ties") and model == "mistral":
        assert s["accepted_drafts"] > 0  # the loop in the continuation is found


LAST = [(s, d, RINGS[(i + 2 * j) % len(RINGS)]) for i, s in enumerate(STRATEGIES)
        for j, d in enumerate(("lookup", "oracle", "wrong", "draft_self"))]


@pytest.mark.parametrize("strategy,kind,ring", LAST, ids=[f"{s}-{d}-{m}{k}" for s, d, (m, k) in LAST])
def test_last_stage_verification_equals_single_process(env, strategy, kind, ring) -> None:
    """decoding.verify: last_stage -- the tokens chosen after the last stage, not at the source."""
    model, stages = ring
    res = run(env, model, stages, strategy, PROMPT, N, env.drafter(kind, model, PROMPT, N), verify="last_stage")
    assert res["token_ids"] == env.greedy(model, PROMPT, N)
    if kind == "oracle" and strategy != "autoregressive":
        assert res["stats"]["accepted_drafts"] > N // 3


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_last_stage_verification_needs_no_lm_head_at_the_source(env, strategy) -> None:
    """Every row the source verifies came with its token: the source's lm_head never runs,
    prompt rows before the root are not scored, and a long prompt prefills in chunks."""
    pipe = env.pipe("mistral", 3)

    def no_head(hidden: torch.Tensor) -> torch.Tensor:
        raise AssertionError(f"the source's lm_head ran on {hidden.shape[0]} rows")

    spec = Speculator(strategy, no_head, env.drafter("oracle", "mistral", PROMPT, N), list(PROMPT), N,
                      (), SamplingParams(), TreeParams(), 4)
    scored: list[int] = []
    real = pipe.head

    def counting(hidden: torch.Tensor) -> torch.Tensor:
        scored.append(hidden.shape[0])
        return real(hidden)

    pipe.head = counting  # the lm_head the local ring's "last stage" uses
    try:
        res = run_local(spec, pipe, "last_stage")
    finally:
        pipe.head = real
    assert res["token_ids"] == env.greedy("mistral", PROMPT, N)
    st = res["stats"]
    # drafted rows and one root per token at most: no prompt row but the root's was scored
    assert st["new_tokens"] <= sum(scored) <= st["verified"] + st["new_tokens"] + 1


@pytest.mark.parametrize("ring", RINGS, ids=[f"{m}{k}" for m, k in RINGS])
def test_autoregressive_equals_single_process(env, ring) -> None:
    model, stages = ring
    res = run(env, model, stages, "autoregressive", PROMPT, N, LookupDrafter())
    assert res["token_ids"] == env.greedy(model, PROMPT, N)
    assert res["stats"]["tau"] == 1.0


def test_drafters_exercise_both_paths(env) -> None:
    """The adversarial drafters do what they claim on the reference model."""
    for strategy in ("chunked", "flowspec"):
        oracle = run(env, "mistral", 2, strategy, PROMPT, N, env.drafter("oracle", "mistral", PROMPT, N))
        wrong = run(env, "mistral", 2, strategy, PROMPT, N, env.drafter("wrong", "mistral", PROMPT, N))
        assert oracle["stats"]["mean_accepted"] > 1 and oracle["stats"]["tau"] > 2
        assert wrong["stats"]["accepted_drafts"] == 0 and wrong["stats"]["pruned_sent"] > 0
        # every round the wrong drafter had children for ends missed, at depth 0
        assert wrong["stats"]["ends_missed"] > 0 and wrong["stats"]["depth_accepted"] == [0]
        # the oracle never misses; Chunk-PP's rounds end where its tree ends, while flowspec
        # expands from the frontier so that its one round lasts the whole answer
        assert oracle["stats"]["ends_missed"] == 0
        if strategy == "chunked":
            assert oracle["stats"]["ends_undrafted"] == oracle["stats"]["rounds"] - 1 > 0
        else:
            assert oracle["stats"]["rounds"] == 1 and oracle["stats"]["ends_undrafted"] == 0
    # the noisy draft model is right sometimes and wrong sometimes
    noisy = run(env, "mistral", 3, "flowspec", PROMPT, N, env.drafter("draft_noisy", "mistral", PROMPT, N))
    assert 0 < noisy["stats"]["accepted_drafts"] < N - 1


TREES = [
    TreeParams(depth=1, top_k=1, total=1, segment=1, expand=1, in_flight=1),
    TreeParams(depth=1, top_k=8, total=8, segment=4, expand=8, in_flight=2),
    TreeParams(depth=2, top_k=3, total=10, segment=1, expand=5, in_flight=5),
    TreeParams(depth=3, top_k=2, total=80, segment=16, expand=40, in_flight=3),
    TreeParams(depth=4, top_k=4, total=30, segment=4, expand=4, in_flight=1),
    TreeParams(),  # depth 5, top_k 8, total 64, segment 16, expand 32, in_flight 3
    TreeParams(depth=6, top_k=1, total=6, segment=1, expand=1, in_flight=4),
    TreeParams(depth=6, top_k=2, total=80, segment=4, expand=16, in_flight=5),
    TreeParams(depth=6, top_k=8, total=80, segment=16, expand=80, in_flight=2),
    TreeParams(depth=3, top_k=5, total=20, segment=2, expand=3, in_flight=4),
]
TREE_DRAFTERS = ("oracle", "lookup", "random", "ties", "wrong")
TREE_CASES = [(s, t, TREE_DRAFTERS[(i + j) % len(TREE_DRAFTERS)], 2 + (i + 2 * j) % 4)
              for i, t in enumerate(TREES) for j, s in enumerate(SPEC)]


@pytest.mark.parametrize("strategy,tree,kind,stages", TREE_CASES,
                         ids=[f"{s}-t{i // 3}-{d}-{k}" for i, (s, _, d, k) in enumerate(TREE_CASES)])
def test_tree_shapes(env, strategy, tree, kind, stages) -> None:
    n = 25
    res = run(env, "mistral", stages, strategy, PROMPT, n, env.drafter(kind, "mistral", PROMPT, n), tree=tree)
    assert res["token_ids"] == env.greedy("mistral", PROMPT, n)
    s = res["stats"]
    if kind == "oracle":
        # the oracle's path is as deep as the tree allows
        assert s["accepted_drafts"] >= (n - 1) * tree.depth // (tree.depth + 1) - 1
    if kind == "wrong":
        assert s["accepted_drafts"] == 0


def eos_choices(greedy: list[int], n: int) -> list[int]:
    """Tokens of the greedy continuation whose first occurrence falls early, midway and late."""
    first: dict[int, int] = {}
    for i, t in enumerate(greedy[:n]):
        first.setdefault(t, i)
    picks = []
    for target in (2, n // 3, (2 * n) // 3):
        tok = min((t for t in first if first[t] >= 1 and t not in picks), key=lambda t: abs(first[t] - target))
        picks.append(tok)
    return picks


@pytest.mark.parametrize("strategy", SPEC + ("autoregressive",))
@pytest.mark.parametrize("kind", ["oracle", "lookup", "ties"])
def test_eos_inside_the_tree(env, strategy, kind) -> None:
    full = env.greedy("mistral", PROMPT, N)
    for which, eos in enumerate(eos_choices(full, N)):
        expected = env.greedy("mistral", PROMPT, N, eos=[eos])
        assert expected[-1] == eos and len(expected) < N and eos not in expected[:-1]
        res = run(env, "mistral", 2 + which, strategy, PROMPT, N, env.drafter(kind, "mistral", PROMPT, N),
                  eos=[eos], tree=TreeParams(depth=5, top_k=3, total=24, segment=4, expand=8, in_flight=3))
        assert res["token_ids"] == expected
        if kind == "oracle" and strategy != "autoregressive":
            # the EOS was a drafted node with drafted descendants: generation stopped inside the tree
            assert res["stats"]["drafted"] > len(expected)
            assert res["stats"]["accepted_drafts"] > 0
    # several stop ids: the first one produced wins
    a, b = eos_choices(full, N)[1:]
    expected = env.greedy("mistral", PROMPT, N, eos=[b, a])
    res = run(env, "mistral", 3, strategy, PROMPT, N, env.drafter(kind, "mistral", PROMPT, N), eos=[b, a])
    assert res["token_ids"] == expected and expected[-1] == a


@pytest.mark.parametrize("strategy", SPEC + ("autoregressive",))
def test_max_new_tokens_inside_a_segment(env, strategy) -> None:
    full = env.greedy("mistral", PROMPT, N)
    for i, n in enumerate([1, 2, 3, 4, 6, 9, 13, 17, 24, 31, 40]):
        kind = ("oracle", "lookup", "random")[i % 3]
        res = run(env, "mistral", 2 + i % 4, strategy, PROMPT, n, env.drafter(kind, "mistral", PROMPT, n),
                  tree=TreeParams(depth=6, top_k=2, total=40, segment=8, expand=16, in_flight=2))
        assert res["token_ids"] == full[:n], (n, kind)


def long_prompt(length: int = 300, seed: int = 5) -> list[int]:
    """Random tokens with repeated passages, so lookup finds matches in the prompt."""
    rng = random.Random(seed)
    motifs = [[rng.randrange(256) for _ in range(rng.randint(4, 12))] for _ in range(6)]
    out: list[int] = []
    while len(out) < length:
        out += rng.choice(motifs) if rng.random() < 0.6 else [rng.randrange(256) for _ in range(rng.randint(1, 6))]
    return out[:length]


@pytest.mark.parametrize("strategy", SPEC + ("autoregressive",))
@pytest.mark.parametrize("kind", ["lookup", "oracle"])
def test_long_prompt_prefilled_in_chunks(env, strategy, kind) -> None:
    prompt = long_prompt()
    n = 20
    expected = env.greedy("mistral", prompt, n, chunk=64)
    res = run(env, "mistral", 3, strategy, prompt, n, env.drafter(kind, "mistral", prompt, n), chunk=64)
    assert res["token_ids"] == expected
    assert res["stats"]["segments_sent"] >= 5  # 300 tokens in chunks of 64


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("share", [1, 2])
def test_a_request_sharing_the_ring_sends_its_prompt_a_few_chunks_at_a_time(env, strategy, share) -> None:
    """With `share` of its tree's 4 segments in flight (other requests fill the ring), a
    request sends its prompt `share` chunks at a time, the next as one comes back, then the
    first speculative segments after the last: exactly plain greedy decoding's tokens, the
    caches as alone."""
    prompt = long_prompt()  # 300 tokens: 5 chunks of 64
    n = 20
    pipe = env.pipe("mistral", 3)
    spec = Speculator(strategy, pipe.head, env.drafter("lookup", "mistral", prompt, n), prompt, n, (),
                      SamplingParams(), TreeParams(depth=3, top_k=3, total=24, segment=4, expand=8, in_flight=4),
                      prefill_chunk=64)
    spec.limit_in_flight(share)
    first = spec.start()
    assert [len(s.segment.node_ids) for s in first] == [64] * share  # the window, no speculation yet
    assert spec.think() == []  # nothing drafted while the prompt goes out
    spec2 = Speculator(strategy, pipe.head, env.drafter("lookup", "mistral", prompt, n), prompt, n, (),
                       SamplingParams(), spec.p, prefill_chunk=64)
    spec2.limit_in_flight(share)
    res = run_local(spec2, pipe)
    assert res["token_ids"] == env.greedy("mistral", prompt, n, chunk=64)
    check_stats(res, strategy, len(prompt), 64)
    check_caches(spec2, pipe)


@pytest.mark.parametrize("kind,sampling", [("oracle", SamplingParams()), ("draft_noisy", SamplingParams()),
                                           ("oracle", SamplingParams(temperature=0.8, seed=5))],
                         ids=["oracle-greedy", "noisy-greedy", "oracle-sampled"])
def test_flowspec_with_one_segment_in_the_ring_drafts_when_it_returns(env, kind, sampling) -> None:
    """flowspec sharing the ring with one segment of its own (others fill the rest): nothing
    is drafted while that segment flies; when it returns, the next segment carries the new root
    with the best nodes of its first SHARED_LEVELS levels. The tokens stay plain decoding's."""
    n = 30
    pipe = env.pipe("mistral", 3)
    tree = TreeParams(depth=4, top_k=3, total=32, segment=8, expand=16, in_flight=4)
    spec = Speculator("flowspec", pipe.head, env.drafter(kind, "mistral", PROMPT, n, sampling), list(PROMPT), n,
                      (), sampling, tree)
    spec.limit_in_flight(1, shared=True)
    pipe.reset()
    back: deque = deque()
    deliver(pipe, spec.start(), back)
    depths: list[int] = []
    while not spec.done:
        assert len(back) == 1  # one segment in the ring, always
        ids, hidden, _, _ = back.popleft()
        sends = spec.respond(ids, hidden)
        for s in sends:
            if s.segment is not None:
                ids = s.segment.node_ids
                assert len(ids) <= tree.segment
                depths.append(max(spec.tree.depth(i) for i in ids if i in spec.tree))
        drafted = spec.stats.drafted
        assert spec.think() == [] and spec.stats.drafted == drafted  # nothing drafted in flight
        deliver(pipe, sends, back)
    want = (env.greedy("mistral", PROMPT, n) if sampling.greedy
            else env.autoregressive("mistral", PROMPT, n, sampling))
    assert spec.output == want
    assert max(depths) == SHARED_LEVELS and all(d <= SHARED_LEVELS for d in depths)
    if kind == "oracle":  # segments of two levels are accepted deeper than one level could be
        assert spec.stats.accepted_drafts > spec.stats.rounds
    check_stats({"token_ids": spec.output, "stats": spec.result_stats()}, "flowspec", len(PROMPT))
    check_caches(spec, pipe)


@pytest.mark.parametrize("chunk", [1, 7, 299, 300, 301])
def test_prefill_chunk_edges(env, chunk) -> None:
    prompt = long_prompt()
    expected = env.greedy("mistral", prompt, 12, chunk=64)
    res = run(env, "mistral", 2, "flowspec", prompt, 12, LookupDrafter(), chunk=chunk)
    assert res["token_ids"] == expected


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("prompt", [[7], [7, 7], [3, 200]], ids=["one", "two-same", "two"])
def test_short_prompts(env, strategy, prompt) -> None:
    res = run(env, "mistral", 2, strategy, prompt, 15, env.drafter("oracle", "mistral", prompt, 15))
    assert res["token_ids"] == env.greedy("mistral", prompt, 15)


def test_all_ring_sizes_agree(env) -> None:
    """The qwen2 model (6 layers) split over 1..6 stages: the same text everywhere."""
    expected = env.greedy("qwen2", PROMPT, 30)
    for stages in range(1, 7):
        for strategy in SPEC:
            res = run(env, "qwen2", stages, strategy, PROMPT, 30, LookupDrafter(),
                      tree=TreeParams(depth=4, top_k=4, total=32, segment=4, expand=8, in_flight=stages))
            assert res["token_ids"] == expected, (stages, strategy)


# ------------------------------------------------------- 2. drafters that break the rules
@pytest.mark.parametrize("strategy", SPEC)
def test_drafter_never_ready_does_not_hang(env, strategy) -> None:
    """A feature drafter whose ready() says no (it waits for hidden states) must not make the
    strategy loop; decoding goes on one token per round."""
    with time_limit(20):
        res = run(env, "mistral", 2, strategy, PROMPT, 12, NotReadyDrafter(LookupDrafter()))
    assert res["token_ids"] == env.greedy("mistral", PROMPT, 12)
    assert res["stats"]["drafted"] == 0
    with time_limit(20):  # ready for some nodes only
        d = NotReadyDrafter(env.drafter("oracle", "mistral", PROMPT, 25), lambda view, node: node.position % 3 != 0)
        res = run(env, "mistral", 3, strategy, PROMPT, 25, d)
    assert res["token_ids"] == env.greedy("mistral", PROMPT, 25)
    assert res["stats"]["accepted_drafts"] > 0


@pytest.mark.parametrize("strategy", SPEC)
def test_positive_and_duplicate_scores(env, strategy) -> None:
    """Children scored above 0 (a sloppy drafter), duplicates and more than k proposals:
    the tree stays topological and the text exact."""
    ref = env.ref("mistral")

    def props(ctx: list[int]) -> list[tuple[int, float]]:
        right = ref.choice(ctx)
        return [(ctx[-1], 0.7), (right, 0.5), (right, 0.9), ((right + 1) % 256, 0.0), (right, -1.0)]

    d = FixedDrafter(props)
    res = run(env, "mistral", 2, strategy, PROMPT, 20, d, tree=TreeParams(depth=3, top_k=8, total=30, segment=4))
    assert res["token_ids"] == env.greedy("mistral", PROMPT, 20)
    assert res["stats"]["accepted_drafts"] > 0


@pytest.mark.parametrize("strategy", SPEC)
def test_draft_model_with_more_children_than_vocabulary(env, strategy) -> None:
    prompt = [1, 2, 3, 4]
    d = DraftModelDrafter(LocalPipeline.load(env.folders["small"], 1, dtype="float32"), target_vocab=SMALL_VOCAB)
    res = run(env, "small", 2, strategy, prompt, 12, d, tree=TreeParams(depth=2, top_k=12, total=40))
    assert res["token_ids"] == env.greedy("small", prompt, 12)
    assert res["stats"]["accepted_drafts"] > 0


# ------------------------------------------------- 3. sampling: the same text as autoregressive
SAMPLINGS = [
    SamplingParams(temperature=1.0, seed=1),
    SamplingParams(temperature=0.7, top_k=20, seed=2),
    SamplingParams(temperature=1.3, top_p=0.9, seed=3),
    SamplingParams(temperature=0.5, top_k=5, top_p=0.8, seed=4),
]
SAMPLE_CASES = [(s, d, SAMPLINGS[(i + j) % len(SAMPLINGS)])
                for i, s in enumerate(SPEC) for j, d in enumerate(("lookup", "oracle", "wrong", "random", "draft_self"))]


@pytest.mark.parametrize("strategy,kind,sampling", SAMPLE_CASES,
                         ids=[f"{s}-{d}-seed{p.seed}" for s, d, p in SAMPLE_CASES])
def test_sampling_equals_autoregressive(env, strategy, kind, sampling) -> None:
    n = 30
    expected = env.autoregressive("mistral", PROMPT, n, sampling)
    assert expected != env.greedy("mistral", PROMPT, n)  # it really samples
    res = run(env, "mistral", 3, strategy, PROMPT, n, env.drafter(kind, "mistral", PROMPT, n, sampling),
              sampling=sampling, tree=TreeParams(depth=4, top_k=4, total=32, segment=8, expand=16))
    assert res["token_ids"] == expected
    if kind == "oracle":
        assert res["stats"]["accepted_drafts"] > n // 2
    if kind == "wrong":
        assert res["stats"]["accepted_drafts"] == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_last_stage_sampling_equals_autoregressive(env, strategy) -> None:
    """Seeded sampling with the tokens drawn after the last stage: the same text as plain
    autoregressive sampling at the source, for every seed (so the same distribution)."""
    n = 24
    for i, sampling in enumerate(SAMPLINGS):
        kind = ("oracle", "random", "lookup")[i % 3]
        expected = env.autoregressive("mistral", PROMPT, n, sampling)
        res = run(env, "mistral", 3, strategy, PROMPT, n, env.drafter(kind, "mistral", PROMPT, n, sampling),
                  sampling=sampling, tree=TreeParams(depth=4, top_k=4, total=32, segment=8, expand=16),
                  verify="last_stage")
        assert res["token_ids"] == expected, (strategy, kind, sampling)


@pytest.mark.parametrize("strategy", SPEC)
def test_sampling_on_small_vocabulary_equals_autoregressive(env, strategy) -> None:
    """Vocabulary 8: drafts are accepted often, under sampling too."""
    accepted = 0
    for seed in range(6):
        sp = SamplingParams(temperature=1.0, top_k=(0, 3)[seed % 2], seed=seed)
        expected = env.autoregressive("small", [1, 2, 3], 20, sp)
        res = run(env, "small", 2, strategy, [1, 2, 3], 20, RandomDrafter(SMALL_VOCAB, seed=seed), sampling=sp,
                  tree=TreeParams(depth=3, top_k=4, total=20, segment=4, expand=8))
        assert res["token_ids"] == expected
        accepted += res["stats"]["accepted_drafts"]
    assert accepted > 20


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_seed_reproducible(env, strategy) -> None:
    outs = []
    for seed in range(5):
        sp = SamplingParams(temperature=1.0, seed=seed)
        runs = [run(env, "mistral", 2, strategy, PROMPT, 20, LookupDrafter(), sampling=sp)["token_ids"]
                for _ in range(2)]
        assert runs[0] == runs[1]
        outs.append(tuple(runs[0]))
    assert len(set(outs)) == 5  # a different seed, a different text


# ------------------------------------------------- 4. sampling: the target's distribution
def reference_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """An independent implementation of temperature, top-k (ties at the k-th kept), top-p."""
    x = logits.double() / params.temperature
    p = torch.softmax(x, -1)
    if params.top_k and params.top_k < len(x):
        kth = sorted(x.tolist(), reverse=True)[params.top_k - 1]
        p = torch.where(x >= kth, p, torch.zeros_like(p))
        p = p / p.sum()
    if params.top_p < 1.0:
        order = sorted(range(len(p)), key=lambda i: -float(p[i]))
        keep, mass = [], 0.0
        for i in order:
            if mass >= params.top_p:
                break
            keep.append(i)
            mass += float(p[i])
        q = torch.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return p


@torch.no_grad()
def exact_joint(hf: torch.nn.Module, prompt: list[int], params: SamplingParams, n: int) -> dict[tuple, float]:
    """The target's exact distribution of its first n sampled tokens, by enumerating prefixes
    (transformers' logits, not the engine's)."""
    dist: dict[tuple, float] = {(): 1.0}
    for _ in range(n):
        prefixes = list(dist)
        logits = hf(torch.tensor([prompt + list(pre) for pre in prefixes])).logits[:, -1]
        new: dict[tuple, float] = {}
        for pre, lg in zip(prefixes, logits):
            p = reference_probs(lg, params)
            for t in range(len(p)):
                if p[t] > 0:
                    new[pre + (t,)] = dist[pre] * float(p[t])
        dist = new
    return dist


def chi2_pvalue(counts: Counter, probs: dict, min_expected: float = 5.0) -> float:
    """Pearson's test of observed counts against exact cell probabilities; cells expected
    fewer than `min_expected` times are pooled. An impossible outcome gives 0."""
    n = sum(counts.values())
    if any(c not in probs for c in counts):
        return 0.0
    total = sum(probs.values())
    obs, exp = [], []
    pool_o, pool_e = 0, 0.0
    for cell in sorted(probs, key=probs.get, reverse=True):
        e = probs[cell] / total * n
        if e >= min_expected:
            obs.append(counts.get(cell, 0))
            exp.append(e)
        else:
            pool_o += counts.get(cell, 0)
            pool_e += e
    if pool_e >= min_expected or not exp:
        obs.append(pool_o)
        exp.append(pool_e)
    elif pool_e > 0:
        obs[-1] += pool_o
        exp[-1] += pool_e
    if len(obs) < 2:
        return 1.0
    exp_arr = np.array(exp) * (n / sum(exp))
    return float(stats_mod.chisquare(np.array(obs, dtype=float), exp_arr).pvalue)


def shuffled_children(k: int = 4) -> FixedDrafter:
    """k distinct children in a context-keyed random order; the first one very confident."""

    def props(ctx: list[int]) -> list[tuple[int, float]]:
        toks = list(range(SMALL_VOCAB))
        context_rng(99, ctx).shuffle(toks)
        return [(t, -0.01 - 2.0 * i) for i, t in enumerate(toks[:k])]

    return FixedDrafter(props)


def first_tokens(env: Env, strategy: str, params: SamplingParams, seeds: range,
                 n: int = 3) -> tuple[Counter, int]:
    """Counts of the first n sampled tokens over seeds, and the number of drafts accepted."""
    prompt = [3, 1, 4, 1, 5]
    counts: Counter = Counter()
    tree = TreeParams(depth=3, top_k=4, total=12, segment=4, expand=6, in_flight=2)
    accepted = 0
    for seed in seeds:
        sp = SamplingParams(params.temperature, params.top_p, params.top_k, seed)
        res = generate_local(env.pipe("small", 2), strategy, prompt, n, shuffled_children(), (), sp, tree)
        counts[tuple(res["token_ids"])] += 1
        accepted += res["stats"]["accepted_drafts"]
    return counts, accepted


LOSSLESS = [
    ("flowspec", SamplingParams(temperature=1.0), 1200),
    ("chunked", SamplingParams(temperature=1.0, top_k=4), 600),
    ("flowspec", SamplingParams(temperature=0.7, top_p=0.8), 600),
    ("pipedec", SamplingParams(temperature=1.0), 400),
]


@pytest.mark.parametrize("strategy,params,samples", LOSSLESS,
                         ids=[f"{s}-T{p.temperature}-k{p.top_k}-p{p.top_p}" for s, p, _ in LOSSLESS])
def test_sampling_is_lossless(env, small_vocab_model, strategy, params, samples) -> None:
    """The joint distribution of the first 3 tokens equals the target's own (chi-square)."""
    exact = exact_joint(small_vocab_model[1], [3, 1, 4, 1, 5], params, 3)
    counts, accepted = first_tokens(env, strategy, params, range(samples))
    assert accepted > samples // 2  # drafts are accepted (and rejected): both paths are sampled
    p = chi2_pvalue(counts, exact)
    assert p > P_MIN, f"p = {p:.2e}"
    # and the marginal of each of the three tokens
    for i in range(3):
        marg_exact: dict = Counter()
        for cell, pr in exact.items():
            marg_exact[cell[i]] += pr
        marg = Counter({t: sum(c for cell, c in counts.items() if cell[i] == t) for t in range(SMALL_VOCAB)})
        marg = Counter({t: c for t, c in marg.items() if c})
        assert chi2_pvalue(marg, dict(marg_exact)) > P_MIN


def first_child_rule(logits, children, params, position):
    """WRONG: accept the drafter's first (most confident) child whenever there is one."""
    if children:
        tok, cid = next(iter(children.items()))
        return tok, cid
    return accept_deterministic(logits, children, params, position)


def likeliest_child_rule(logits, children, params, position):
    """WRONG: accept the child the target likes best, without sampling."""
    if children:
        tok = max(children, key=lambda t: float(logits[t]))
        return tok, children[tok]
    return accept_deterministic(logits, children, params, position)


def sample_then_likeliest_rule(logits, children, params, position):
    """WRONG (subtler): sample; when the sample is not a child, take the likeliest child anyway
    half of the time."""
    tok, child = accept_deterministic(logits, children, params, position)
    if child is None and children and position_uniform(params.seed, position, draw=7) < 0.5:
        tok = max(children, key=lambda t: float(logits[t]))
        return tok, children[tok]
    return tok, child


@pytest.mark.parametrize("rule", [first_child_rule, likeliest_child_rule, sample_then_likeliest_rule],
                         ids=lambda r: r.__name__)
def test_wrong_acceptance_rule_is_caught(env, small_vocab_model, monkeypatch, rule) -> None:
    """The same statistic rejects a lossy rule: the lossless test can fail."""
    params = SamplingParams(temperature=1.0)
    exact = exact_joint(small_vocab_model[1], [3, 1, 4, 1, 5], params, 3)
    monkeypatch.setattr(strategies_mod, "accept_deterministic", rule)
    counts, _ = first_tokens(env, "flowspec", params, range(500))
    assert chi2_pvalue(counts, exact) < P_WRONG


def sample_candidates(rng: np.random.Generator, q: np.ndarray, n: int) -> tuple[list[int], list[np.ndarray]]:
    """n candidates drawn from q without replacement; q renormalised after each draw."""
    avail = np.ones_like(q)
    cands, qs = [], []
    for _ in range(n):
        qi = q * avail
        qi = qi / qi.sum()
        c = int(rng.choice(len(q), p=qi))
        cands.append(c)
        qs.append(qi)
        avail[c] = 0.0
    return cands, qs


def multi_candidate_counts(p: np.ndarray, q: np.ndarray, n_cand: int, samples: int, seed: int,
                           renormalise: bool = True, rule=accept_multi_candidate) -> tuple[Counter, Counter]:
    rng = np.random.default_rng(seed)
    pt = torch.tensor(p)
    out, which = Counter(), Counter()
    for pos in range(samples):
        cands, qs = sample_candidates(rng, q, n_cand)
        if not renormalise:
            qs = [q] * n_cand
        tok, idx = rule(pt, cands, [torch.tensor(x) for x in qs], seed, pos)
        assert idx is None or cands[idx] == tok
        out[tok] += 1
        which[idx] += 1
    return out, which


MC_CASES = [(6, 1, 0), (6, 2, 1), (6, 3, 2), (5, 4, 3), (8, 3, 4)]


@pytest.mark.parametrize("vocab,n_cand,seed", MC_CASES)
def test_multi_candidate_rule_is_lossless(vocab, n_cand, seed) -> None:
    g = np.random.default_rng(100 + seed)
    p = g.dirichlet(np.full(vocab, 0.7))
    q = g.dirichlet(np.full(vocab, 0.7))
    if seed == 4:  # sparse target (top-k masked) and sparse draft
        p[[0, 1]] = 0.0
        q[[2]] = 0.0
        p, q = p / p.sum(), q / q.sum()
    out, which = multi_candidate_counts(p, q, n_cand, 2500, seed)
    assert chi2_pvalue(out, {i: float(p[i]) for i in range(vocab) if p[i] > 0}) > P_MIN
    assert sum(v for k, v in which.items() if k is not None) > 0  # candidates do get accepted


def test_multi_candidate_same_distribution_accepts_first() -> None:
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    for pos in range(200):
        tok, idx = accept_multi_candidate(p, [pos % 4], [p], seed=1, position=pos)
        assert (tok, idx) == (pos % 4, 0)


def residual_not_updated(p, candidates, q, seed, position):
    """WRONG: after rejecting a candidate, keep sampling from p instead of norm(max(p - q, 0))."""
    p = p.double()
    for i, (tok, qi) in enumerate(zip(candidates, q)):
        qi = qi.double()
        ratio = float(p[tok] / qi[tok]) if qi[tok] > 0 else 0.0
        if position_uniform(seed, position, draw=1 + i) < ratio:
            return tok, i
    return sample_from(p, position_uniform(seed, position, draw=0)), None


@pytest.mark.parametrize("variant", ["q not renormalised", "residual not updated"])
def test_wrong_multi_candidate_variant_is_caught(variant) -> None:
    g = np.random.default_rng(7)
    p = g.dirichlet(np.full(6, 0.7))
    q = g.dirichlet(np.full(6, 0.7))
    if variant == "q not renormalised":
        out, _ = multi_candidate_counts(p, q, 3, 2500, 0, renormalise=False)
    else:
        out, _ = multi_candidate_counts(p, q, 3, 2500, 0, rule=residual_not_updated)
    assert chi2_pvalue(out, {i: float(p[i]) for i in range(6)}) < P_WRONG


# ------------------------------------------------------------------ 5. unit: DraftTree
def small_tree() -> tuple[DraftTree, dict[str, Node]]:
    t = DraftTree()
    r = t.set_root(10, -1, 5)
    a = t.add_child(r.id, 11, -0.1)
    b = t.add_child(r.id, 12, -0.5)
    a1 = t.add_child(a.id, 13, -0.2)
    a2 = t.add_child(a.id, 14, -1.0)
    b1 = t.add_child(b.id, 15, -0.1)
    b11 = t.add_child(b1.id, 16, 0.0)  # ties with its parent
    return t, dict(r=r, a=a, b=b, a1=a1, a2=a2, b1=b1, b11=b11)


def test_tree_build_and_order() -> None:
    t, n = small_tree()
    assert len(t) == 7 and t.root == n["r"].id
    assert t.add_child(n["r"].id, 11, -0.3) is None  # duplicate token
    assert [x.position for x in (n["a"], n["a1"], n["b11"])] == [6, 7, 8]
    assert n["a1"].score == pytest.approx(-0.3) and n["b11"].score == pytest.approx(-0.6)
    assert t.path(n["b11"].id) == [12, 15, 16] and t.path(n["r"].id) == []
    assert t.depth(n["b11"].id) == 3
    assert sorted(t.subtree(n["b"].id)) == sorted([n["b"].id, n["b1"].id, n["b11"].id])
    order = [x.id for x in t.unsent()]
    assert order == [n[k].id for k in ("r", "a", "a1", "b", "b1", "b11", "a2")]
    n["r"].sent = n["a"].sent = True
    assert [x.id for x in t.unsent()] == [n[k].id for k in ("a1", "b", "b1", "b11", "a2")]
    # frontier: unexpanded, depth < max_depth, best first, at most width
    assert [x.id for x in t.frontier(3, 5)] == [n[k].id for k in ("r", "a", "a1")]
    n["r"].expanded = n["a"].expanded = True
    assert [x.id for x in t.frontier(10, 3)] == [n[k].id for k in ("a1", "b", "b1", "a2")]
    assert [x.id for x in t.frontier(10, 2)] == [n["b"].id]
    assert t.frontier(10, 0) == []


def test_tree_advance_and_replace_root() -> None:
    t, n = small_tree()
    for k in ("r", "a", "b", "b1"):
        n[k].sent = True
    sent, count = t.advance(n["a"].id)
    assert count == 3 and sent == [n["b"].id, n["b1"].id]
    assert t.root == n["a"].id and set(t.nodes) == {n["a"].id, n["a1"].id, n["a2"].id}
    assert t.depth(n["a1"].id) == 1 and t.path(n["a2"].id) == [14]
    n["a1"].sent = True
    new, sent, count = t.replace_root(99)
    assert count == 2 and sent == [n["a1"].id]
    assert set(t.nodes) == {new.id} and t.root == new.id
    assert (new.token, new.parent, new.position, new.score) == (99, n["a"].id, 7, 0.0)
    assert new.id > n["b11"].id  # ids are never reused


def test_tree_child_never_outscores_parent() -> None:
    """A positive draft log-prob is taken as 0 and NaN as -inf, so unsent() stays topological."""
    t, n = small_tree()
    up = t.add_child(n["b11"].id, 20, 2.5)
    assert up.score == n["b11"].score
    nan = t.add_child(n["b11"].id, 21, float("nan"))
    assert nan.score == -math.inf
    below = t.add_child(nan.id, 22, -1.0)
    order = [x.id for x in t.unsent()]
    assert order.index(n["b11"].id) < order.index(up.id) and order[-2:] == [nan.id, below.id]


def test_tree_ids() -> None:
    t = DraftTree(first_id=100)
    assert t.take_ids(3) == [100, 101, 102]
    r = t.set_root(1, 102, 3)
    assert r.id == 103 and t.take_ids(0) == [] and t.take_ids(1) == [104]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_tree_unsent_is_topological(data) -> None:
    """Random trees with many tied scores: unsent() lists parents before children (or after
    sent parents); advance() prunes exactly the nodes outside the chosen child's subtree."""
    t = DraftTree()
    root = t.set_root(0, -1, data.draw(st.integers(0, 50)))
    ids = [root.id]
    for _ in range(data.draw(st.integers(1, 30))):
        parent = data.draw(st.sampled_from(ids))
        lp = data.draw(st.sampled_from([0.0, -0.0, -0.5, -1.0, -1e-9, -math.inf]))
        c = t.add_child(parent, data.draw(st.integers(0, 6)), lp)
        if c is not None:
            ids.append(c.id)
    # a sent set closed under ancestors (segments go out in topological order)
    for nid in ids:
        node = t[nid]
        parent_sent = node.parent not in t or t[node.parent].sent
        node.sent = parent_sent and data.draw(st.booleans())
    seen = {n.id for n in t if n.sent}
    for node in t.unsent():
        assert node.id == t.root or node.parent in seen
        seen.add(node.id)
    kids = list(t[t.root].children.values())
    if kids:
        child = data.draw(st.sampled_from(kids))
        keep = set(t.subtree(child))
        outside = [i for i in t.nodes if i not in keep and i != t.root]
        sent_outside = {i for i in outside if t[i].sent}
        sent, count = t.advance(child)
        assert count == len(outside) and set(sent) == sent_outside and len(sent) == len(sent_outside)
        assert set(t.nodes) == keep


# ---------------------------------------------------------------- 6. unit: LookupDrafter
def lookup(ctx: list[int], k: int = 4, **kw) -> list[tuple[int, float]]:
    return LookupDrafter(**kw)._next_tokens(ctx, k)


def test_lookup_finds_continuation() -> None:
    assert [t for t, _ in lookup([1, 2, 3, 4, 1, 2])] == [3]
    got = lookup([9, 1, 2, 3, 7, 7, 1, 2, 3])  # the 3-gram 1 2 3 was followed by 7
    assert got == [(7, pytest.approx(math.log(3 / 4)))]
    # 2-gram [1, 5] followed by 9 then (more recently) by 8: recency breaks the tie
    got = lookup([7, 1, 5, 9, 1, 5, 8, 1, 5], max_ngram=2)
    assert [t for t, _ in got] == [8, 9]
    assert got[0][1] == pytest.approx(math.log(2 / 3) + math.log(1 / 2))
    # frequency ranks first: [1] followed by 4, 4, 6
    got = lookup([1, 4, 1, 4, 1, 6, 1], max_ngram=1)
    assert [t for t, _ in got] == [4, 6]
    assert got[0][1] > got[1][1]
    assert all(lp <= 0 for _, lp in got)
    assert [t for t, _ in lookup([1, 4, 1, 4, 1, 6, 1], k=1, max_ngram=1)] == [4]


def test_lookup_no_match_and_window() -> None:
    assert lookup([1, 2, 3, 4]) == []
    assert lookup([5]) == []
    ctx = [1, 2, 9] + list(range(10, 40)) + [1, 2]
    assert [t for t, _ in lookup(ctx)] == [9]
    d = LookupDrafter(window=10)
    tree = DraftTree()
    ids = tree.take_ids(len(ctx) - 1)
    tree.set_root(ctx[-1], ids[-1], len(ctx) - 1)
    view = DraftView(ids + [tree.root], ctx, tree, {})
    assert d.propose(view, [tree[tree.root]], 4) == [[]]  # the match is outside the window
    assert [t for t, _ in LookupDrafter().propose(view, [tree[tree.root]], 4)[0]] == [9]


def test_lookup_through_tree_view() -> None:
    """The context of a drafted node is the accepted text plus its path."""
    tree = DraftTree()
    chain = [1, 2, 3, 1]
    ids = tree.take_ids(3)
    root = tree.set_root(chain[-1], ids[-1], 3)
    c = tree.add_child(root.id, 2, -0.1)
    view = DraftView(ids + [root.id], chain, tree, {})
    assert view.context(c) == [1, 2, 3, 1, 2]
    assert [[t for t, _ in ps] for ps in LookupDrafter().propose(view, [root, c], 2)] == [[2], [3]]


# -------------------------------------------------------------------- 7. unit: sampling
@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.5, top_k=3),
    SamplingParams(temperature=2.0, top_p=0.5),
    SamplingParams(temperature=1.0, top_k=10, top_p=0.9),
    SamplingParams(temperature=0.8, top_k=1),
    SamplingParams(temperature=1.0, top_p=0.01),
    SamplingParams(temperature=1.0, top_k=40),  # k above the vocabulary: no mask
])
def test_target_probs_masks(params) -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randn(32, generator=g) * 3
        p = target_probs(logits, params)
        assert p.dtype == torch.float64 and float(p.sum()) == pytest.approx(1.0, abs=1e-12)
        assert torch.allclose(p, reference_probs(logits, params), atol=1e-12)
        kept = int((p > 0).sum())
        if params.top_k and params.top_k < 32:
            assert kept <= params.top_k
            assert set(torch.nonzero(p).flatten().tolist()) <= set(torch.topk(logits, params.top_k).indices.tolist())
        if params.top_p < 1.0:
            full = torch.softmax(logits.double() / params.temperature, -1)
            if not params.top_k:
                assert float(full[p > 0].sum()) >= params.top_p - 1e-12
                # minimal: without its least likely kept token the nucleus falls short
                smallest = float(full[p > 0].min())
                assert float(full[p > 0].sum()) - smallest < params.top_p
        # kept tokens keep their relative odds
        full = torch.softmax(logits.double() / params.temperature, -1)
        m = p > 0
        assert torch.allclose(p[m] / p[m].sum(), full[m] / full[m].sum())
        assert int(torch.argmax(p)) == int(torch.argmax(logits))


def test_position_uniform_is_keyed_and_uniform() -> None:
    u = position_uniform(3, 17)
    assert u == position_uniform(3, 17) and 0.0 <= u < 1.0
    assert u != position_uniform(4, 17) and u != position_uniform(3, 18) and u != position_uniform(3, 17, draw=1)
    vals = [position_uniform(5, p) for p in range(4000)]
    assert all(0.0 <= v < 1.0 for v in vals)
    assert stats_mod.kstest(vals, "uniform").pvalue > P_MIN
    draws = [position_uniform(5, 9, d) for d in range(2000)]
    assert stats_mod.kstest(draws, "uniform").pvalue > P_MIN
    assert len(set(vals)) == len(vals)


def test_sample_from_inverse_cdf() -> None:
    p = torch.tensor([0.0, 0.25, 0.0, 0.5, 0.25, 0.0], dtype=torch.float64)
    assert sample_from(p, 0.0) == 1
    assert sample_from(p, 0.2499) == 1 and sample_from(p, 0.25) == 3
    assert sample_from(p, 0.7499) == 3 and sample_from(p, 0.75) == 4
    assert sample_from(p, 1.0 - 2**-53) == 4
    for u in np.linspace(0, 1 - 1e-12, 1001):
        assert p[sample_from(p, float(u))] > 0
    # unnormalised weights work the same
    assert sample_from(p * 4, 0.6) == sample_from(p, 0.6) == 3


def test_choose_token() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(50, generator=g)
    assert choose_token(logits, SamplingParams(), 7) == int(torch.argmax(logits))
    sp = SamplingParams(temperature=0.9, top_k=10, seed=12)
    for pos in range(50):
        want = sample_from(target_probs(logits, sp), position_uniform(12, pos))
        assert choose_token(logits, sp, pos) == want
        tok, child = accept_deterministic(logits, {want: 77}, sp, pos)
        assert (tok, child) == (want, 77)
        assert accept_deterministic(logits, {}, sp, pos) == (want, None)


def test_speculator_rejects_bad_requests(env) -> None:
    head = env.pipe("mistral", 2).head
    with pytest.raises(ValueError, match="unknown strategy"):
        Speculator("beam", head, None, [1], 5)
    with pytest.raises(ValueError, match="empty"):
        Speculator("flowspec", head, None, [], 5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Speculator("flowspec", head, None, [1], 0)


def test_reference_model_matches_greedy(env) -> None:
    """The oracle's reference really is the target: its choices rebuild greedy decoding."""
    ref = env.ref("mistral")
    ref.begin(PROMPT)
    ctx = list(PROMPT)
    for _ in range(12):
        ctx.append(ref.choice(ctx))
    assert ctx[len(PROMPT):] == env.greedy("mistral", PROMPT, 12)


class _Recording(Drafter):
    """Wraps a drafter and records every proposal: (parent context, frontier rank, token, logp)."""

    name = "recording"

    def __init__(self, inner: Drafter) -> None:
        self.inner = inner
        self.calls: list[list[tuple[int, ...]]] = []  # per propose(): the frontier's paths, in order
        self.props: list[tuple[tuple[int, ...], int, float]] = []  # (parent path, token, logp) in order

    def propose(self, view: DraftView, frontier: list[Node], k: int) -> list:
        out = self.inner.propose(view, frontier, k)
        self.calls.append([tuple(view.tree.path(n.id)) for n in frontier])
        for n, plist in zip(frontier, out):
            for tok, lp in plist:
                self.props.append((tuple(view.tree.path(n.id)), tok, lp))
        return out


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("top_k,depth,total", [(8, 6, 64), (4, 6, 20), (3, 2, 50)])
def test_grow_builds_eagle2_trees(seed: int, top_k: int, depth: int, total: int) -> None:
    """A round's tree is EAGLE-2's: each level expands the best top_k new nodes of the level
    above (down to `depth`), and the tree keeps the best `total` of every drafted node by
    cumulative score -- not the first `total` in breadth-first order, which stops at depth 2."""
    rec = _Recording(RandomDrafter(vocab=40, seed=seed, from_context=0.3))
    spec = Speculator("chunked", lambda h: h, rec, [1, 2, 3], 50, tree=TreeParams(depth=depth, top_k=top_k,
                                                                                      total=total))
    ids = spec.tree.take_ids(2)
    root = spec.tree.set_root(3, ids[-1], 2)
    spec._chain_ids, spec._chain_tokens = ids + [root.id], [1, 2, 3]
    added = spec._grow(total, top_k, depth)
    # the reference: every drafted candidate with its cumulative score, first proposal of a
    # (parent, token) pair winning, ordered best first (ties: shallower, then drafted earlier)
    score: dict[tuple[int, ...], float] = {(): 0.0}
    order: list[tuple[int, ...]] = []
    for parent, tok, lp in rec.props:
        path = parent + (tok,)
        if path not in score:
            score[path] = score[parent] + min(lp, 0.0)
            order.append(path)
    ranked = sorted(order, key=lambda p: (-score[p], len(p), order.index(p)))
    kept = {tuple(spec.tree.path(n.id)) for n in spec.tree if n.id != root.id}
    assert added == len(kept) == min(total, len(order))
    assert kept == set(ranked[:total])
    # each propose() call after the first expands the best top_k drafted nodes of the previous level
    for level, frontier in enumerate(rec.calls[1:], start=1):
        prev = [p for p in order if len(p) == level]
        assert frontier == sorted(prev, key=lambda p: (-score[p], order.index(p)))[:top_k]
    assert all(len(p) <= depth for p in kept)
    # stopping early (deeper levels cannot beat the kept nodes) keeps what a full expansion would
    full = Speculator("chunked", lambda h: h, RandomDrafter(vocab=40, seed=seed, from_context=0.3), [1, 2, 3], 50,
                      tree=TreeParams(depth=depth, top_k=top_k, total=total))
    fids = full.tree.take_ids(2)
    froot = full.tree.set_root(3, fids[-1], 2)
    full._chain_ids, full._chain_tokens = fids + [froot.id], [1, 2, 3]
    full._grow(10**6, top_k, depth)
    everything = sorted((n for n in full.tree if n.id != froot.id), key=Node.sort_key)
    assert {tuple(full.tree.path(n.id)) for n in everything[:total]} == kept


def test_grow_reaches_full_depth_with_a_confident_drafter() -> None:
    """With 64 nodes, depth 6 and top-k 8, a confident drafter's tree reaches depth 6 (the old
    breadth-first fill stopped at depth 2 after 8 + 56 nodes)."""
    drafter = FixedDrafter(lambda ctx: [((ctx[-1] * 7 + i) % 97, -0.01 - 2.0 * i) for i in range(8)])
    spec = Speculator("chunked", lambda h: h, drafter, [5, 6], 50, tree=TreeParams(depth=6, top_k=8, total=64))
    ids = spec.tree.take_ids(1)
    root = spec.tree.set_root(6, ids[0], 1)
    spec._chain_ids, spec._chain_tokens = ids + [root.id], [5, 6]
    assert spec._grow(64, 8, 6) == 64
    assert max(spec.tree.depth(n.id) for n in spec.tree) == 6
