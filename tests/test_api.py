"""The source's HTTP API on a real ring (source + 2 stages, a tiny model with SmolLM2's tokenizer).

The official ``openai`` client (the pinned version) must get exactly the text of
single-process greedy decoding at temperature 0, streaming or not, with the right usage
counts; /v1/completions honours stop, seed and top_p; every field FlowSpec cannot honour
is answered 400 naming it, on both routes; bad requests get a 4xx with a message and never
take the server down; /health, /v1/models and /metrics have their formats; a full queue
answers 429 and a dead ring 503.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from flowspec.api_request import UNSUPPORTED, ApiError, parse_chat, parse_completion
from flowspec.runtime.text import TextStream
from ring_helpers import running_ring, tiny_tok_model, wait_log, write_topology  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

API_KEY = "test-api-key-0123456789"
QUESTION = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name three colours."}]
MAX_TOKENS = 24
MODEL_NAME = "tiny-smol"  # the ring's model.name: its id in the API
ORIGIN = "http://localhost:3000"  # the one browser origin the ring's api.cors_origins allows


@pytest.fixture(scope="module")
def api_ring(tiny_tok_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("api_ring")
    # one request decodes at a time here, so that the queue (and its 429) can be tested
    path = write_topology(folder, 3, tiny_tok_model, strategy="flowspec", max_context=1024,
                          decoding={"max_active": 1})
    key_file = folder / "api.key"
    key_file.write_text(API_KEY + "\n")
    data = yaml.safe_load(path.read_text())
    data["api"].update({"api_key_file": str(key_file), "queue_size": 1, "cors_origins": [ORIGIN],
                        "access_log": True})
    data["model"]["name"] = MODEL_NAME
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    url = f"http://127.0.0.1:{data['api']['port']}"
    with running_ring(path, node_args=("--dtype", "float32")) as ring:
        deadline = time.monotonic() + 30
        while call("GET", url + "/health")[0] != 200:
            assert time.monotonic() < deadline, "the API did not come up"
            time.sleep(0.2)
        yield {"url": url, "model": str(tiny_tok_model), "ring": ring, "path": path}


@pytest.fixture(scope="module")
def reference(tiny_tok_model: Path) -> dict[str, Any]:
    """Single-process greedy decoding of QUESTION: the text every API answer must match."""
    from flowspec.model.pipeline import LocalPipeline, greedy_generate
    from flowspec.model.tokenizer import Tokenizer

    tok = Tokenizer(tiny_tok_model)
    prompt = tok.encode_chat(QUESTION)
    pipe = LocalPipeline.load(tiny_tok_model, 1, dtype="float32", max_context=1024)
    res = greedy_generate(pipe, prompt, MAX_TOKENS, tok.eos_ids)
    return {"prompt_tokens": len(prompt), "ids": res.token_ids, "text": tok.decode(res.token_ids),
            "finish": "stop" if res.token_ids[-1] in tok.eos_ids else "length"}


def call(method: str, url: str, body: bytes | dict[str, Any] | None = None, key: str | None = API_KEY,
         timeout: float = 60.0) -> tuple[int, dict[str, Any] | str]:
    """(status, JSON body or text) of one HTTP request."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    except (urllib.error.URLError, ConnectionError):
        return 0, ""
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode()


def openai_client(url: str, key: str = API_KEY) -> Any:
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60.0)


# ------------------------------------------------------------------------ pure functions
def test_text_stream_holds_back_what_may_change() -> None:
    words = {1: "Hello", 2: " wor", 3: "ld", 4: "\ufffd", 5: "!", 6: " END", 7: " more"}

    def decode(ids: list[int]) -> str:
        text = "".join(words[i] for i in ids)
        return text.replace("\ufffd!", "é!")  # a character completed by the next token

    ts = TextStream(decode, [" END"])
    out = [ts.push([1]), ts.push([2]), ts.push([3]), ts.push([4]), ts.push([5])]
    assert out == ["Hello", " wor", "ld", "", "é!"]
    assert ts.push([6]) == "" and ts.push([7]) == ""  # the stop string and what follows never show
    assert ts.finish("Hello world\u00e9!") == ""
    ts2 = TextStream(lambda ids: "ab" * len(ids), ["b!"])
    assert ts2.push([1]) == "a"  # "b" may start the stop string "b!"
    assert ts2.finish("abab") == "bab"


@pytest.mark.parametrize("seed", range(40))
def test_text_deltas_are_never_taken_back_and_decode_short_windows(seed: int) -> None:
    """Random pieces (some completing a character only with the next token) and random stop
    strings: the deltas, joined, are a prefix of the whole answer decoded at once and cut
    before the first stop string, the rest comes with finish(), and the pushes decode short
    windows (O(n) tokens in all), never the whole answer again."""
    rng = random.Random(seed)
    alphabet = ["a", "b", "ab", " ", "\ufffd", "ba", "b!", "!"]
    pieces = {i: rng.choice(alphabet) for i in range(1, 9)}
    decoded = [0]

    def decode(ids: list[int]) -> str:
        decoded[0] += len(ids)
        text = "".join(pieces[i] for i in ids)
        return text.replace("\ufffd!", "é")  # a character completed by the next token

    stops = rng.sample(["ab!", "b a", "é", "aa", "!b"], rng.randint(0, 2))
    ids = [rng.randint(1, 8) for _ in range(rng.randint(1, 400))]
    ts = TextStream(decode, stops)
    out = ""
    for i in range(0, len(ids), 3):
        out += ts.push(ids[i:i + 3])
        if ts.stopped:
            break
    assert decoded[0] <= 12 * len(ids) + 12  # windows, never the whole answer again
    final = ts.final_text()
    assert final.startswith(out)
    full = decode(ids)
    cuts = [full.find(s) for s in stops if s in full]
    assert final == (full[:min(cuts)] if cuts else full)
    assert out + ts.finish(final) == final and ts.sent == final


