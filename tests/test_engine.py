"""The model engine: split stages, tree-masked KV cache, weight loading, errors.

Everything is compared with ``transformers`` in float32: the tiny random models of
conftest.py (Llama, Mistral, Qwen2, Llama 3 RoPE with tied embeddings, a sharded
checkpoint) and the default model (SmolLM2-135M-Instruct).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowspec.cli import main as cli_main
from flowspec.errors import CausalityError, ContextOverflowError, ModelError
from flowspec.model.config import ModelConfig
from flowspec.model.kvcache import NO_PARENT, KVCache
from flowspec.model.loader import EMBED, LM_HEAD, NORM, WeightStore, resolve_model
from flowspec.model.pipeline import LocalPipeline, greedy_generate, prefill
from flowspec.model.stage import LMHead, Segment, Stage, split_layers

from conftest import TINY_MODEL_KINDS, TINY_VOCAB, build_tiny_hf_model, save_tiny_model, tiny_hf_config

TINY_ATOL = 1e-4  # float32, 4-6 layers
DEFAULT_ATOL = 2e-4  # float32, 30 layers, logits up to ~40 in magnitude (observed max diff ~8e-5)
DEFAULT_PROMPT = "Write a long story about a brave dragon who learns to fly."


# ------------------------------------------------------------------------------ helpers
def chain_segment(tokens: list[int], start: int = 0) -> Segment:
    """Tokens as a chain of nodes start..start+n-1 (parent i-1, position i)."""
    ids = list(range(start, start + len(tokens)))
    return Segment(ids, [i - 1 for i in ids], ids, tokens=torch.tensor(tokens, dtype=torch.long))


@torch.no_grad()
def hf_logits(model: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
    """transformers' float32 logits of every position of one sequence: [n, vocab]."""
    return model(torch.tensor([tokens], dtype=torch.long)).logits[0].float()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def commit_prefix(pipe: LocalPipeline, tokens: list[int], chunk: int = 7) -> None:
    """Process and commit `tokens` as nodes 0..n-1, in chunks."""
    prefill(pipe, tokens, chunk)


@dataclass
class Node:
    nid: int
    parent: int
    token: int
    depth: int  # 1 for a child of the last committed node


def random_tree(rng: random.Random, size: int, root: int, used: set[int]) -> list[Node]:
    """A random draft tree hanging off committed node `root`, in creation (topological) order."""
    nodes: list[Node] = []
    for _ in range(size):
        nid = rng.randrange(10_000, 10**9)
        while nid in used:
            nid = rng.randrange(10_000, 10**9)
        used.add(nid)
        # lean towards deep trees: half of the time extend one of the newest nodes
        if nodes and rng.random() < 0.5:
            par = rng.choice(nodes[-3:])
        else:
            k = rng.randrange(len(nodes) + 1)
            par = nodes[k - 1] if k else None
        nodes.append(Node(nid, par.nid if par else root, rng.randrange(TINY_VOCAB), par.depth + 1 if par else 1))
    return nodes


def random_topo_order(rng: random.Random, nodes: list[Node], root: int) -> list[Node]:
    """Another topological order of the same tree (a parent always before its children)."""
    seen = {root}
    pending = list(nodes)
    out: list[Node] = []
    while pending:
        ready = [n for n in pending if n.parent in seen]
        pick = rng.choice(ready)
        pending.remove(pick)
        seen.add(pick.nid)
        out.append(pick)
    return out


def random_split(rng: random.Random, seq: list[Node]) -> list[list[Node]]:
    """Cut a sequence into random contiguous, non-empty chunks."""
    cuts = sorted(rng.sample(range(1, len(seq)), rng.randrange(len(seq)))) if len(seq) > 1 else []
    bounds = [0, *cuts, len(seq)]
    return [seq[a:b] for a, b in zip(bounds, bounds[1:])]


def tree_segment(chunk: list[Node], num_committed: int) -> Segment:
    return Segment(
        [n.nid for n in chunk],
        [n.parent for n in chunk],
        [num_committed + n.depth - 1 for n in chunk],
        tokens=torch.tensor([n.token for n in chunk], dtype=torch.long),
    )


def path_to(node: Node, by_id: dict[int, Node]) -> list[Node]:
    """Tree nodes from the first one below the committed prefix down to `node`."""
    path = [node]
    while path[-1].parent in by_id:
        path.append(by_id[path[-1].parent])
    return path[::-1]


