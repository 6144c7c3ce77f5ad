"""A client's generation request, checked before anything reaches the ring.

:func:`check_request` validates every field of a request (the HTTP API's and the binary
clients' alike) without tokenizing: sizes are bounded first, so a huge prompt is refused
at once instead of occupying the source. It returns a :class:`Plan` whose ``encode()``
(run off the event loop by the source) tokenizes, and :func:`finish_request` checks the
token budget against ``max_context``. Every problem is a :class:`RequestError` that
names its field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import Topology
from ..errors import RequestError
from ..model.tokenizer import Tokenizer
from ..spec.logprobs import MAX_TOP_LOGPROBS
from ..spec.sampling import SEED_MAX, SEED_MIN, SamplingParams
from ..spec.params import STRATEGIES, TREE_LIMITS, VERIFY_AT, TreeParams

ROLES = ("system", "user", "assistant")
MAX_STOPS = 4  # stop strings per request


@dataclass
class GenRequest:
    """One generation request, after validation."""

    prompt_ids: list[int]  # tokens of the templated prompt
    max_new_tokens: int  # upper bound of generated tokens
    strategy: str  # one of STRATEGIES
    sampling: SamplingParams  # temperature, top-p, top-k, seed
    tree: TreeParams  # draft tree shape
    stop: list[str] = field(default_factory=list)  # strings that end the answer (not included)
    trace: bool = False  # record every segment's timings into stats["trace"] (the profiler)
    verify: str = "source"  # where the target's tokens are chosen: "source" | "last_stage" (VERIFY_AT)
    logprobs: int | None = None  # None: none; n: the target's logprob of each token and its n best alternatives


@dataclass
class Plan:
    """A checked request whose prompt is not tokenized yet."""

    encode: Callable[[], list[int]]  # the prompt's token ids (slow for long prompts: run it off the loop)
    max_new_tokens: int  # checked against max_context
    strategy: str  # one of STRATEGIES
    sampling: SamplingParams  # checked sampling settings
    stop: list[str]  # stop strings
    trace: bool  # the profiler's trace flag
    tree: dict[str, int] = field(default_factory=dict)  # this request's changes to the topology's tree
    verify: str = "source"  # where its tokens are chosen (checked against the topology)
    logprobs: int | None = None  # None, or how many alternatives each token's logprob comes with
    prompt_field: str = "messages"  # the field the prompt came from (an error about its length names it)


def text_problem(text: str) -> str | None:
    """Why a string cannot be tokenized, or None (lone surrogates come from JSON escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"is not valid Unicode text (a lone surrogate {text[e.start]!r} at character {e.start})"
    return None


def _text(value: Any, name: str) -> str:
    problem = text_problem(value)
    if problem:
        raise RequestError(f"{name} {problem}", name.split("[")[0].split(".")[0])
    return str(value)


def _num(meta: dict[str, Any], key: str, default: Any, kind: type, lo: float | None = None,
         hi: float | None = None) -> Any:
    v = meta.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()) \
            or (isinstance(v, float) and v != v):
        raise RequestError(f"{key} must be {'an integer' if kind is int else 'a number'}, not {v!r}", key)
    v = kind(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        bounds = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise RequestError(f"{key} must be {'within ' if hi is not None else ''}{bounds}, not {v}", key)
    return v


def check_request(topo: Topology, tok: Tokenizer, vocab: int, meta: dict[str, Any]) -> Plan:
    """Validate every field of a request; nothing is tokenized yet."""
    d = topo.decoding
    ctx = topo.model.max_context
    max_chars = ctx * tok.max_token_chars  # no text longer than this can fit the context

    def bounded(chars: int, what: str, param: str) -> None:
        if chars > max_chars:
            raise RequestError(
                f"{what} has {chars} characters, more than can fit max_context {ctx} (a token covers at most "
                f"{tok.max_token_chars} characters); shorten it, or raise model.max_context in the topology", param)

    encode: Callable[[], list[int]]
    prompt_field = "messages"
    if meta.get("messages") is not None:
        msgs = meta["messages"]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ROLES for m in msgs):
            raise RequestError("messages must be a non-empty list of {role: system|user|assistant, content: string}",
                               "messages")
        clean = [{"role": m["role"], "content": _text(m["content"], f"messages[{i}].content")}
                 for i, m in enumerate(msgs)]
        bounded(sum(len(m["content"]) for m in clean), "the conversation", "messages")
        encode = lambda: tok.encode_chat(clean)  # noqa: E731
    elif meta.get("prompt_ids") is not None:
        ids = meta["prompt_ids"]
        if not isinstance(ids, list) or not ids or len(ids) > ctx or not all(
                isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in ids):
            raise RequestError(f"prompt_ids must be a non-empty list of at most {ctx} token ids in [0, {vocab})",
                               "prompt_ids")
        encode = lambda: list(ids)  # noqa: E731
        prompt_field = "prompt_ids"
    elif isinstance(meta.get("prompt"), str) and meta["prompt"]:
        prompt, raw = _text(meta["prompt"], "prompt"), bool(meta.get("raw"))
        bounded(len(prompt), "the prompt", "prompt")
        encode = lambda: tok.encode_prompt(prompt, raw=raw)  # noqa: E731
        prompt_field = "prompt"
    else:
        raise RequestError("the request needs a non-empty prompt or messages", "messages")
    max_new = _num(meta, "max_new_tokens", d.max_new_tokens, int, 1, ctx)
    strategy = meta.get("strategy") or d.strategy
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise RequestError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}", "strategy")
    seed = meta.get("seed", d.seed)
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little")
    sampling = SamplingParams(_num(meta, "temperature", d.temperature, float, 0.0, 100.0),
                              _num(meta, "top_p", d.top_p, float, 1e-9, 1.0),
                              _num(meta, "top_k", d.top_k, int, 0, vocab),
                              _num(meta, "seed", seed, int, SEED_MIN, SEED_MAX))
    stop = meta.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop) or len(stop) > MAX_STOPS:
        raise RequestError(f"stop must be a string or a list of up to {MAX_STOPS} non-empty strings", "stop")
    stop = [_text(x, f"stop[{i}]") for i, x in enumerate(stop)]
    verify = meta.get("verify") or d.verify
    if verify not in VERIFY_AT:
        raise RequestError(f"unknown verify {verify!r}; choose one of {', '.join(VERIFY_AT)}", "verify")
    if verify == "last_stage" and d.verify != "last_stage":
        raise RequestError("verify: last_stage needs decoding.verify: last_stage in the topology (then the "
                           "last stage loads the lm_head); restart the ring with it, or verify at the source",
                           "verify")
    return Plan(encode, max_new, strategy, sampling, stop, meta.get("trace") is True, _tree(meta.get("tree")),
                verify, _logprobs(meta.get("logprobs"), verify), prompt_field)