class _Ctx:
    model_id = "default"

    @staticmethod
    def knows_model(m: str) -> bool:
        return m == "default"


@pytest.mark.parametrize("body,status,param,needle", [
    ([], 400, None, "JSON object"),
    ({}, 400, "messages", "messages is required"),
    ({"messages": []}, 400, "messages", "non-empty"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages", "role"),
    ({"messages": [{"role": "user", "content": 3}]}, 400, "messages", "content"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, 400, "max_tokens", "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, 400, "max_completion_tokens",
     "max_completion_tokens: "),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}, 400, "temperature", "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "stop": [""]}, 400, "stop", "stop"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, 400, "n", "n must be 1"),
    ({"messages": [{"role": "user", "content": "x"}], "strategy": "magic"}, 400, "strategy", "strategy"),
    ({"messages": [{"role": "user", "content": "x"}], "verify": "stage"}, 400, "verify", "unknown verify 'stage'"),
    ({"messages": [{"role": "user", "content": "x"}], "model": "gpt-4"}, 404, "model", "not served"),
])
def test_parse_chat_rejects(body: Any, status: int, param: str | None, needle: str) -> None:
    with pytest.raises(ApiError) as e:
        parse_chat(body, _Ctx())  # type: ignore[arg-type]
    assert (e.value.status, e.value.param) == (status, param) and needle in e.value.message, e.value.message