def run_segments(pipe: LocalPipeline, segments: list[Segment]) -> dict[int, torch.Tensor]:
    """Run segments one after another; logits of every row that came out, by node id."""
    got: dict[int, torch.Tensor] = {}
    for seg in segments:
        out = pipe.run(seg)
        assert out.logits.shape == (len(out.node_ids), pipe.cfg.vocab_size)
        for i, nid in enumerate(out.node_ids):
            got[nid] = out.logits[i]
    return got


def check_tree_against_paths(pipe, hf, committed: list[int], nodes: list[Node], got, atol) -> None:
    """Logits of every tree node == transformers on committed text + root-to-node path."""
    by_id = {n.nid: n for n in nodes}
    assert set(got) == set(by_id)
    for n in nodes:
        seq = committed + [p.token for p in path_to(n, by_id)]
        ref = hf_logits(hf, seq)[-1]
        assert max_diff(got[n.nid], ref) < atol, f"node {n.nid} at depth {n.depth}"


class CompactSpy:
    """Counts KVCache.compact calls (installed with monkeypatch)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        orig = KVCache.compact

        def spy(cache: KVCache) -> None:
            self.calls += 1
            orig(cache)

        monkeypatch.setattr(KVCache, "compact", spy)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def default_hf(default_model_dir: Path) -> torch.nn.Module:
    """transformers' own GGUF conversion (the engine reads the GGUF file itself)."""
    from gguf_reference import converted_default
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(converted_default()), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def default_tokenizer(default_model_dir: Path):
    from flowspec.model.tokenizer import Tokenizer

    return Tokenizer(default_model_dir)


@pytest.fixture(scope="module")
def default_prompt_ids(default_tokenizer) -> list[int]:
    return default_tokenizer.encode_prompt(DEFAULT_PROMPT)


@pytest.fixture(scope="module")
def tiny_llama_pipe2(tiny_model_dir) -> LocalPipeline:
    """tiny_llama split over 2 stages, float32 (reset before use)."""
    return LocalPipeline.load(tiny_model_dir("tiny_llama"), 2, "float32", max_context=256)


# ----------------------------------------------------- 1. split engine == transformers
@pytest.mark.parametrize("stages", [1, 2, 4])
@pytest.mark.parametrize("kind", TINY_MODEL_KINDS)
def test_tiny_models_match_transformers(kind: str, stages: int, tiny_model_dir, tiny_hf_model) -> None:
    folder, hf = tiny_model_dir(kind), tiny_hf_model(kind)
    pipe = LocalPipeline.load(folder, stages, "float32", max_context=256)
    assert len(pipe.stages) == stages
    tokens = random.Random(sum(map(ord, kind))).choices(range(TINY_VOCAB), k=90)  # crosses 64 (llama3 old ctx)
    ref = hf_logits(hf, tokens)
    out = pipe.run(chain_segment(tokens))
    assert out.node_ids == list(range(len(tokens)))
    assert max_diff(out.logits, ref) < TINY_ATOL
    assert torch.equal(out.logits.argmax(-1), ref.argmax(-1))

    # the same text, prefilled in committed chunks, then decoded one token at a time
    pipe.reset()
    last = prefill(pipe, tokens[:70], chunk=16)
    assert max_diff(last, ref[69]) < TINY_ATOL
    for i in range(70, 90):
        res = pipe.run(chain_segment([tokens[i]], start=i))
        pipe.apply_update([i], [])
        assert max_diff(res.logits[0], ref[i]) < TINY_ATOL


@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 2, 4])
def test_default_model_matches_transformers(stages, default_model_dir, default_hf, default_prompt_ids) -> None:
    pipe = LocalPipeline.load(default_model_dir, stages, "float32", max_context=512)
    tokens = default_prompt_ids
    out = pipe.run(chain_segment(tokens))
    ref = hf_logits(default_hf, tokens)
    assert out.node_ids == list(range(len(tokens)))
    assert max_diff(out.logits, ref) < DEFAULT_ATOL
    assert torch.equal(out.logits.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_qwen2", "tiny_llama3_tied"])
def test_greedy_generate_matches_transformers_generate(kind, tiny_model_dir, tiny_hf_model) -> None:
    hf = tiny_hf_model(kind)
    prompt = random.Random(7).choices(range(3, TINY_VOCAB), k=12)
    pipe = LocalPipeline.load(tiny_model_dir(kind), 2, "float32", max_context=128)
    res = greedy_generate(pipe, prompt, 40, eos_ids=[2])
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=40, do_sample=False, eos_token_id=2, pad_token_id=0)
    assert res.token_ids == ref[0, len(prompt):].tolist()  # up to and including a stop token
    assert res.stats["new_tokens"] == len(res.token_ids) and res.stats["prompt_tokens"] == len(prompt)


