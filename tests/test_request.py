"""A decoding request is defined and checked once (flowspec/speculative/request.py): every front end
(the topology's decoding section, the HTTP API, the binary clients' requests, the chat) says
the same bound for the same field, in the same words, under its own name for the field."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from flowspec.api_request import ApiError, parse_chat, parse_completion
from flowspec.chat.session import ChatOptions, ChatSession
from flowspec.config import Topology, TopologyError
from flowspec.errors import RequestError
from flowspec.speculative.bounds import FieldError, Integer, rule_of
from flowspec.speculative.params import SEED_MAX, SamplingParams, TreeParams
from flowspec.speculative.request import DecodeRequest, check_decode, check_field

MSGS = [{"role": "user", "content": "x"}]


class _Models:
    model_id = "m"

    @staticmethod
    def knows_model(name: str) -> bool:
        return name == "m"


def _topology(decoding: dict[str, Any] | None = None) -> Topology:
    return Topology.from_dict({
        "cluster": "c", "model": {"target": "default", "num_layers": 30, "max_context": 512},
        "nodes": [{"name": "src", "host": "127.0.0.1", "port": 7000, "role": "source"},
                  {"name": "s1", "host": "127.0.0.1", "port": 7001, "role": "stage", "layers": "auto"}],
        **({"decoding": decoding} if decoding is not None else {})})


class _View:
    """The chat's view, recording what it was asked to show."""

    def __init__(self) -> None:
        self.said: list[tuple[str, tuple[Any, ...]]] = []

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.said.append((name, args))


# ---------------------------------------------------------------------- one bound, every front end
@pytest.mark.parametrize("field,bad,reason", [
    ("temperature", 2.5, "must be a number in [0, 2], not 2.5"),
    ("top_p", 0, "must be a number in (0, 1], not 0"),
    ("top_k", -1, "must be an integer >= 0, not -1"),
    ("seed", 2 ** 64, f"must be an integer from {-SEED_MAX - 1} to {SEED_MAX}, or null (random), not {2 ** 64}"),
    ("strategy", "flowspek", "unknown strategy 'flowspek' (did you mean 'flowspec'?); allowed: autoregressive, "
                             "chunked, pipedec, flowspec"),
    ("verify", "stage", "unknown verify 'stage' (did you mean 'last_stage'?); allowed: source, last_stage, auto"),
])
def test_every_front_end_refuses_a_value_with_the_same_words(default_model_dir: Path, field: str, bad: Any,
                                                            reason: str) -> None:
    from flowspec.model.tokenizer import Tokenizer
    from flowspec.runtime.requests import check_request

    with pytest.raises(FieldError) as fe:
        check_decode({field: bad})
    assert (fe.value.field, fe.value.reason) == (field, reason)
    with pytest.raises(TopologyError) as te:  # the topology: decoding.<field>
        _topology({field: bad})
    assert f"decoding.{field}: {reason}" in str(te.value)
    for parse, body in ((parse_chat, {"messages": MSGS}), (parse_completion, {"prompt": "x"})):  # the HTTP API
        with pytest.raises(ApiError) as ae:
            parse(dict(body, **{field: bad}), _Models())  # type: ignore[operator]
        assert (ae.value.status, ae.value.param, ae.value.message) == (400, field, f"{field}: {reason}")
    with pytest.raises(RequestError) as re_:  # the binary clients' requests, at the source
        check_request(_topology(), Tokenizer(default_model_dir), 49152, {"prompt": "x", field: bad})
    assert (re_.value.param, str(re_.value)) == (field, f"{field}: {reason}")


def test_the_chat_and_the_api_say_the_temperature_bound_of_a_request() -> None:
    view = _View()
    chat = ChatSession(None, ChatOptions(), view, None)  # type: ignore[arg-type]
    for arg in ("2.5", "hot", "nan", "-0.1"):
        assert chat.command(f"/temperature {arg}") is False
        assert view.said[-1] == ("bad_temperature", (arg, "a number in [0, 2]")), arg
    assert chat.opts.temperature is None
    chat.command("/temperature 2")
    assert chat.opts.temperature == 2.0 and view.said[-1] == ("temperature_set", (2.0,))
    chat.command("/strategy magic")
    assert chat.opts.strategy is None and view.said[-1][0] == "unknown_strategy"
    chat.command("/strategy pipedec")
    assert chat.opts.strategy == "pipedec"
    call = parse_chat({"messages": MSGS, "temperature": 2}, _Models())  # type: ignore[arg-type]
    assert call.meta["temperature"] == 2.0


def test_the_api_names_a_field_as_the_client_sent_it() -> None:
    cases = [(parse_chat, {"messages": MSGS, "max_completion_tokens": 0}, "max_completion_tokens",
              "max_completion_tokens: must be an integer >= 1, not 0"),
             (parse_chat, {"messages": MSGS, "max_tokens": 2.0}, "max_tokens", "max_tokens: must be an integer >= 1, "
                                                                                "not 2.0"),
             (parse_chat, {"messages": MSGS, "logprobs": True, "top_logprobs": 21}, "top_logprobs",
              "top_logprobs: must be an integer from 0 to 20 (the most likely alternatives to report with each token), "
              "not 21"),
             (parse_completion, {"prompt": "x", "logprobs": 21}, "logprobs", "logprobs: must be an integer from 0 to "
                                                                             "20"),
             (parse_completion, {"prompt": "x", "stop": ["ok", "a\ud800"]}, "stop",
              "stop[1]: is not valid Unicode text (a lone surrogate '\\ud800' at character 1)")]
    for parse, body, param, message in cases:
        with pytest.raises(ApiError) as e:
            parse(body, _Models())  # type: ignore[operator]
        assert e.value.param == param and e.value.message.startswith(message), (body, e.value.message)