def _logprobs(v: Any, verify: str) -> int | None:
    """How many alternatives a request wants with each token's logprob (None: no logprobs)."""
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_TOP_LOGPROBS:
        raise RequestError(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS} (the most likely "
                           f"alternatives to report with each token), not {v!r}", "logprobs")
    if verify == "last_stage":
        raise RequestError("logprobs need the target's logits at the source, but this request verifies at the "
                           "last stage (decoding.verify: last_stage), which returns only token ids; send "
                           "\"verify\": \"source\" with logprobs, or leave logprobs out", "logprobs")
    return v


def _tree(v: Any) -> dict[str, int]:
    """A request's own draft-tree settings (``{"in_flight": 6, "segment": 16}``), checked."""
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise RequestError(f"tree must be an object with some of {', '.join(TREE_LIMITS)}, not {v!r}", "tree")
    bad = [k for k in v if k not in TREE_LIMITS]
    if bad:
        raise RequestError(f"tree: unknown field {bad[0]!r}; choose from {', '.join(TREE_LIMITS)}", "tree")
    return {k: _num({f"tree.{k}": x}, f"tree.{k}", None, int, *TREE_LIMITS[k]) for k, x in v.items()}


def finish_request(topo: Topology, plan: Plan, ids: list[int]) -> GenRequest:
    """The request with its tokens, once they fit max_context with the new tokens and the tree."""
    ctx = topo.model.max_context
    t = topo.decoding.tree
    tree = dataclasses.replace(TreeParams(t.depth, t.top_k, t.total, t.segment, t.expand, topo.in_flight),
                               **plan.tree)
    in_flight = tree.in_flight
    reserve = tree.total + tree.segment * (in_flight + 1) if plan.strategy != "autoregressive" else 2
    if len(ids) + plan.max_new_tokens + reserve > ctx:
        raise RequestError(
            f"the prompt has {len(ids)} tokens; with {plan.max_new_tokens} new tokens and room for the draft tree "
            f"({reserve}) that exceeds max_context {ctx}; shorten the prompt, lower max_tokens, or raise "
            "model.max_context in the topology", plan.prompt_field)
    return GenRequest(ids, plan.max_new_tokens, plan.strategy, plan.sampling, tree, plan.stop, plan.trace,
                      plan.verify, plan.logprobs)