# --------------------------------------------- 2. draft trees, split into segments
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_mistral", "tiny_qwen2", "tiny_llama3_tied"])
def test_random_tree_in_segments_matches_paths(kind, seed, tiny_model_dir, tiny_hf_model) -> None:
    rng = random.Random(1000 * seed + sum(map(ord, kind)))
    hf = tiny_hf_model(kind)
    stages = rng.choice([1, 2, 3])
    pipe = LocalPipeline.load(tiny_model_dir(kind), stages, "float32", max_context=128)
    committed = rng.choices(range(TINY_VOCAB), k=rng.randrange(1, 40))
    commit_prefix(pipe, committed, chunk=rng.randrange(1, 16))
    root = len(committed) - 1
    nodes = random_tree(rng, rng.randrange(1, 24), root, set(range(len(committed))))
    order = random_topo_order(rng, nodes, root)
    segs = [tree_segment(c, len(committed)) for c in random_split(rng, order)]
    got = run_segments(pipe, segs)
    check_tree_against_paths(pipe, hf, committed, nodes, got, TINY_ATOL)


@st.composite
def tree_cases(draw):
    """(committed tokens, nodes as (parent index or -1, token), topological order, cut flags)."""
    committed = draw(st.lists(st.integers(0, TINY_VOCAB - 1), min_size=1, max_size=30))
    size = draw(st.integers(1, 14))
    nodes = [(draw(st.integers(-1, j - 1)), draw(st.integers(0, TINY_VOCAB - 1))) for j in range(size)]
    order_rng = draw(st.randoms(use_true_random=False))
    cuts = draw(st.lists(st.booleans(), min_size=size, max_size=size))
    return committed, nodes, order_rng, cuts


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=tree_cases())
def test_tree_segments_property(case, tiny_llama_pipe2, tiny_hf_model) -> None:
    committed, spec, order_rng, cuts = case
    pipe, hf = tiny_llama_pipe2, tiny_hf_model("tiny_llama")
    pipe.reset()
    commit_prefix(pipe, committed)
    root = len(committed) - 1
    nodes: list[Node] = []
    for j, (p, tok) in enumerate(spec):
        par = nodes[p] if p >= 0 else None
        nodes.append(Node(500 + 3 * j, par.nid if par else root, tok, par.depth + 1 if par else 1))
    order = random_topo_order(order_rng, nodes, root)
    chunks: list[list[Node]] = [[]]
    for n, cut in zip(order, cuts):
        if cut and chunks[-1]:
            chunks.append([])
        chunks[-1].append(n)
    got = run_segments(pipe, [tree_segment(c, len(committed)) for c in chunks])
    check_tree_against_paths(pipe, hf, committed, nodes, got, TINY_ATOL)


@pytest.mark.slow
def test_default_model_tree(default_model_dir, default_hf, default_prompt_ids) -> None:
    rng = random.Random(5)
    pipe = LocalPipeline.load(default_model_dir, 2, "float32", max_context=256)
    committed = default_prompt_ids[:24]
    commit_prefix(pipe, committed, chunk=10)
    root = len(committed) - 1
    nodes = random_tree(rng, 10, root, set(range(len(committed))))
    for n in nodes:
        n.token = rng.randrange(pipe.cfg.vocab_size)
    segs = [tree_segment(c, len(committed)) for c in random_split(rng, random_topo_order(rng, nodes, root))]
    got = run_segments(pipe, segs)
    check_tree_against_paths(pipe, default_hf, committed, nodes, got, DEFAULT_ATOL)