# ------------------------------------------------------------------------------- the checker
def test_every_field_declares_its_rule_and_defaults_agree_with_the_topology() -> None:
    for cls in (DecodeRequest, SamplingParams, TreeParams):
        for f in dataclasses.fields(cls):
            assert "allows" in f.metadata, (cls.__name__, f.name)
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if default is not None and default not in ({}, ()):
                assert rule_of(cls, f.name).read(default) == default, (cls.__name__, f.name)  # defaults are allowed
    for name in ("temperature", "top_p", "top_k"):  # a request's sampling fields are SamplingParams' own
        assert rule_of(DecodeRequest, name) is rule_of(SamplingParams, name)
    d = _topology().decoding
    assert d.request == DecodeRequest()
    t = _topology().decoding.tree
    assert (t.depth, t.top_k, t.total) == dataclasses.astuple(TreeParams())[:3]
    assert t.auto == ("segment", "in_flight", "expand")  # chosen for the ring by the source (speculative/tuning.py)
    assert t.params() == TreeParams()


def test_check_decode_reads_defaults_nulls_caps_and_the_tree() -> None:
    base = DecodeRequest(strategy="chunked", temperature=0.5, seed=7, verify="last_stage")
    assert check_decode({"temperature": None, "prompt": "ignored"}, base) == base  # null: not given
    with pytest.raises(FieldError, match=r"^temperature: must be a number in \[0, 2\], not null$"):
        check_decode({"temperature": None}, null_is_default=False)
    assert check_decode({"seed": None}, base, null_is_default=False).seed is None  # seed: null = random
    r = check_decode({"stop": "\n", "tree": {"in_flight": 6}, "top_k": 3, "max_new_tokens": 9})
    assert (r.stop, dict(r.tree), r.top_k, r.max_new_tokens) == (("\n",), {"in_flight": 6}, 3, 9)
    assert r.sampling(99) == SamplingParams(0.0, 1.0, 3, 99) and base.sampling(99).seed == 7
    caps = {"max_new_tokens": (512, "model.max_context"), "top_k": (100, "the vocabulary")}
    for data, message in [
        ({"max_new_tokens": 513}, "max_new_tokens: must be an integer from 1 to 512 (model.max_context), not 513"),
        ({"top_k": 101}, "top_k: must be an integer from 0 to 100 (the vocabulary), not 101"),
    ]:
        with pytest.raises(FieldError) as e:
            check_decode(data, caps=caps)
        assert str(e.value) == message
    with pytest.raises(FieldError, match=r"^max_new_tokens: must be an integer from 1 to 64"):  # caps hold for defaults
        check_decode({}, caps={"max_new_tokens": (64, "model.max_context")})
    for data, field, start in [
        ({"tree": {"depth": 0}}, "tree.depth", "must be an integer from 1 to 32, not 0"),
        ({"tree": {"in_flihgt": 2}}, "tree", "unknown field 'in_flihgt' (did you mean 'in_flight'?)"),
        ({"tree": [1]}, "tree", "must be a mapping with some of depth, top_k"),
        ({"stop": ["a", ""]}, "stop", "must be a string or a list of up to 4 non-empty strings"),
        ({"stop": ["a"] * 5}, "stop", "must be a string or a list of up to 4"),
        ({"max_new_tokens": 5.0}, "max_new_tokens", "must be an integer >= 1, not 5.0"),  # integers are integers
        ({"top_k": True}, "top_k", "must be an integer >= 0, not True"),
        ({"temperature": float("inf")}, "temperature", "must be a number in [0, 2], not inf"),
    ]:
        with pytest.raises(FieldError) as e:
            check_decode(data)
        assert e.value.field == field and e.value.reason.startswith(start), (data, str(e.value))
    together = check_decode({"logprobs": 0}, base)  # verify: last_stage from the defaults: the last stage
    assert together.logprobs == 0 and together.verify == "last_stage"  # returns the logprobs with the tokens
    assert check_field("temperature", 2) == 2.0
    assert Integer(1, 9).capped(20, "x") == Integer(1, 9)  # a cap above the bound changes nothing


@pytest.mark.parametrize("argv,message", [
    (["generate", "--prompt", "hi", "--temperature", "3"], "--temperature: must be a number in [0, 2], not 3.0"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "--top-p: must be a number in (0, 1], not 0.0"),
    (["generate", "--prompt", "hi", "--seed", str(2 ** 63)], "--seed: must be an integer from"),
    (["chat", "--url", "http://127.0.0.1:9", "--temperature", "2.5"], "--temperature: must be a number in [0, 2]"),
    (["chat", "--url", "http://127.0.0.1:9", "--max-tokens", "0"], "--max-tokens: must be an integer >= 1, not 0"),
    (["bench", "--topology", "x.yaml", "--temperature", "-1"], "--temperature: must be a number in [0, 2], not -1.0"),
])
def test_command_lines_say_a_requests_bounds_before_starting(argv: list[str], message: str) -> None:
    from flowspec.cli import build_parser
    from flowspec.errors import UsageError

    args = build_parser().parse_args(argv)
    with pytest.raises(UsageError) as e:
        args.func(args)
    assert str(e.value).startswith(message), str(e.value)