X = [{"role": "user", "content": "x"}]
# values that ask for something FlowSpec cannot do, for every field of UNSUPPORTED (a field
# added there without values here fails test_refused_values_cover_every_unsupported_field)
REFUSED: dict[str, list[Any]] = {
    "tools": [[{"type": "function", "function": {"name": "f"}}]],
    "functions": [[{"name": "f", "parameters": {"type": "object", "properties": {}}}]],
    "tool_choice": ["auto", "required", {"type": "function", "function": {"name": "f"}}],
    "function_call": ["auto", {"name": "f"}],
    "parallel_tool_calls": ["yes", 1, 0, "false"],  # a flag: only true or false
    "audio": [{"voice": "x", "format": "wav"}],
    "prediction": [{"type": "content", "content": "x"}],
    "modalities": [["text", "audio"], ["audio"]],
    "response_format": [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x"}}],
    "logit_bias": [{"50256": -100}],
    "presence_penalty": [0.5, False],
    "frequency_penalty": [-1, False],
    "repetition_penalty": [1.2, True],
    "best_of": [2, True],
    "suffix": ["!"],
}
ROUTES = {"chat": lambda extra: parse_chat({"messages": X, **extra}, _Ctx()),  # type: ignore[arg-type]
          "completions": lambda extra: parse_completion({"prompt": "x", **extra}, _Ctx())}  # type: ignore[arg-type]


def test_refused_values_cover_every_unsupported_field() -> None:
    assert set(REFUSED) == set(UNSUPPORTED)


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("field,value", [(f, v) for f in UNSUPPORTED for v in REFUSED.get(f, [])])
def test_fields_that_cannot_be_honoured_are_named_never_ignored(route: str, field: str, value: Any) -> None:
    """Every field FlowSpec cannot honour is answered 400 with param naming it, on both
    routes (both refuse the same set: a completion's suffix is refused in a chat too)."""
    with pytest.raises(ApiError) as e:
        ROUTES[route]({field: value})
    assert (e.value.status, e.value.param) == (400, field), e.value.message
    assert e.value.message.startswith(f"{field} is not supported by FlowSpec"), e.value.message


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_neutral_values_of_unsupported_fields_pass(route: str) -> None:
    body = {"tools": [], "tool_choice": "none", "response_format": {"type": "text"},
            "logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0, "modalities": ["text"],
            "parallel_tool_calls": True, "n": 1, "best_of": 1, "repetition_penalty": 1.0, "suffix": "",
            "functions": [], "function_call": "none", "audio": None, "prediction": None}
    base = {"chat": {"messages": X}, "completions": {"prompt": "x", "raw": True, "max_new_tokens": 16}}[route]
    assert ROUTES[route](body).meta == base
    for field, neutrals in UNSUPPORTED.items():  # each neutral value alone
        for v in neutrals:
            assert ROUTES[route]({field: v}).meta == base, (field, v)
    assert parse_chat({"messages": X, "logprobs": False, "top_logprobs": 0}, _Ctx()).meta == {  # type: ignore[arg-type]
        "messages": X}


def test_parse_chat_maps_openai_fields() -> None:
    call_ = parse_chat({"model": "default", "messages": [
        {"role": "developer", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
        {"role": "user", "content": "hi"}], "max_completion_tokens": 7, "temperature": 0.5, "top_p": 0.9,
        "seed": 3, "stop": "\n", "stream": True, "stream_options": {"include_usage": True},
        "strategy": "chunked", "top_k": 5, "frequency_penalty": 0, "verify": "source"},
        _Ctx())  # type: ignore[arg-type]
    assert call_.meta == {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
                          "max_new_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3, "top_k": 5,
                          "stop": ["\n"], "strategy": "chunked", "verify": "source"}
    assert call_.stream and call_.include_usage and call_.stop == ["\n"]


# ----------------------------------------------------------------------------- the ring
def test_openai_client_matches_greedy(api_ring: dict[str, Any], reference: dict[str, Any]) -> None:
    client = openai_client(api_ring["url"])
    r = client.chat.completions.create(model=api_ring["model"], messages=QUESTION, max_tokens=MAX_TOKENS,
                                       temperature=0)
    assert r.choices[0].message.content == reference["text"]
    assert r.choices[0].finish_reason == reference["finish"]
    assert r.usage.prompt_tokens == reference["prompt_tokens"]
    assert r.usage.completion_tokens == len(reference["ids"])
    assert r.usage.total_tokens == reference["prompt_tokens"] + len(reference["ids"])
    fs = r.model_extra["flowspec"]
    assert fs["strategy"] == "flowspec" and fs["new_tokens"] == len(reference["ids"])
    assert set(fs["hops"]["stages"]) == {"stage1", "stage2"}
    # the other strategies answer the same
    for strategy in ("autoregressive", "pipedec"):
        r2 = client.chat.completions.create(model=api_ring["model"], messages=QUESTION, max_tokens=MAX_TOKENS,
                                            temperature=0, extra_body={"strategy": strategy})
        assert r2.choices[0].message.content == reference["text"], strategy
        assert r2.model_extra["flowspec"]["strategy"] == strategy


def test_openai_client_streams_the_same_text(api_ring: dict[str, Any], reference: dict[str, Any]) -> None:
    client = openai_client(api_ring["url"])
    chunks = list(client.chat.completions.create(
        model=api_ring["model"], messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference["text"]
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == reference["finish"]
    assert finals[0].model_extra["flowspec"]["new_tokens"] == len(reference["ids"])
    live = [c.model_extra.get("flowspec") for c in chunks if c.choices and c.choices[0].delta.content]
    assert live and all("tokens_per_s" in x and "hops" in x for x in live)
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (reference["prompt_tokens"], len(reference["ids"]))


def test_raw_stream_ends_with_done(api_ring: dict[str, Any]) -> None:
    status, text = call("POST", api_ring["url"] + "/v1/chat/completions",
                        {"messages": QUESTION, "max_tokens": 4, "stream": True})
    assert status == 200 and isinstance(text, str)
    events = [e for e in text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_bad_requests_get_4xx_and_the_server_stays_up(api_ring: dict[str, Any]) -> None:
    url = api_ring["url"]
    ep = url + "/v1/chat/completions"
    cases = [
        (call("POST", ep, b"{not json"), 400, "not valid JSON"),
        (call("POST", ep, {"model": api_ring["model"]}), 400, "messages is required"),
        (call("POST", ep, {"messages": QUESTION, "max_tokens": -5}), 400, "max_tokens"),
        (call("POST", ep, {"messages": QUESTION, "max_tokens": 100000}), 400, "max_new_tokens"),
        (call("POST", ep, {"messages": QUESTION, "model": "gpt-4o"}), 404, "not served"),
        (call("POST", ep, b"{" + b" " * (2 << 20) + b"}"), 413, "larger than"),
        (call("POST", ep, {"messages": QUESTION}, key="wrong-key"), 401, "invalid API key"),
        (call("POST", ep, {"messages": QUESTION}, key=None), 401, "missing API key"),
        (call("GET", url + "/v1/nothing"), 404, "no endpoint"),
        (call("GET", ep), 405, "not allowed"),
        # this ring verifies at the source: its last stage holds no lm_head
        (call("POST", ep, {"messages": QUESTION, "verify": "last_stage"}), 400,
         "verify: last_stage needs decoding.verify: last_stage or auto in the topology"),
    ]
    for (status, body), want, needle in cases:
        assert status == want, (want, needle, status, body)
        assert isinstance(body, dict) and needle in body["error"]["message"], (needle, body)
    import openai

    with pytest.raises(openai.AuthenticationError):
        openai_client(url, key="nope").chat.completions.create(model=api_ring["model"], messages=QUESTION)
    with pytest.raises(openai.NotFoundError):
        openai_client(url).chat.completions.create(model="gpt-4o", messages=QUESTION)
    assert call("GET", url + "/health", key=None)[0] == 200
    status, body = call("POST", ep, {"messages": QUESTION, "max_tokens": 3})
    assert status == 200 and body["usage"]["completion_tokens"] == 3  # type: ignore[index]


def test_health_models_metrics(api_ring: dict[str, Any]) -> None:
    url = api_ring["url"]
    # without the key /health says only whether the ring serves (issue 14, defect 8) ...
    assert call("GET", url + "/health", key=None) == (200, {"status": "ok"})
    assert call("GET", url + "/health", key="wrong-key") == (200, {"status": "ok"})
    # ... with it, every node
    status, h = call("GET", url + "/health")
    assert status == 200 and isinstance(h, dict)
    assert h["formed"] is True and h["status"] == "ok"
    assert [(n["name"], n["role"], n["status"]) for n in h["nodes"]] == [
        ("source", "source", "up"), ("stage1", "stage", "up"), ("stage2", "stage", "up")]
    status, m = call("GET", url + "/v1/models")
    assert status == 200 and m == {"object": "list", "data": [  # type: ignore[comparison-overlap]
        {"id": MODEL_NAME, "object": "model", "created": m["data"][0]["created"],  # type: ignore[index]
         "owned_by": "flowspec"}]}
    assert call("GET", url + "/metrics", key=None)[0] == 401
    assert call("GET", url + "/metrics", key="wrong-key")[0] == 401
    status, _ = call("POST", url + "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 4})
    assert status == 200
    content_type, m = scrape(url)
    from prometheus_client import CONTENT_TYPE_LATEST

    assert content_type == CONTENT_TYPE_LATEST
    families = {name for name, _ in m}  # every family of the exposition, with its type
    for want in [("flowspec_build_info", "gauge"), ("flowspec_ring_formed", "gauge"),
                 ("flowspec_num_requests_running", "gauge"), ("flowspec_num_requests_waiting", "gauge"),
                 ("flowspec_requests", "counter"), ("flowspec_requests_held", "counter"),
                 ("flowspec_generation_tokens", "counter"), ("flowspec_spec_decode_num_drafts", "counter"),
                 ("flowspec_spec_decode_num_draft_tokens", "counter"),
                 ("flowspec_spec_decode_num_accepted_tokens", "counter"), ("flowspec_stage_compute_seconds", "counter"),
                 ("flowspec_link_bytes", "counter"), ("flowspec_http_responses", "counter"),
                 ("flowspec_time_to_first_token_seconds", "histogram"),
                 ("flowspec_time_per_output_token_seconds", "histogram"),
                 ("flowspec_e2e_request_latency_seconds", "histogram"),
                 ("flowspec_request_queue_time_seconds", "histogram")]:
        assert want in {(name, m[(name, t)].type) for name, t in m}, want
    # the gauges that described only the last request are gone
    assert not families & {"flowspec_tokens_per_second", "flowspec_mean_accepted_tokens", "flowspec_stage_busy_ratio",
                           "flowspec_link_latency_seconds", "flowspec_tokens_per_second_average"}
    v = samples(m)
    build = [labels for (name, labels) in v if name == "flowspec_build_info"]
    assert len(build) == 1 and dict(build[0])["strategy"] == "flowspec"
    assert dict(build[0])["model"] == call("GET", url + "/v1/models")[1]["data"][0]["id"]  # type: ignore[index]
    assert value(v, "flowspec_ring_formed") == 1
    # the answer's segments were scored, in at most as many lm_head passes as segments
    assert 0 < value(v, "flowspec_lm_head_passes_total") <= value(v, "flowspec_lm_head_segments_total")
    assert value(v, "flowspec_link_bytes_total", link="stage2->source") > 0


HISTOGRAMS = ("flowspec_time_to_first_token_seconds", "flowspec_time_per_output_token_seconds",
              "flowspec_e2e_request_latency_seconds", "flowspec_request_queue_time_seconds")


def scrape(url: str) -> tuple[str, dict[tuple[str, str], Any]]:
    """GET /metrics: its content type and its families, parsed with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    req = urllib.request.Request(url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        content_type, text = r.headers["Content-Type"], r.read().decode()
    return content_type, {(f.name, f.type): f for f in text_string_to_metric_families(text)}


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(families: dict[tuple[str, str], Any]) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value for f in families.values() for s in f.samples}


def value(v: Samples, name: str, **labels: str) -> float:
    """A sample's value; 0 for a labelled sample not created yet (as for a counter never moved)."""
    return v.get((name, frozenset(labels.items())), 0.0)


def idle_samples(url: str) -> Samples:
    """The samples once no request decodes or waits (an earlier test's may still be ending)."""
    deadline = time.monotonic() + 30
    while True:
        v = samples(scrape(url)[1])
        if value(v, "flowspec_num_requests_running") == 0 and value(v, "flowspec_num_requests_waiting") == 0:
            return v
        assert time.monotonic() < deadline, "the ring did not become idle"
        time.sleep(0.1)


def test_metrics_count_what_a_request_reported(api_ring: dict[str, Any]) -> None:
    """After one request, every counter moved by exactly what the request itself reported
    (usage and its flowspec statistics), and each histogram observed it once."""
    url = api_ring["url"]
    before = idle_samples(url)
    status, body = call("POST", url + "/v1/chat/completions",
                        {"messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0})
    assert status == 200 and isinstance(body, dict)
    after = samples(scrape(url)[1])

    def d(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    usage, st, n = body["usage"], body["flowspec"], body["usage"]["completion_tokens"]
    assert n > 1 and st["verified"] > 0  # decoded with drafts (strategy flowspec)
    assert d("flowspec_requests_total", outcome="ok") == 1
    assert d("flowspec_requests_total", outcome="error") == d("flowspec_requests_total", outcome="cancelled") == 0
    assert d("flowspec_request_success_total", finished_reason=body["choices"][0]["finish_reason"]) == 1
    assert d("flowspec_http_responses_total", endpoint="/v1/chat/completions", code="200") == 1
    assert d("flowspec_prompt_tokens_total") == usage["prompt_tokens"]
    assert d("flowspec_generation_tokens_total") == n
    assert d("flowspec_requests_held_total") == d("flowspec_requests_resumed_total") == 0
    assert d("flowspec_spec_decode_num_drafts_total") == st["rounds"] > 0
    assert d("flowspec_spec_decode_num_draft_tokens_total") == st["verified"]
    assert d("flowspec_spec_decode_num_accepted_tokens_total") == st["accepted_drafts"]
    assert d("flowspec_spec_decode_num_proposed_tokens_total") == st["drafted"]
    assert d("flowspec_spec_decode_num_verifications_total") == st["verifications"]
    per_pos = st["depth_accepted"]
    assert sum(per_pos) == st["accepted_drafts"]
    for pos, k in enumerate(per_pos):
        assert d("flowspec_spec_decode_num_accepted_tokens_per_pos_total", position=str(pos)) == k
    assert d("flowspec_spec_decode_round_ends_total", reason="missed") == st["ends_missed"]
    assert d("flowspec_spec_decode_round_ends_total", reason="undrafted") == st["ends_undrafted"]
    assert st["ends_missed"] + st["ends_undrafted"] in (st["rounds"], st["rounds"] - 1)
    assert d("flowspec_decode_seconds_total") == pytest.approx(st["decode_s"], abs=1e-6)
    hops = st["hops"]
    assert set(hops["stages"]) == {"stage1", "stage2"}
    for stage, s in hops["stages"].items():
        assert d("flowspec_stage_compute_seconds_total", stage=stage) == pytest.approx(s["compute_s"], abs=1e-6)
        assert d("flowspec_stage_compute_seconds_total", stage=stage) > 0
        assert d("flowspec_stage_segments_total", stage=stage) == s["segments"] > 0
    assert set(hops["links"]) == {"source->stage1", "stage1->stage2", "stage2->source"}
    for link, s in hops["links"].items():
        assert d("flowspec_link_bytes_total", link=link) == s["bytes"] > 0
        assert d("flowspec_link_wire_seconds_total", link=link) == pytest.approx(s["wire_s"], abs=1e-6)
    assert d("flowspec_ring_trips_total") == hops["trips"] > 0
    for h in HISTOGRAMS:  # one observation each
        assert d(h + "_count") == 1 and d(h + "_bucket", le="+Inf") == 1, h
        les = sorted((dict(lab)["le"] for name, lab in after if name == h + "_bucket"), key=float)
        bounds = [float(le) for le in les]
        top = 5 if h == HISTOGRAMS[1] else 20  # a token may take seconds, a first token tens of them
        assert len(bounds) >= 12 and bounds[0] <= 0.1 and bounds[-2] >= top, (h, bounds)
        counts = [value(after, h + "_bucket", le=le) for le in les]
        assert counts == sorted(counts) and counts[-1] == value(after, h + "_count"), (h, counts)
    ttft, e2e = d(HISTOGRAMS[0] + "_sum"), d(HISTOGRAMS[2] + "_sum")
    assert 0 < ttft <= e2e and 0 <= d(HISTOGRAMS[3] + "_sum") <= ttft
    # time per output token: the time after the first token, over the tokens after the first
    assert d(HISTOGRAMS[1] + "_sum") * (n - 1) == pytest.approx(e2e - ttft, rel=1e-6, abs=1e-9)


# ------------------------------------------------------ completions, logprobs, models, CORS
PROMPT = "The three primary colours are"


@pytest.fixture(scope="module")
def target(tiny_tok_model: Path) -> dict[str, Any]:
    """The target model run by transformers (float32, as the ring): an independent reference
    for the logprobs; greedy(prompt ids) -> (token ids, log-softmax rows that chose them)."""
    import torch
    from transformers import AutoModelForCausalLM

    from flowspec.model.tokenizer import Tokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_tok_model), dtype=torch.float32).eval()
    tok = Tokenizer(tiny_tok_model)

    @torch.no_grad()
    def greedy(prompt: list[int], n: int = MAX_TOKENS) -> tuple[list[int], Any]:
        ids = list(prompt)
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            if ids[-1] in tok.eos_ids:
                break
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        return ids[len(prompt):], logp[len(prompt) - 1 : len(ids) - 1]

    return {"tok": tok, "greedy": greedy}


def sse(text: str) -> list[dict[str, Any]]:
    """The JSON events of a server-sent event stream that ends with [DONE]."""
    events = [e for e in text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]", events[-2:]
    return [json.loads(e[6:]) for e in events[:-1]]


def test_completions_are_raw_greedy_text_with_the_targets_logprobs(api_ring: dict[str, Any],
                                                                   target: dict[str, Any]) -> None:
    """/v1/completions sends the prompt as it is (no chat template); logprobs are the target's
    log-softmax at each position (transformers on the same weights, float32, within 1e-4)."""
    tok = target["tok"]
    prompt_ids = tok.encode(PROMPT)
    ids, logp = target["greedy"](prompt_ids)
    client = openai_client(api_ring["url"])
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, logprobs=3)
    assert r.object == "text_completion" and r.model == MODEL_NAME and r.id.startswith("cmpl-")
    choice = r.choices[0]
    assert choice.text == tok.decode(ids)
    assert choice.finish_reason == ("stop" if ids[-1] in tok.eos_ids else "length")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt_ids), len(ids))
    lp = choice.logprobs
    pieces = [text for text, _ in tok.pieces(ids)]
    assert lp.tokens == pieces
    assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids)
    for i, t in enumerate(ids):
        assert abs(lp.token_logprobs[i] - float(logp[i, t])) <= 1e-4, i
        # the 3 most likely and the chosen token (greedy: the most likely itself), by their texts
        want: dict[str, float] = {}
        vals, best = logp[i].topk(3)
        for u, v in [*zip(best.tolist(), vals.tolist()), (t, float(logp[i, t]))]:
            want.setdefault(tok.pieces([u])[0][0], v)
        assert lp.top_logprobs[i] == pytest.approx(want, abs=1e-4)
        assert lp.top_logprobs[i][pieces[i]] == lp.token_logprobs[i] == max(lp.top_logprobs[i].values())
    assert lp.text_offset == [sum(len(p) for p in pieces[:i]) for i in range(len(ids))]
    # the prompt as token ids, echoed: the same answer after the prompt's text
    r2 = client.completions.create(model=api_ring["model"], prompt=prompt_ids, max_tokens=4, temperature=0,
                                   echo=True)
    assert r2.choices[0].text == tok.decode(prompt_ids) + tok.decode(ids[:4])
    assert r2.model == MODEL_NAME  # a request may name the model by its folder; answers use the id


def test_completions_stream_with_usage_and_logprobs(api_ring: dict[str, Any], target: dict[str, Any]) -> None:
    """Streamed text_completion chunks add up to the whole answer, logprobs included; with
    include_usage every chunk has "usage": null and one last chunk without choices the usage."""
    tok = target["tok"]
    ids, logp = target["greedy"](tok.encode(PROMPT))
    status, text = call("POST", api_ring["url"] + "/v1/completions", {
        "model": MODEL_NAME, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
        "stream_options": {"include_usage": True}, "logprobs": 1, "echo": False})
    assert status == 200 and isinstance(text, str)
    *chunks, last = sse(text)
    assert all(c["object"] == "text_completion" and c["model"] == MODEL_NAME and "usage" in c
               and c["usage"] is None and len(c["choices"]) == 1 for c in chunks)
    assert last["choices"] == [] and last["usage"] == {
        "prompt_tokens": len(tok.encode(PROMPT)), "completion_tokens": len(ids),
        "total_tokens": len(tok.encode(PROMPT)) + len(ids)}
    assert len({c["id"] for c in [*chunks, last]}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == tok.decode(ids)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]] == [
        "stop" if ids[-1] in tok.eos_ids else "length"]
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    got = [x for p in parts for x in p["token_logprobs"]]
    assert len(got) == len(ids) and all(abs(g - float(logp[i, t])) <= 1e-4 for i, (g, t) in enumerate(zip(got, ids)))
    pieces = [p for p, _ in tok.pieces(ids)]
    assert [x for p in parts for x in p["tokens"]] == pieces
    assert [x for p in parts for x in p["text_offset"]] == [sum(len(p) for p in pieces[:i]) for i in range(len(ids))]
    # the official client: an echoed prompt first, then the same text
    stream = openai_client(api_ring["url"]).completions.create(
        model=MODEL_NAME, prompt=PROMPT, max_tokens=MAX_TOKENS, temperature=0, stream=True, echo=True)
    texts = [c.choices[0].text for c in stream]
    assert texts[0] == PROMPT and "".join(texts) == PROMPT + tok.decode(ids)


def test_chat_logprobs_are_the_targets(api_ring: dict[str, Any], reference: dict[str, Any],
                                       target: dict[str, Any]) -> None:
    tok = target["tok"]
    ids, logp = target["greedy"](tok.encode_chat(QUESTION))
    assert ids == reference["ids"]  # transformers and FlowSpec's own engine agree
    client = openai_client(api_ring["url"])
    r = client.chat.completions.create(model=MODEL_NAME, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0,
                                       logprobs=True, top_logprobs=5)
    assert r.choices[0].message.content == reference["text"] and r.model == MODEL_NAME
    content = r.choices[0].logprobs.content
    assert [(e.token, bytes(e.bytes)) for e in content] == tok.pieces(ids)
    for i, (e, t) in enumerate(zip(content, ids)):
        assert abs(e.logprob - float(logp[i, t])) <= 1e-4, i
        tops = e.top_logprobs
        assert len(tops) == 5 and [x.logprob for x in tops] == sorted((x.logprob for x in tops), reverse=True)
        assert (tops[0].token, tops[0].logprob) == (e.token, e.logprob)  # greedy: the chosen one is the argmax
        assert [x.logprob for x in tops] == pytest.approx(logp[i].topk(5).values.tolist(), abs=1e-4)
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace").startswith(reference["text"])
    # streamed: the chunks' logprobs add up to the same; no usage key without include_usage
    status, text = call("POST", api_ring["url"] + "/v1/chat/completions", {
        "messages": QUESTION, "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, "logprobs": True})
    assert status == 200 and isinstance(text, str)
    chunks = sse(text)
    assert all("usage" not in c for c in chunks)
    streamed = [x for c in chunks if c["choices"][0]["logprobs"] for x in c["choices"][0]["logprobs"]["content"]]
    assert [(x["token"], x["top_logprobs"]) for x in streamed] == [(e.token, []) for e in content]
    assert [x["logprob"] for x in streamed] == pytest.approx([e.logprob for e in content], abs=1e-5)


def test_completion_requests_are_checked(api_ring: dict[str, Any]) -> None:
    ep = api_ring["url"] + "/v1/completions"
    cases = [
        ({"prompt": ["one", "two"]}, "prompt", "holds 2 prompts"),
        ({"prompt": ""}, "prompt", "prompt must be"),
        ({"prompt": [3, -1]}, "prompt", "prompt must be"),
        ({"prompt": [3, 10**9]}, "prompt", "prompt (token ids) must be"),
        ({"messages": QUESTION}, "prompt", "prompt is required"),
        ({"prompt": "x", "logprobs": 21}, "logprobs", "from 0 to 20"),
        ({"prompt": "x", "logprobs": True}, "logprobs", "logprobs: must be an integer"),
        ({"prompt": "x", "logprobs": 1, "echo": True}, "echo", "echo with logprobs"),
        ({"prompt": "x", "suffix": "!"}, "suffix", "suffix is not supported"),
        ({"prompt": "x", "best_of": 3}, "best_of", "best_of is not supported"),
        ({"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias", "logit_bias is not supported"),
        ({"prompt": "x", "n": 2}, "n", "n must be 1"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "only allowed with stream"),
        ({"prompt": "x", "verify": "last_stage", "logprobs": 0}, "verify", "verify: last_stage needs"),
        ({"prompt": "x" * 200000}, "prompt", "characters, more than can fit"),
    ]
    for body, param, needle in cases:
        status, got = call("POST", ep, body)
        assert status == 400 and isinstance(got, dict), (body, status, got)
        assert got["error"]["param"] == param and needle in got["error"]["message"], (body, got)
    status, got = call("POST", api_ring["url"] + "/v1/chat/completions",
                       {"messages": QUESTION, "top_logprobs": 2})
    assert status == 400 and got["error"]["param"] == "top_logprobs"  # type: ignore[index]
    status, got = call("POST", ep, {"prompt": "x", "model": "gpt-3.5-turbo-instruct"})
    assert status == 404 and "'gpt-3.5-turbo-instruct' is not served" in got["error"]["message"]  # type: ignore[index]


def test_completion_stop_ends_the_text_right_before_it(api_ring: dict[str, Any]) -> None:
    """A stop string that occurs in the greedy answer: the answer is the unstopped one cut
    right before its first occurrence (the earliest of several stop strings), finish_reason
    "stop", the decoding ended there; streamed, the same text and never the stop string."""
    client = openai_client(api_ring["url"])
    args = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    whole = client.completions.create(**args)
    full = whole.choices[0].text
    # two stop strings from the answer's middle and end (no partial character in them)
    k = next(i for i in range(len(full) // 3, len(full)) if "\ufffd" not in full[i:i + 3] and full[i:i + 3].strip())
    early, late = full[k:k + 3], full[-4:]
    cut = full.find(early)
    assert 0 < cut <= k and full.find(late) > cut, (full, early, late)
    r = client.completions.create(**args, stop=["never in it \x00", late, early])
    choice = r.choices[0]
    assert choice.text == full[:cut] and choice.finish_reason == "stop", (full, early, choice.text)
    assert early not in choice.text
    assert r.usage.completion_tokens < whole.usage.completion_tokens  # the ring stopped, not only the text
    chunks = list(client.completions.create(**args, stop=early, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == full[:cut]
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    # a stop string that never occurs changes nothing
    r2 = client.completions.create(**args, stop="never in it \x00")
    assert (r2.choices[0].text, r2.choices[0].finish_reason) == (full, whole.choices[0].finish_reason)


def test_completion_sampling_is_reproducible_with_a_seed(api_ring: dict[str, Any]) -> None:
    """temperature 0.8, top_p 0.9: the same seed gives the same text, streamed or not; other
    seeds give other texts (the seed is used, the answer is sampled, not greedy)."""
    client = openai_client(api_ring["url"])
    args = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": MAX_TOKENS}

    def sample(seed: int, stream: bool = False, **more: Any) -> str:
        kw = {**args, "temperature": 0.8, "top_p": 0.9, "seed": seed, **more}
        if stream:
            return "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
        return client.completions.create(**kw).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert sample(7, stream=True) == first
    greedy = client.completions.create(**args, temperature=0).choices[0].text
    others = {sample(seed) for seed in (8, 9, 10)}
    assert others - {first}, (first, others)
    assert ({first} | others) - {greedy}, greedy
    # a nucleus of one token is greedy decoding, whatever the temperature and seed
    assert sample(7, top_p=1e-9) == greedy


def _http(method: str, url: str, headers: dict[str, str]) -> tuple[int, Any]:
    """(status, headers) of one request (no body)."""
    req = urllib.request.Request(url, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.headers


def test_model_by_id_cors_and_access_log(api_ring: dict[str, Any]) -> None:
    url = api_ring["url"]
    status, m = call("GET", url + f"/v1/models/{MODEL_NAME}")
    assert status == 200 and m["id"] == MODEL_NAME and m["object"] == "model"  # type: ignore[index]
    status, m = call("GET", url + "/v1/models/llama-70b")
    assert status == 404 and "'llama-70b' is not served" in m["error"]["message"]  # type: ignore[index]
    # a browser's preflight needs no key; only the configured origin is allowed
    ask = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization, content-type"}
    status, h = _http("OPTIONS", url + "/v1/chat/completions", ask)
    assert status == 204 and h["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in h["Access-Control-Allow-Methods"] and h["Access-Control-Allow-Headers"] == ask[
        "Access-Control-Request-Headers"]
    status, _ = _http("OPTIONS", url + "/v1/chat/completions", dict(ask, Origin="https://evil.example"))
    assert status == 403
    status, h = _http("GET", url + "/v1/models", {"Origin": ORIGIN, "Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and h["Access-Control-Allow-Origin"] == ORIGIN
    status, h = _http("GET", url + "/v1/models", {"Origin": "https://evil.example",
                                                  "Authorization": f"Bearer {API_KEY}"})
    assert status == 200 and "Access-Control-Allow-Origin" not in h
    # api.access_log: one line per request with its status, tokens and duration
    status, body = call("POST", url + "/v1/completions", {"prompt": PROMPT, "max_tokens": 3})
    assert status == 200
    n = body["usage"]["prompt_tokens"]  # type: ignore[index]
    line = f"POST /v1/completions 200 tokens={n}+3 "
    log = wait_log(api_ring["ring"], "source", line)
    assert re.search(re.escape(line) + r"[0-9.]+ s$", log, re.M), log[-2000:]
    assert re.search(r"OPTIONS /v1/chat/completions 403 tokens=- [0-9.]+ s$", log, re.M)


def test_full_queue_answers_429_and_a_closed_stream_frees_the_ring(api_ring: dict[str, Any]) -> None:
    """queue_size is 1: with one request decoding and one waiting, the next gets 429."""
    import aiohttp

    url = api_ring["url"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    long_req = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 700,
                "strategy": "autoregressive"}

    async def go() -> tuple[int, dict[str, Any], int]:
        async with aiohttp.ClientSession(headers=headers) as s:
            first = await s.post(url + "/v1/chat/completions", json=dict(long_req, stream=True))
            assert first.status == 200
            await first.content.readline()  # the answer is streaming: the ring is busy
            waiting = asyncio.create_task(s.post(url + "/v1/chat/completions",
                                                 json=dict(long_req, max_tokens=5)))
            for _ in range(500):
                async with s.get(url + "/health") as h:
                    if (await h.json())["waiting"] == 1:
                        break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the second request never queued")
            async with s.post(url + "/v1/chat/completions", json=long_req) as third:
                status3, body3 = third.status, await third.json()
            first.close()  # the client leaves: its request is cancelled on the ring
            second = await asyncio.wait_for(waiting, 30)
            status2 = second.status
            second.release()
            return status3, body3, status2

    before = idle_samples(url)
    t0 = time.monotonic()
    status3, body3, status2 = asyncio.run(go())
    assert status3 == 429 and "queue is full" in body3["error"]["message"]
    assert status2 == 200
    assert time.monotonic() - t0 < 30
    after = samples(scrape(url)[1])
    for name, labels, moved in [("flowspec_requests_total", {"outcome": "cancelled"}, 1),  # the closed stream
                                ("flowspec_requests_total", {"outcome": "ok"}, 1),  # the one that waited
                                ("flowspec_requests_total", {"outcome": "error"}, 0),
                                ("flowspec_http_responses_total",
                                 {"endpoint": "/v1/chat/completions", "code": "429"}, 1),
                                ("flowspec_request_queue_time_seconds_count", {}, 1)]:
        assert value(after, name, **labels) - value(before, name, **labels) == moved, (name, labels)


def test_dead_ring_answers_503(api_ring: dict[str, Any]) -> None:
    """Runs last: stops a stage; the API stays up and answers 503 with the reason."""
    url = api_ring["url"]
    stage2 = next(p for p in api_ring["ring"].procs if p.name == "stage2")
    os.kill(stage2.proc.pid, signal.SIGTERM)
    stage2.proc.wait(10)
    deadline = time.monotonic() + 15
    while True:
        status, h = call("GET", url + "/health")
        if status == 503 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert status == 503 and isinstance(h, dict) and h["formed"] is False and h["error"]
    status, body = call("POST", url + "/v1/chat/completions", {"messages": QUESTION, "max_tokens": 3})
    assert status == 503 and "ring" in body["error"]["message"]  # type: ignore[index]
    status, body = call("POST", url + "/v1/chat/completions", {"messages": "oops"})
    assert status == 400  # validation still answers
    assert call("GET", url + "/v1/models")[0] == 200