# ------------------------------------------------------ 3. commit, drop, compact
def speculate(pipe: LocalPipeline, hf, rng: random.Random, committed: list[int], rounds: int,
              tree_size: int, explicit_compact: bool = False) -> tuple[list[int], list[torch.Tensor]]:
    """Draft random trees, verify them, accept a random path, drop the rest; repeat.

    Checks every node's logits against transformers; returns the committed tokens and
    the logits of all verified nodes (in order) so that two runs can be compared.
    """
    used = set(range(len(committed)))
    last = len(committed) - 1
    seen: list[torch.Tensor] = []
    for _ in range(rounds):
        nodes = random_tree(rng, rng.randrange(1, tree_size + 1), last, used)
        order = random_topo_order(rng, nodes, last)
        got = run_segments(pipe, [tree_segment(c, len(committed)) for c in random_split(rng, order)])
        check_tree_against_paths(pipe, hf, committed, nodes, got, TINY_ATOL)
        seen += [got[n.nid] for n in nodes]
        by_id = {n.nid: n for n in nodes}
        accepted = path_to(rng.choice(nodes), by_id)
        acc_ids = {n.nid for n in accepted}
        pipe.apply_update([n.nid for n in accepted], [n.nid for n in nodes if n.nid not in acc_ids])
        committed = committed + [n.token for n in accepted]
        last = accepted[-1].nid
        for s in pipe.stages:
            assert s.cache.num_committed == len(committed)
            assert s.cache.num_live == len(committed)
            assert s.cache.last_committed == last
            if explicit_compact and rng.random() < 0.5:
                s.cache.compact()
                assert s.cache.span == len(committed)
    # plain decoding after the rounds == transformers on the committed text from scratch
    extra = rng.choices(range(TINY_VOCAB), k=5)
    ref = hf_logits(hf, committed + extra)
    for j, tok in enumerate(extra):
        nid = 10**9 + j
        out = pipe.run(Segment([nid], [last], [len(committed)], tokens=torch.tensor([tok])))
        pipe.apply_update([nid], [])
        committed, last = committed + [tok], nid
        assert max_diff(out.logits[0], ref[len(committed) - 1]) < TINY_ATOL
        seen.append(out.logits[0])
    return committed, seen


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_qwen2", "tiny_llama3_tied"])
def test_commit_drop_then_decode_equals_recompute(kind, tiny_model_dir, tiny_hf_model, monkeypatch) -> None:
    spy = CompactSpy(monkeypatch)
    rng = random.Random(sum(map(ord, kind)))
    pipe = LocalPipeline.load(tiny_model_dir(kind), 2, "float32", max_context=512)
    prompt = rng.choices(range(TINY_VOCAB), k=15)
    commit_prefix(pipe, prompt)
    committed, _ = speculate(pipe, tiny_hf_model(kind), rng, prompt, rounds=6, tree_size=10, explicit_compact=True)
    # a fresh pipeline on the committed text gives the same next-token logits
    fresh = LocalPipeline.load(tiny_model_dir(kind), 1, "float32", max_context=512)
    prefill(fresh, committed)
    last_id = pipe.stages[0].cache.last_committed
    tok = rng.randrange(TINY_VOCAB)
    a = pipe.run(Segment([2 * 10**9], [last_id], [len(committed)], tokens=torch.tensor([tok]))).logits[0]
    b = fresh.run(chain_segment([tok], start=len(committed))).logits[0]
    assert max_diff(a, b) < TINY_ATOL
    assert spy.calls > 0  # the explicit compactions


def test_compaction_under_capacity_pressure_keeps_results(tiny_model_dir, tiny_hf_model, monkeypatch) -> None:
    """A small max_context forces compaction (more nodes pass through than fit); the
    logits equal those of a roomy cache that never compacts, and transformers'."""
    hf = tiny_hf_model("tiny_llama")
    spy = CompactSpy(monkeypatch)
    roomy = LocalPipeline.load(tiny_model_dir("tiny_llama"), 2, "float32", max_context=1024)
    prompt = random.Random(3).choices(range(TINY_VOCAB), k=20)
    commit_prefix(roomy, prompt)
    committed_a, seen_a = speculate(roomy, hf, random.Random(11), prompt, rounds=10, tree_size=12)
    assert spy.calls == 0
    assert roomy.stages[0].cache.span > 64  # more slots than the tight cache below has

    tight = LocalPipeline.load(tiny_model_dir("tiny_llama"), 2, "float32", max_context=64)
    commit_prefix(tight, prompt)
    committed_b, seen_b = speculate(tight, hf, random.Random(11), prompt, rounds=10, tree_size=12)
    assert committed_a == committed_b
    assert spy.calls > 0  # compaction was needed to fit
    assert len(seen_a) == len(seen_b)
    for a, b in zip(seen_a, seen_b):
        assert max_diff(a, b) < 1e-5
    for s in tight.stages:
        assert s.cache.span <= 64


def test_compaction_when_holes_pile_up(tiny_llama, tiny_hf_model, monkeypatch) -> None:
    """Dropping a big tree leaves > 64 holes: the next segment compacts first."""
    hf = tiny_hf_model("tiny_llama")
    spy = CompactSpy(monkeypatch)
    pipe = LocalPipeline.load(tiny_llama, 2, "float32", max_context=1024)
    rng = random.Random(2)
    prompt = rng.choices(range(TINY_VOCAB), k=20)
    commit_prefix(pipe, prompt)
    nodes = random_tree(rng, 100, 19, set(range(20)))
    run_segments(pipe, [tree_segment(nodes, 20)])
    keep = nodes[0]  # the first node is always a child of the last committed one
    pipe.apply_update([keep.nid], [n.nid for n in nodes if n is not keep])
    assert spy.calls == 0 and pipe.stages[0].cache.span == 120
    committed = prompt + [keep.token]
    out = pipe.run(Segment([5000], [keep.nid], [21], tokens=torch.tensor([9])))
    assert spy.calls == len(pipe.stages)  # once per stage
    assert pipe.stages[0].cache.span == 22
    assert max_diff(out.logits[0], hf_logits(hf, committed + [9])[-1]) < TINY_ATOL


