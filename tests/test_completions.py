"""Text completions, logprobs and the API's new settings, without a ring (fast).

The ring tests of ``/v1/completions``, logprobs over HTTP, ``/v1/models/{id}``, CORS and
the access log are in test_api.py (they share its ring). Here: the request checks, the
answer shapes, the topology fields (``model.name``, ``api.cors_origins``,
``api.access_log``), and the logprobs the Speculator records, checked against
``transformers`` for every strategy, greedy and sampled, in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from flowspec.api_format import Reply, legacy_logprobs
from flowspec.api_request import ApiError, GenCall, parse_chat, parse_completion
from flowspec.config import Topology
from flowspec.errors import RequestError, TopologyError
from flowspec.speculative.logprobs import TokenLogprob

from drafters_for_tests import RandomDrafter


class _Ctx:
    model_id = "tiny"

    @staticmethod
    def knows_model(m: str) -> bool:
        return m in ("tiny", "/models/tiny")


# ------------------------------------------------------------------------ request checks
def test_parse_completion_maps_openai_fields() -> None:
    call = parse_completion({"model": "/models/tiny", "prompt": "Once upon", "max_tokens": 9, "temperature": 0.5,
                             "top_p": 0.9, "seed": 4, "stop": ["\n"], "stream": True, "logprobs": 2,
                             "stream_options": {"include_usage": True}, "echo": False, "strategy": "pipedec",
                             "top_k": 3, "user": "someone", "suffix": None, "best_of": 1}, _Ctx())  # type: ignore[arg-type]
    assert call.meta == {"prompt": "Once upon", "raw": True, "max_new_tokens": 9, "temperature": 0.5, "top_p": 0.9,
                         "seed": 4, "top_k": 3, "stop": ["\n"], "strategy": "pipedec", "logprobs": 2}
    assert (call.kind, call.stream, call.include_usage, call.logprobs, call.echo) == ("text", True, True, 2, False)
    # OpenAI's default max_tokens for completions; a batch of one; token ids
    assert parse_completion({"prompt": ["hi"]}, _Ctx()).meta == {  # type: ignore[arg-type]
        "prompt": "hi", "raw": True, "max_new_tokens": 16}
    call = parse_completion({"prompt": [[5, 6, 7]], "echo": True}, _Ctx())  # type: ignore[arg-type]
    assert call.meta == {"prompt_ids": [5, 6, 7], "max_new_tokens": 16}
    assert call.echo and call.logprobs is None and not call.stream
    assert parse_completion({"prompt": [5], "logprobs": 0}, _Ctx()).logprobs == 0  # type: ignore[arg-type]


@pytest.mark.parametrize("body,status,param,needle", [
    ({}, 400, "prompt", "prompt is required"),
    ({"prompt": [[1], [2]]}, 400, "prompt", "holds 2 prompts"),
    ({"prompt": [1, "a"]}, 400, "prompt", "prompt must be"),
    ({"prompt": [True]}, 400, "prompt", "prompt must be"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"prompt": "x", "max_completion_tokens": 5}, 400, "max_completion_tokens", "take max_tokens"),
    ({"prompt": "x", "echo": "yes"}, 400, "echo", "true or false"),
    ({"prompt": "x", "logprobs": -1}, 400, "logprobs", "from 0 to 20"),
    ({"prompt": "x", "logprobs": 2, "echo": True}, 400, "echo", "not of the prompt"),
    ({"prompt": "x", "stream": True, "stream_options": {"include_usage": "yes"}}, 400, "stream_options", "true or"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream: true"),
    ({"prompt": "x", "suffix": "END"}, 400, "suffix", "not supported"),
    ({"prompt": "x", "presence_penalty": 1}, 400, "presence_penalty", "not supported"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model", "not served"),
    ({"prompt": "x", "temperature": 3}, 400, "temperature", "[0, 2]"),
    ({"prompt": "x", "n": 2}, 400, "n", "n must be 1"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": "x", "seed": "7"}, 400, "seed", "seed: must be an integer"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "up to 4 non-empty strings"),
    ({"prompt": "x", "stop": [""]}, 400, "stop", "non-empty strings"),
])
def test_parse_completion_rejects(body: dict[str, Any], status: int, param: str, needle: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_completion(body, _Ctx())  # type: ignore[arg-type]
    assert (e.value.status, e.value.param) == (status, param) and needle in e.value.message, e.value.message


def test_parse_chat_logprobs() -> None:
    msgs = [{"role": "user", "content": "x"}]
    assert parse_chat({"messages": msgs, "logprobs": True}, _Ctx()).logprobs == 0  # type: ignore[arg-type]
    call = parse_chat({"messages": msgs, "logprobs": True, "top_logprobs": 20}, _Ctx())  # type: ignore[arg-type]
    assert call.logprobs == 20 and call.meta["logprobs"] == 20
    assert "logprobs" not in parse_chat({"messages": msgs, "logprobs": False}, _Ctx()).meta  # type: ignore[arg-type]
    for body, param in [({"logprobs": 1}, "logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 1.5},
                                                                "top_logprobs")]:
        with pytest.raises(ApiError) as e:
            parse_chat({"messages": msgs, **body}, _Ctx())  # type: ignore[arg-type]
        assert e.value.status == 400 and e.value.param == param, body


def test_logprobs_are_checked_wherever_the_tokens_are_chosen(default_model_dir: Path) -> None:
    from flowspec.model.tokenizer import Tokenizer
    from flowspec.runtime.requests import check_request

    topo = Topology.from_dict(_topo({"decoding": {"verify": "last_stage"}}))
    tok = Tokenizer(default_model_dir)
    # the last stage returns the logprobs with the tokens it chooses (test_last_stage.py)
    assert check_request(topo, tok, 49152, {"prompt": "x", "raw": True, "logprobs": 0}).request.logprobs == 0
    assert check_request(topo, tok, 49152, {"prompt": "x", "logprobs": 3, "verify": "source"}).logprobs == 3
    with pytest.raises(RequestError, match="logprobs: must be an integer from 0 to 20"):
        check_request(topo, tok, 49152, {"prompt": "x", "logprobs": 21, "verify": "source"})
    # a completion's prompt that does not fit names `prompt`, not `messages`
    plan = check_request(topo, tok, 49152, {"prompt": "x", "raw": True, "max_new_tokens": 2000})
    from flowspec.runtime.requests import finish_request

    with pytest.raises(RequestError) as e:
        finish_request(topo, plan, [1])
    assert e.value.param == "prompt"


# ------------------------------------------------------------------------ answer shapes
def _pieces(ids: list[int]) -> list[tuple[str, bytes]]:
    names = {1: ("Hel", b"Hel"), 2: ("lo", b"lo"), 3: ("\ufffd", b"\xc3"), 4: ("lo", b"lo")}
    return [names[i] for i in ids]


def test_legacy_logprobs_shape() -> None:
    lps = [TokenLogprob(1, -0.1, ((1, -0.1), (2, -3.0))), TokenLogprob(3, -2.0, ((2, -1.0), (4, -1.5))),
           TokenLogprob(2, float("-inf"), ())]
    out, end = legacy_logprobs(lps, dict(zip(range(1, 5), _pieces([1, 2, 3, 4]))), 5)
    assert out == {"tokens": ["Hel", "\ufffd", "lo"], "token_logprobs": [-0.1, -2.0, -9999.0],
                   # the n most likely and the chosen token; two tokens of the same text keep the likelier
                   "top_logprobs": [{"Hel": -0.1, "lo": -3.0}, {"lo": -1.0, "\ufffd": -2.0}, {"lo": -9999.0}],
                   "text_offset": [5, 8, 9]}
    assert end == 11


def test_reply_chunks_and_usage() -> None:
    call = GenCall({}, True, True, [], "chat", 1)
    reply = Reply(call, "tiny", 7, _pieces)
    opening = reply.opening()
    assert opening[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""} and opening[0]["usage"] is None
    chunk = reply.chunk("Hel", lps=[TokenLogprob(1, -0.1, ((1, -0.1),))])
    assert chunk["object"] == "chat.completion.chunk" and chunk["usage"] is None
    assert chunk["choices"][0]["logprobs"] == {"content": [
        {"token": "Hel", "logprob": -0.1, "bytes": [72, 101, 108],
         "top_logprobs": [{"token": "Hel", "logprob": -0.1, "bytes": [72, 101, 108]}]}], "refusal": None}
    from flowspec.runtime.decode import DoneEvent

    done = DoneEvent([1, 3], "Hel", "length", {}, [TokenLogprob(1, -0.1), TokenLogprob(3, -2.0)])
    *rest, last = reply.closing(done, "", [TokenLogprob(3, -2.0)], {"x": 1})
    assert rest[0]["choices"][0]["logprobs"]["content"][0]["bytes"] == [0xC3]  # a piece of a character
    assert rest[-1]["choices"][0]["finish_reason"] == "length" and rest[-1]["flowspec"] == {"x": 1}
    assert last["choices"] == [] and last["usage"] == {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}
    # a text completion with echo: the prompt first; no usage key without include_usage
    text = Reply(GenCall({}, True, False, [], "text", None, True), "tiny", 2, _pieces, echo="Say: ")
    assert [c["choices"][0]["text"] for c in text.opening()] == ["Say: "]
    assert "usage" not in text.chunk("x") and text.id.startswith("cmpl-")
    whole = text.response(DoneEvent([1], "Hel", "stop", {}), {})
    assert whole["object"] == "text_completion" and whole["choices"][0]["text"] == "Say: Hel"
    assert whole["choices"][0]["logprobs"] is None


# ------------------------------------------------------------------------ topology fields
def _topo(extra: dict[str, Any] | None = None, model: dict[str, Any] | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {
        "cluster": "c", "model": {"target": "default", "num_layers": 30, **(model or {})},
        "nodes": [{"name": "src", "host": "127.0.0.1", "port": 7000, "role": "source"},
                  {"name": "s1", "host": "127.0.0.1", "port": 7001, "role": "stage", "layers": "auto"}]}
    d.update(extra or {})
    return d


@pytest.mark.parametrize("target,name,want", [
    ("default", None, "SmolLM2-135M-Instruct"),
    ("/models/Qwen2.5-0.5B-Instruct/", None, "Qwen2.5-0.5B-Instruct"),
    ("/models/llama-2-7b.Q4_K_M.gguf", None, "llama-2-7b.Q4_K_M"),
    ("/models/x", "org/my-model:v1", "org/my-model:v1"),
])
def test_model_name(target: str, name: str | None, want: str) -> None:
    topo = Topology.from_dict(_topo(model={"target": target, "name": name}))
    assert topo.model.served_name == want
    assert want in topo.model.aliases and target.rstrip("/") in topo.model.aliases
    assert Topology.from_dict(topo.to_dict()) == topo


def test_api_settings() -> None:
    topo = Topology.from_dict(_topo({"api": {"cors_origins": ["https://App.example/", "http://localhost:3000"],
                                             "access_log": True}}))
    assert topo.api.cors_origins == ("https://app.example", "http://localhost:3000") and topo.api.access_log
    assert Topology.from_dict(topo.to_dict()) == topo
    assert Topology.from_dict(_topo({"api": {"cors_origins": "*"}})).api.cors_origins == ("*",)
    assert Topology.from_dict(_topo()).api.cors_origins == () and not Topology.from_dict(_topo()).api.access_log
    for api, needle in [({"cors_origins": ["https://a.example/path"]}, "api.cors_origins[0]: must be a list of"),
                        ({"cors_origins": [3]}, "api.cors_origins[0]"), ({"cors_origins": {}}, "api.cors_origins"),
                        ({"access_log": "on"}, "api.access_log: must be true or false")]:
        with pytest.raises(TopologyError, match=needle.replace("[", r"\[").replace("]", r"\]")):
            Topology.from_dict(_topo({"api": api}))
    with pytest.raises(TopologyError, match="model.name: must be the model's id"):
        Topology.from_dict(_topo(model={"name": "two words"}))


# ------------------------------------------------------------------ recorded logprobs
@pytest.mark.parametrize("strategy", ["autoregressive", "chunked", "pipedec", "flowspec"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_chosen_at_the_last_stage_equal_the_sources(tiny_llama: Path, strategy: str,
                                                             temperature: float) -> None:
    """With decoding.verify: last_stage the stage that chooses a token also returns its
    logprob and the top alternatives; they equal what the source computes (float32)."""
    from flowspec.model.pipeline import LocalPipeline
    from flowspec.speculative.local_ring import run_local
    from flowspec.speculative.sampling import SamplingParams
    from flowspec.speculative.strategies import Speculator, TreeParams

    pipe = LocalPipeline.load(tiny_llama, 2, dtype="float32", max_context=256)
    prompt, n = [1, 17, 90, 33, 5, 200, 41], 24
    tree = TreeParams(depth=3, top_k=3, total=16, segment=4, expand=8, in_flight=2)

    def decode(verify: str) -> Speculator:
        spec = Speculator(strategy, pipe.head, RandomDrafter(vocab=256, seed=3, from_context=0.5), prompt, n,
                          sampling=SamplingParams(temperature=temperature, seed=5), tree=tree, logprobs=3)
        run_local(spec, pipe, verify)
        return spec

    here, there = decode("source"), decode("last_stage")
    assert there.output == here.output and there.stats.chosen_at_last_stage > 0
    assert [e.token for e in there.token_logprobs] == there.output
    for a, b in zip(here.token_logprobs, there.token_logprobs):
        assert b.logprob == pytest.approx(a.logprob, abs=1e-5)
        assert [t for t, _ in b.top] == [t for t, _ in a.top]
        assert [v for _, v in b.top] == pytest.approx([v for _, v in a.top], abs=1e-5)


@pytest.mark.parametrize("strategy,temperature", [("flowspec", 0.0), ("flowspec", 0.9), ("chunked", 0.7)])
def test_speculator_records_the_targets_logprobs(tiny_llama: Path, tiny_hf_model: Callable[[str], Any],
                                                 strategy: str, temperature: float) -> None:
    """The logprob of every accepted token is the target's log-softmax (raw logits, whatever
    the temperature) at its position, as transformers computes it; recording them changes
    no token."""
    from flowspec.model.pipeline import LocalPipeline
    from flowspec.speculative.local_ring import run_local
    from flowspec.speculative.sampling import SamplingParams
    from flowspec.speculative.strategies import Speculator, TreeParams

    pipe = LocalPipeline.load(tiny_llama, 2, dtype="float32", max_context=256)
    prompt, n = [1, 17, 90, 33, 5, 200, 41], 30
    sampling = SamplingParams(temperature=temperature, seed=11)
    tree = TreeParams(depth=3, top_k=3, total=16, segment=4, expand=8, in_flight=2)

    def decode(logprobs: int | None) -> Speculator:
        spec = Speculator(strategy, pipe.head, RandomDrafter(vocab=256, seed=3, from_context=0.5), prompt, n,
                          sampling=sampling, tree=tree, logprobs=logprobs)
        run_local(spec, pipe)
        return spec

    plain, spec = decode(None), decode(4)
    assert spec.output == plain.output and plain.token_logprobs == []
    assert [e.token for e in spec.token_logprobs] == spec.output
    with torch.no_grad():
        logits = tiny_hf_model("tiny_llama")(torch.tensor([prompt + spec.output])).logits[0]
    ref = torch.log_softmax(logits.float(), -1)[len(prompt) - 1 : -1]
    for i, e in enumerate(spec.token_logprobs):
        assert abs(e.logprob - float(ref[i, e.token])) <= 1e-4, i
        vals, ids = ref[i].topk(4)
        assert [t for t, _ in e.top] == ids.tolist() and [v for _, v in e.top] == pytest.approx(vals.tolist(), abs=1e-4)
        if temperature == 0:
            assert e.top[0][0] == e.token
    if temperature > 0:  # sampled, not always the argmax
        assert any(e.top[0][0] != e.token for e in spec.token_logprobs)
