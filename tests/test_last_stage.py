"""`decoding.verify: last_stage` on a real ring: the last stage holds the lm_head and returns
the target's token after each row with the hidden states; the source only accepts.

Real `flowspec node` processes on loopback, a tiny random Llama with the default model's
tokenizer, float32: every strategy equals single-process greedy decoding token for token,
seeded sampling equals the same request verified at the source, the split gives the last
stage fewer layers (its lm_head counts), and a ring without it refuses such a request.
`decoding.verify: auto` (the last stage chooses only while requests share the ring): answers
together and alone are the same, greedy and seeded, with their logprobs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from flowspec.errors import FlowSpecError
from flowspec.config import Topology

from ring_helpers import tiny_tok_model  # noqa: F401  (a fixture, used by name)
from ring_helpers import TINY_TOK_LAYERS, formed, generate, running_ring, write_topology
from test_concurrency import _concurrently
from test_ring import TINY_PROMPTS, reference

STRATEGIES = ("autoregressive", "chunked", "pipedec", "flowspec")


@pytest.fixture(scope="module")
def ring_last(tiny_tok_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:  # noqa: F811
    folder = tmp_path_factory.mktemp("ring_last")
    path = write_topology(folder, 4, tiny_tok_model, strategy="flowspec",
                          decoding={"verify": "last_stage", "tree": {"segment": 4, "expand": 8}})
    with running_ring(path, log_dir=folder) as ring:
        yield Topology.load(str(path)), ring


def test_every_strategy_equals_greedy(ring_last: Any, tiny_tok_model: Path) -> None:  # noqa: F811
    topo, ring = ring_last
    for strategy in STRATEGIES:
        for prompt in TINY_PROMPTS:
            res = generate(topo, ring.key, {"prompt_ids": prompt, "max_new_tokens": 24, "strategy": strategy})
            assert res["token_ids"] == reference(tiny_tok_model, prompt, 24), strategy
            st = res["stats"]
            # the last stage chose the token of every row the source verified
            assert st["chosen_at_last_stage"] >= st["new_tokens"], (strategy, st)


def test_sampling_equals_verifying_at_the_source(ring_last: Any) -> None:
    """Seeded sampling: the same text whichever node draws the tokens (the draw at position
    p depends on (seed, p) only), so verifying at the last stage samples the same distribution."""
    topo, ring = ring_last
    texts = set()
    for seed in range(3):
        for strategy in ("autoregressive", "flowspec"):
            req = {"prompt_ids": TINY_PROMPTS[1], "max_new_tokens": 20, "strategy": strategy,
                   "temperature": 0.9, "top_p": 0.95, "seed": seed}
            here = generate(topo, ring.key, dict(req, verify="source"))
            there = generate(topo, ring.key, req)
            assert here["stats"]["chosen_at_last_stage"] == 0 < there["stats"]["chosen_at_last_stage"]
            assert there["token_ids"] == here["token_ids"], (seed, strategy)
            texts.add(tuple(there["token_ids"]))
    assert len(texts) >= 3  # the seeds really sample


def test_logprobs_come_back_with_the_chosen_tokens(ring_last: Any) -> None:
    """A request that asks for logprobs on a ring that verifies at the last stage gets the
    target's logprobs from the stage that chose each token: equal to the source's own."""
    topo, ring = ring_last
    for strategy in ("autoregressive", "flowspec"):
        req = {"prompt_ids": TINY_PROMPTS[0], "max_new_tokens": 16, "strategy": strategy, "logprobs": 2}
        here = generate(topo, ring.key, dict(req, verify="source"))
        there = generate(topo, ring.key, req)
        assert there["stats"]["chosen_at_last_stage"] > 0 and there["token_ids"] == here["token_ids"]
        assert [e["token"] for e in there["logprobs"]] == there["token_ids"]
        assert [e["logprob"] for e in there["logprobs"]] == pytest.approx([e["logprob"] for e in here["logprobs"]],
                                                                          abs=1e-5)
        assert [[t for t, _ in e["top"]] for e in there["logprobs"]] == [[t for t, _ in e["top"]]
                                                                         for e in here["logprobs"]]


def test_the_last_stage_holds_the_lm_head_and_fewer_layers(ring_last: Any) -> None:
    topo, ring = ring_last
    status = formed(topo, ring.key, 30)
    stages = status["ring"]
    assert [s["lm_head"] for s in stages] == [False, False, True]
    sizes = [s["layers"][1] - s["layers"][0] for s in stages]
    assert sum(sizes) == TINY_TOK_LAYERS and sizes[-1] < min(sizes[:-1]), sizes


@pytest.fixture(scope="module")
def ring_auto(tiny_tok_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:  # noqa: F811
    folder = tmp_path_factory.mktemp("ring_auto")
    path = write_topology(folder, 4, tiny_tok_model, strategy="flowspec",
                          decoding={"verify": "auto", "max_active": 4, "tree": {"segment": 4, "expand": 8}})
    with running_ring(path, log_dir=folder) as ring:
        yield Topology.load(str(path)), ring


def test_auto_chooses_at_the_source_alone_and_at_the_last_stage_when_shared(
        ring_auto: Any, tiny_tok_model: Path) -> None:  # noqa: F811
    """verify: auto: the last stage holds the lm_head; a request alone is verified at the
    source, requests that share the ring get their tokens from the last stage; every answer
    equals single-process greedy decoding, whichever node chose each of its tokens."""
    topo, ring = ring_auto
    assert [s["lm_head"] for s in formed(topo, ring.key, 30)["ring"]] == [False, False, True]
    for strategy in ("autoregressive", "flowspec"):
        alone = generate(topo, ring.key, {"prompt_ids": TINY_PROMPTS[0], "max_new_tokens": 24, "strategy": strategy})
        assert alone["token_ids"] == reference(tiny_tok_model, TINY_PROMPTS[0], 24), strategy
        assert alone["stats"]["chosen_at_last_stage"] == 0, strategy
    reqs = [{"prompt_ids": TINY_PROMPTS[i % len(TINY_PROMPTS)], "max_new_tokens": 40, "strategy": s, "trace": True}
            for i, s in enumerate(STRATEGIES)]
    done = asyncio.run(_concurrently(topo, ring.key, reqs))
    for req, res in zip(reqs, done):
        assert res["token_ids"] == reference(tiny_tok_model, req["prompt_ids"], 40), req["strategy"]
    spans = [(t["segments"][0]["t_sent"], t["segments"][-1]["t_back"]) for t in (d["stats"]["trace"] for d in done)]
    assert all(a0 < b1 and b0 < a1 for a0, a1 in spans for b0, b1 in spans), spans  # they shared the ring
    assert all(d["stats"]["chosen_at_last_stage"] > 0 for d in done), [d["stats"] for d in done]


def test_auto_sampling_and_logprobs_equal_alone(ring_auto: Any) -> None:
    """Seeded sampling with logprobs, requests together (tokens chosen at the last stage while
    they share, at the source once alone) and each alone (all at the source): the same tokens
    and the same logprobs."""
    topo, ring = ring_auto
    reqs = [{"prompt_ids": TINY_PROMPTS[i % 2] + [7 * i + 5], "max_new_tokens": 24 + 8 * i, "strategy": s,
             "temperature": 0.9, "top_p": 0.95, "seed": 50 + i, "logprobs": 2}
            for i, s in enumerate(("flowspec", "autoregressive", "pipedec"))]
    solo = [generate(topo, ring.key, q) for q in reqs]
    together = asyncio.run(_concurrently(topo, ring.key, reqs))
    assert any(t["stats"]["chosen_at_last_stage"] > 0 for t in together)
    for a, b in zip(solo, together):
        assert b["token_ids"] == a["token_ids"]
        want = [e["logprob"] for e in a["logprobs"]]
        assert [e["logprob"] for e in b["logprobs"]] == pytest.approx(want, abs=1e-5)
        assert [[t for t, _ in e["top"]] for e in b["logprobs"]] == [[t for t, _ in e["top"]] for e in a["logprobs"]]


def test_a_ring_without_it_refuses_the_request(tiny_tok_model: Path, tmp_path: Path) -> None:  # noqa: F811
    path = write_topology(tmp_path, 2, tiny_tok_model)
    with running_ring(path, log_dir=tmp_path) as ring:
        topo = Topology.load(str(path))
        with pytest.raises(FlowSpecError, match="needs decoding.verify: last_stage or auto in the topology"):
            generate(topo, ring.key, {"prompt_ids": TINY_PROMPTS[0], "max_new_tokens": 4, "verify": "last_stage"})
        with pytest.raises(FlowSpecError, match="verify: auto needs decoding.verify: last_stage or auto"):
            generate(topo, ring.key, {"prompt_ids": TINY_PROMPTS[0], "max_new_tokens": 4, "verify": "auto"})
        with pytest.raises(FlowSpecError, match="unknown verify 'stage3'"):
            generate(topo, ring.key, {"prompt_ids": TINY_PROMPTS[0], "max_new_tokens": 4, "verify": "stage3"})
        res = generate(topo, ring.key, {"prompt_ids": TINY_PROMPTS[0], "max_new_tokens": 8})
        assert res["token_ids"] == reference(tiny_tok_model, TINY_PROMPTS[0], 8)