def test_in_flight_segment_of_dropped_branch_is_skipped(tiny_llama, tiny_hf_model) -> None:
    hf = tiny_hf_model("tiny_llama")
    pipe = LocalPipeline.load(tiny_llama, 2, "float32", max_context=128)
    prompt = list(range(30, 45))
    commit_prefix(pipe, prompt)
    p = len(prompt)
    root = p - 1
    # segment A: a1 -> a2 and b1, all children of the last committed node
    a = pipe.run(Segment([100, 101, 200], [root, 100, root], [p, p + 1, p], tokens=torch.tensor([5, 6, 7])))
    assert a.node_ids == [100, 101, 200]
    # branch a is rejected while segment B (which extends it) is still in flight
    pipe.apply_update([], [100, 101])
    b = pipe.run(Segment([102, 103, 201, 104], [101, 102, 200, 100], [p + 2, p + 3, p + 1, p + 1],
                         tokens=torch.tensor([8, 9, 10, 11])))
    assert b.node_ids == [201]
    assert b.logits.shape == (1, TINY_VOCAB)
    assert max_diff(b.logits[0], hf_logits(hf, prompt + [7, 10])[-1]) < TINY_ATOL
    # a later segment under a skipped row is skipped too; an all-skipped segment is empty
    c = pipe.run(Segment([105], [103], [p + 4], tokens=torch.tensor([12])))
    assert c.node_ids == [] and c.logits.shape == (0, TINY_VOCAB)
    # a drop that overtakes the node it names: the node and its subtree are skipped on arrival
    pipe.apply_update([], [300])
    d = pipe.run(Segment([300, 301, 202], [200, 300, 201], [p + 1, p + 2, p + 2], tokens=torch.tensor([1, 2, 3])))
    assert d.node_ids == [202]
    assert max_diff(d.logits[0], hf_logits(hf, prompt + [7, 10, 3])[-1]) < TINY_ATOL
    with pytest.raises(CausalityError, match="dropped"):
        pipe.apply_update([100], [])
    # the surviving branch is committed and decoding goes on correctly
    pipe.apply_update([200, 201, 202], [])
    out = pipe.run(Segment([400], [202], [p + 3], tokens=torch.tensor([4])))
    assert max_diff(out.logits[0], hf_logits(hf, prompt + [7, 10, 3, 4])[-1]) < TINY_ATOL


def test_drop_reaching_a_later_stage_first(tiny_llama, tiny_hf_model) -> None:
    """Stage 0 computed a segment before the drop; stage 1 gets the drop first and skips
    the rows of the dropped branch from stage 0's output."""
    hf = tiny_hf_model("tiny_llama")
    pipe = LocalPipeline.load(tiny_llama, 2, "float32", max_context=128)
    s0, s1 = pipe.stages
    prompt = list(range(50, 60))
    commit_prefix(pipe, prompt)
    p = len(prompt)
    seg = Segment([10, 11, 20, 21], [p - 1, 10, p - 1, 20], [p, p + 1, p, p + 1], tokens=torch.tensor([1, 2, 3, 4]))
    h0 = s0(seg)
    assert h0.node_ids == [10, 11, 20, 21]
    pipe.apply_update([], [10, 11])  # reaches both stages before stage 1 sees the segment
    h1 = s1(h0.as_segment())
    assert h1.node_ids == [20, 21]
    logits = pipe.head(h1.hidden)
    ref = hf_logits(hf, prompt + [3, 4])
    assert max_diff(logits, ref[-2:]) < TINY_ATOL
    pipe.apply_update([20, 21], [])
    out = pipe.run(Segment([22], [21], [p + 2], tokens=torch.tensor([5])))
    assert max_diff(out.logits[0], hf_logits(hf, prompt + [3, 4, 5])[-1]) < TINY_ATOL


# ------------------------------------------------------------ 4. the CLI vs transformers
def _cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_cli(*args: str, script: bool = False) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "flowspec"
    cmd = [str(exe)] if script and exe.exists() else [sys.executable, "-m", "flowspec.cli"]
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env=_cli_env(), timeout=600)


