"""A client's generation request, checked before anything reaches the ring.

:func:`check_request` validates a request (the HTTP API's and the binary clients' alike)
without tokenizing: its prompt (messages, text or token ids; sizes are bounded first, so a
huge prompt is refused at once instead of occupying the source) and its decoding settings,
which :func:`~flowspec.speculative.request.check_decode` reads over the topology's defaults, capped
by what this ring allows (max_context, the vocabulary). It returns a :class:`Plan` whose
``encode()`` (run off the event loop by the source) tokenizes, and :func:`finish_request`
checks the token budget against ``max_context``. Every problem is a :class:`RequestError`
that names its field.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ..config import Topology
from ..errors import RequestError
from ..model.tokenizer import Tokenizer
from ..speculative.bounds import FieldError, text_problem
from ..speculative.params import SamplingParams, TreeParams, head_at_last_stage
from ..speculative.request import DecodeRequest, check_decode
from ..speculative.schedules import SCHEDULES

__all__ = ["GenRequest", "Plan", "ROLES", "check_request", "finish_request", "text_problem"]

ROLES = ("system", "user", "assistant")


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
    verify: str = "source"  # where the target's tokens are chosen: "source" | "last_stage" | "auto" (VERIFY_AT)
    logprobs: int | None = None  # None: none; n: the target's logprob of each token and its n best alternatives


@dataclass
class Plan:
    """A checked request whose prompt is not tokenized yet."""

    encode: Callable[[], list[int]]  # the prompt's token ids (slow for long prompts: run it off the loop)
    request: DecodeRequest  # its decoding settings, checked, the topology's defaults filled in
    sampling: SamplingParams  # its sampling settings, with a random seed drawn when it gave none
    trace: bool  # the profiler's trace flag
    prompt_field: str = "messages"  # the field the prompt came from (an error about its length names it)

    @property
    def logprobs(self) -> int | None:
        """None, or how many alternatives each token's logprob comes with."""
        return self.request.logprobs


def _text(value: Any, name: str) -> str:
    problem = text_problem(value)
    if problem:
        raise RequestError(f"{name} {problem}", name.split("[")[0].split(".")[0])
    return str(value)


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
    try:
        req = check_decode(meta, d.request, caps={"max_new_tokens": (ctx, "model.max_context"),
                                                  "top_k": (vocab, "the vocabulary")})
        if head_at_last_stage(req.verify) and not d.lm_head_at_last_stage:
            raise RequestError(f"verify: {req.verify} needs decoding.verify: last_stage or auto in the topology "
                               "(then the last stage loads the lm_head); restart the ring with it, or verify at "
                               "the source", "verify")
    except FieldError as e:
        raise RequestError(str(e), e.field.split("[")[0]) from None
    sampling = req.sampling(int.from_bytes(os.urandom(4), "little"))
    return Plan(encode, req, sampling, meta.get("trace") is True, prompt_field)


def finish_request(topo: Topology, plan: Plan, ids: list[int], tree_defaults: TreeParams | None = None
                   ) -> GenRequest:
    """The request with its tokens, once they fit max_context with the new tokens and the tree.
    tree_defaults: the topology's tree with its "auto" settings chosen for the ring (the
    source's tuning); without it they take TreeParams' defaults."""
    ctx = topo.model.max_context
    r = plan.request
    tree = dataclasses.replace(tree_defaults or topo.decoding.tree.params(), **r.tree)
    reserve = SCHEDULES[r.strategy].cache_reserve(tree)
    if len(ids) + r.max_new_tokens + reserve > ctx:
        raise RequestError(
            f"the prompt has {len(ids)} tokens; with {r.max_new_tokens} new tokens and room for the draft tree "
            f"({reserve}) that exceeds max_context {ctx}; shorten the prompt, lower max_tokens, or raise "
            "model.max_context in the topology", plan.prompt_field)
    return GenRequest(ids, r.max_new_tokens, r.strategy, plan.sampling, tree, list(r.stop), plan.trace,
                      r.verify, r.logprobs)