@pytest.fixture(scope="module")
def hf_greedy_64(default_hf, default_tokenizer, default_prompt_ids) -> list[int]:
    ids = default_prompt_ids
    with torch.no_grad():
        out = default_hf.generate(
            torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=64, do_sample=False, eos_token_id=list(default_tokenizer.eos_ids),
            pad_token_id=default_tokenizer.eos_ids[0],
        )
    return out[0, len(ids):].tolist()


@pytest.mark.slow
@pytest.mark.parametrize("stages", [1, 4])
def test_cli_generate_equals_transformers_greedy(stages, hf_greedy_64, default_tokenizer) -> None:
    args = ["generate", "--model", "default", "--prompt", DEFAULT_PROMPT, "--max-new-tokens", "64",
            "--dtype", "float32", "--json"]
    if stages > 1:
        args += ["--stages", str(stages)]
    proc = run_cli(*args, script=stages > 1)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert res["token_ids"] == hf_greedy_64  # includes the stop token if one was produced
    assert res["text"] == default_tokenizer.decode(hf_greedy_64)
    assert res["stats"]["new_tokens"] == len(hf_greedy_64)
    assert res["stats"]["stages"] == stages
    assert res["stats"]["dtype"] == "float32"


def test_default_prompt_runs_64_tokens_without_stop(hf_greedy_64, default_tokenizer) -> None:
    """The CLI comparison above covers a full 64-token run (no early EOS)."""
    assert len(hf_greedy_64) == 64
    assert not set(hf_greedy_64) & set(default_tokenizer.eos_ids)


# ------------------------------------------------------ 5. a stage loads only its layers
def _expected_names(folder: Path, cfg: ModelConfig, start: int, end: int) -> set[str]:
    names = set()
    for n in WeightStore.open(folder).files:
        m = re.match(r"model\.layers\.(\d+)\.", n)
        if m and start <= int(m.group(1)) < end:
            names.add(n)
    if start == 0:
        names.add(EMBED)
    if end == cfg.num_layers:
        names.add(NORM)
    return names


def _check_stage_loading(folder: Path, monkeypatch) -> None:
    requested: list[list[str]] = []
    orig = WeightStore.load

    def spy(self, names, dtype):
        names = list(names)
        requested.append(names)
        return orig(self, names, dtype)

    monkeypatch.setattr(WeightStore, "load", spy)
    cfg = ModelConfig.from_file(str(folder / "config.json"))
    ranges = split_layers(cfg.num_layers, 4) + [(0, 1), (1, cfg.num_layers - 1), (0, cfg.num_layers)]
    for start, end in ranges:
        requested.clear()
        stage = Stage.load(folder, start, end, dtype="float32", max_context=16)
        expect = cfg.layer_params() * (end - start)
        expect += cfg.vocab_size * cfg.hidden_size if start == 0 else 0
        expect += cfg.hidden_size if end == cfg.num_layers else 0
        assert stage.num_params() == expect, (start, end)
        assert stage.weight_bytes() == 4 * expect
        assert len(requested) == 1
        assert len(requested[0]) == len(set(requested[0]))
        assert set(requested[0]) == _expected_names(folder, cfg, start, end), (start, end)
        assert (stage.embed is not None) == (start == 0) and (stage.norm is not None) == (end == cfg.num_layers)
    requested.clear()
    head = LMHead.load(folder, dtype="float32", cfg=cfg)
    store = WeightStore.open(folder)
    assert requested == [[LM_HEAD if store.has(LM_HEAD) and not cfg.tie_word_embeddings else EMBED]]
    assert head.weight.shape == (cfg.vocab_size, cfg.hidden_size)


@pytest.mark.parametrize("kind", TINY_MODEL_KINDS)
def test_stage_loads_only_its_layers_tiny(kind, tiny_model_dir, monkeypatch) -> None:
    _check_stage_loading(tiny_model_dir(kind), monkeypatch)


@pytest.mark.slow
def test_stage_loads_only_its_layers_default(default_model_dir, monkeypatch) -> None:
    _check_stage_loading(default_model_dir, monkeypatch)


def test_sharded_checkpoint_has_index(tiny_llama_sharded) -> None:
    index = json.loads((tiny_llama_sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 4
    assert set(WeightStore.open(tiny_llama_sharded).files) == set(index["weight_map"])


def test_tied_checkpoint_uses_embedding_as_head(tiny_llama3_tied) -> None:
    cfg = ModelConfig.from_file(str(tiny_llama3_tied / "config.json"))
    assert cfg.tie_word_embeddings and cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "llama3"
    head = LMHead.load(tiny_llama3_tied, dtype="float32", cfg=cfg)
    emb = WeightStore.open(tiny_llama3_tied).load([EMBED], torch.float32)[EMBED]
    assert torch.equal(head.weight, emb)


# ------------------------------------------------------------------------- 6. bad inputs
def test_missing_model_path(tmp_path) -> None:
    with pytest.raises(ModelError, match="not found"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="no config.json"):
        Stage.load(tmp_path / "nope", 0, 1)


def test_folder_without_config(tmp_path, tiny_llama) -> None:
    shutil.copy(tiny_llama / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match="without config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match="config.json"):
        LocalPipeline.load(tmp_path, 1, "float32")


def test_folder_without_weights(tmp_path, tiny_llama) -> None:
    shutil.copy(tiny_llama / "config.json", tmp_path / "config.json")
    with pytest.raises(ModelError, match="safetensors"):
        resolve_model(str(tmp_path))
    with pytest.raises(ModelError, match="no tensors"):
        Stage.load(tmp_path, 0, 1)


def test_config_not_json(tmp_path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        ModelConfig.from_file(str(tmp_path / "config.json"))


def _gpt2_folder(tmp_path: Path) -> Path:
    from safetensors.torch import save_file

    d = tmp_path / "gpt2"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_layer": 2,
        "n_head": 4, "vocab_size": 256,
    }))
    save_file({"transformer.wte.weight": torch.zeros(4, 4)}, str(d / "model.safetensors"))
    return d


def test_unsupported_architecture(tmp_path) -> None:
    d = _gpt2_folder(tmp_path)
    with pytest.raises(ModelError, match=r"unsupported architecture 'gpt2' \(GPT2LMHeadModel\).*llama"):
        ModelConfig.from_file(str(d / "config.json"))
    with pytest.raises(ModelError, match="unsupported architecture"):
        LocalPipeline.load(d, 1, "float32")


def test_unsupported_rope_scaling(tiny_llama) -> None:
    d = json.loads((tiny_llama / "config.json").read_text())
    d["rope_scaling"] = {"rope_type": "yarn", "factor": 4.0}
    with pytest.raises(ModelError, match="'yarn' is not supported"):
        ModelConfig.from_hf_dict(d)
    d = json.loads((tiny_llama / "config.json").read_text())
    del d["hidden_size"]
    with pytest.raises(ModelError, match="missing field 'hidden_size'"):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize("start,end", [(2, 9), (-1, 2), (3, 3), (3, 1), (4, 5)])
def test_layer_range_outside_model(tiny_llama, start, end) -> None:
    with pytest.raises(ModelError, match=r"layer range .* outside the model.*4 layers"):
        Stage.load(tiny_llama, start, end, dtype="float32")


def test_bad_stage_count_and_dtype(tiny_llama) -> None:
    with pytest.raises(ModelError, match="cannot split 4 layers into 5 stages"):
        LocalPipeline.load(tiny_llama, 5, "float32")
    with pytest.raises(ModelError, match="cannot split"):
        split_layers(4, 0)
    with pytest.raises(ModelError, match="unknown dtype 'float8'"):
        Stage.load(tiny_llama, 0, 1, dtype="float8")


def test_missing_tensor_in_checkpoint(tmp_path, tiny_llama) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copy(tiny_llama / "config.json", tmp_path / "config.json")
    tensors = load_file(str(tiny_llama / "model.safetensors"))
    del tensors["model.layers.2.mlp.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    Stage.load(tmp_path, 0, 2, dtype="float32")  # layers that are complete still load
    with pytest.raises(ModelError, match=r"'model.layers.2.mlp.up_proj.weight' is missing"):
        Stage.load(tmp_path, 2, 4, dtype="float32")


def test_context_overflow(tiny_llama) -> None:
    pipe = LocalPipeline.load(tiny_llama, 2, "float32", max_context=16)
    with pytest.raises(ContextOverflowError, match=r"max_context is 16"):
        pipe.run(chain_segment(list(range(20))))
    pipe.reset()
    commit_prefix(pipe, list(range(12)))
    with pytest.raises(ContextOverflowError, match=r"12 tokens are cached and 5 more.*max_context"):
        pipe.run(chain_segment(list(range(5)), start=12))
    # the cache is unchanged by the refused segment: 4 more still fit
    out = pipe.run(chain_segment([1, 2, 3, 4], start=12))
    assert out.node_ids == [12, 13, 14, 15]


def test_sliding_window_smaller_than_context(tiny_mistral) -> None:
    with pytest.raises(ModelError, match="sliding window 4096"):
        LocalPipeline.load(tiny_mistral, 1, "float32", max_context=5000)


def test_causality_errors(tiny_llama) -> None:
    pipe = LocalPipeline.load(tiny_llama, 1, "float32", max_context=64)
    with pytest.raises(CausalityError, match="never seen"):
        pipe.run(Segment([0], [5], [0], tokens=torch.tensor([1])))
    commit_prefix(pipe, [1, 2, 3])
    with pytest.raises(CausalityError, match="already in use"):
        pipe.run(Segment([2], [1], [2], tokens=torch.tensor([1])))
    with pytest.raises(CausalityError, match="sequence has started"):
        pipe.run(Segment([9], [NO_PARENT], [0], tokens=torch.tensor([1])))
    with pytest.raises(CausalityError, match="one parent id per node id"):
        pipe.run(Segment([9, 10], [2], [3, 4], tokens=torch.tensor([1, 1])))
    pipe.run(Segment([10, 11], [2, 2], [3, 3], tokens=torch.tensor([1, 1])))
    with pytest.raises(CausalityError, match="is not the last committed node"):
        pipe.apply_update([11, 10], [])  # 10 and 11 are siblings
    with pytest.raises(CausalityError, match="already committed"):
        pipe.apply_update([2], [])
    with pytest.raises(CausalityError, match="it is committed"):
        pipe.apply_update([], [1])
    with pytest.raises(ModelError, match="needs token ids"):
        pipe.run(Segment([12], [2], [3]))


# ------------------------------------------------------------------------ CLI errors
def test_cli_error_subprocess_has_no_traceback(tmp_path) -> None:
    proc = run_cli("generate", "--model", str(tmp_path / "missing"), "--prompt", "hi", script=True)
    assert proc.returncode == 1  # a runtime failure (the model is missing); 2 is for bad arguments
    assert proc.stderr.startswith("flowspec: error: model ") and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""


def _cli_error(capsys, *argv: str, code: int = 1) -> str:
    """The one error line of a failing command; code: 1 a runtime failure, 2 a bad argument."""
    rc = cli_main(list(argv))
    err = capsys.readouterr().err
    assert rc == code, err
    lines = [ln for ln in err.splitlines() if ln.startswith("flowspec: error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_cli_errors_in_process(tmp_path, tiny_llama, capsys) -> None:
    line = _cli_error(capsys, "generate", "--model", str(tmp_path / "missing"), "--prompt", "hi")
    assert "not found" in line
    (tmp_path / "empty").mkdir()
    line = _cli_error(capsys, "generate", "--model", str(tmp_path / "empty"), "--prompt", "hi")
    assert "without config.json" in line
    line = _cli_error(capsys, "generate", "--model", str(_gpt2_folder(tmp_path)), "--prompt", "hi")
    assert "unsupported architecture 'gpt2'" in line
    line = _cli_error(capsys, "prepare", "--model", str(tmp_path / "missing"))
    assert "not found" in line


@pytest.mark.slow
def test_cli_errors_default_model(capsys) -> None:
    line = _cli_error(capsys, "generate", "--prompt", DEFAULT_PROMPT, "--stages", "99", "--dtype", "float32",
                      code=2)
    assert "cannot split 30 layers into 99 stages" in line
    line = _cli_error(capsys, "generate", "--prompt", DEFAULT_PROMPT, "--max-context", "8", "--dtype", "float32",
                      code=2)
    assert "max_context is 8" in line


# ------------------------------------------------------- known gaps (see report)

@pytest.mark.parametrize("field", ["attention_bias", "mlp_bias"])
def test_llama_biases_are_used_or_refused(field, tmp_path) -> None:
    """A Llama checkpoint with attention_bias (bias on q/k/v *and* o_proj) or mlp_bias must
    either reproduce transformers or be refused with a ModelError, never be silently wrong."""
    model = build_tiny_hf_model(tiny_hf_config("tiny_llama", **{field: True}))
    folder = save_tiny_model(model, tmp_path / field)
    try:
        pipe = LocalPipeline.load(folder, 1, "float32", max_context=64)
    except ModelError:
        return
    tokens = list(range(3, 30))
    assert max_diff(pipe.run(chain_segment(tokens)).logits, hf_logits(model, tokens)) < TINY_ATOL


def test_refused_segment_leaves_cache_unchanged(tiny_llama) -> None:
    """A segment refused for missing inputs must not leave its nodes in the cache: here
    node 10 keeps a slot whose keys/values were never written, and stage 1 never saw it."""
    pipe = LocalPipeline.load(tiny_llama, 2, "float32", max_context=64)
    commit_prefix(pipe, [5, 6, 7])
    with pytest.raises(ModelError, match="needs token ids"):
        pipe.run(Segment([10], [2], [3]))
    assert all(10 not in s.cache.slot_of for s in pipe.stages)
