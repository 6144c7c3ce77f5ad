"""The OpenAI generation requests (chat, text completions): every field checked, translated for the source.

``parse_chat`` and ``parse_completion`` turn a request body into the fields
``SourceNode.prepare`` takes, or raise ApiError with the HTTP status and the name of the
bad field; the fields both routes have are checked by the same code. The decoding fields
are translated to a :class:`~flowspec.speculative.request.DecodeRequest`'s (``max_tokens`` ->
``max_new_tokens``, ``top_logprobs`` -> ``logprobs``) and checked by its one checker; an
error names the field as the client sent it. Fields FlowSpec cannot honour are refused
unless they carry their neutral value; nothing is silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Protocol

from .speculative.bounds import FieldError
from .speculative.request import check_decode, check_field

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}

# OpenAI fields FlowSpec cannot honour, with the values that ask for nothing (sent by many
# clients as defaults): any other value is answered 400 naming the field, never ignored
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": (None, [], {}), "functions": (None, [], {}), "tool_choice": (None, "none"),
    "function_call": (None, "none"), "parallel_tool_calls": (None, True, False),
    "audio": (None,), "prediction": (None,), "modalities": (None, ["text"]),
    "response_format": (None, {"type": "text"}), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "repetition_penalty": (None, 1),
    "best_of": (None, 1), "suffix": (None, ""),
}
# the decoding fields both routes take under a DecodeRequest's own names
_SHARED = ("temperature", "top_p", "top_k", "seed", "stop", "strategy", "verify")
COMPLETION_MAX_TOKENS = 16  # a text completion's max_tokens when the request has none (OpenAI's default)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "service_unavailable"}


class ApiError(Exception):
    """An HTTP error answered as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.partial: dict[str, Any] | None = None  # a failed answer's text so far
        self.retry_after: int | None = None  # seconds a client should wait before trying again (429)


class ModelNames(Protocol):
    """What the request checks need to know of the server: the model it serves."""

    model_id: str

    def knows_model(self, name: str) -> bool: ...


@dataclass
class GenCall:
    """A validated generation request: a chat completion or a text completion."""

    meta: dict[str, Any]  # the request for SourceNode.prepare
    stream: bool  # answer with server-sent events
    include_usage: bool  # stream: every chunk has "usage": null, and a last chunk (no choices) the usage
    stop: list[str]  # stop strings (the streamed text never shows one)
    kind: str = "chat"  # "chat" (chat.completion objects) | "text" (text_completion objects)
    logprobs: int | None = None  # None: no logprobs; n: each token's logprob with its n most likely alternatives
    echo: bool = False  # text completions: the answer starts with the prompt's text


def _flag(body: dict[str, Any], name: str) -> bool | None:
    """A true/false field of the body (None when absent); ApiError(400) names it otherwise."""
    v = body.get(name)
    if v is not None and not isinstance(v, bool):
        raise ApiError(400, f"{name} must be true or false, not {_short(v)}", param=name)
    return v


def parse_chat(body: Any, ctx: ModelNames) -> GenCall:
    """Check an OpenAI chat completion body; ApiError(400/404) names the bad field."""
    body = _common(body, ctx)
    meta: dict[str, Any] = {"messages": _messages(body.get("messages"))}
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    want = _flag(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        _checked("logprobs", top, "top_logprobs")
    if top and not want:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    logprobs = (top if top is not None else 0) if want else None
    return _finish(body, meta, "chat", {"max_new_tokens": body.get(name), "logprobs": logprobs},
                   {"max_new_tokens": name, "logprobs": "top_logprobs"})


def parse_completion(body: Any, ctx: ModelNames) -> GenCall:
    """Check an OpenAI (legacy) text completion body: one prompt, as text or token ids, sent
    as it is (no chat template); ApiError(400/404) names the bad field."""
    body = _common(body, ctx)
    if body.get("max_completion_tokens") is not None:
        raise ApiError(400, "max_completion_tokens is a chat completions field; text completions take max_tokens",
                       param="max_completion_tokens")
    meta = _prompt(body.get("prompt"))
    echo = _flag(body, "echo")
    n = body.get("logprobs")
    if n is not None:
        _checked("logprobs", n, "logprobs")
    if echo and n is not None:
        raise ApiError(400, "echo with logprobs is not supported: FlowSpec reports the target's logprobs of the "
                       "generated tokens, not of the prompt; leave out echo or logprobs", param="echo")
    mt = body.get("max_tokens")
    call = _finish(body, meta, "text", {"max_new_tokens": COMPLETION_MAX_TOKENS if mt is None else mt,
                                        "logprobs": n}, {"max_new_tokens": "max_tokens"})
    call.echo = bool(echo)
    return call


def _common(body: Any, ctx: ModelNames) -> dict[str, Any]:
    """The checks every generation route makes first: a JSON object, the model, the fields
    FlowSpec cannot honour, n."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise ApiError(400, f"model must be a string, not {_short(model)}", param="model")
        if not ctx.knows_model(model):
            raise ApiError(404, f"the model {model!r} is not served here; this server serves "
                           f"{ctx.model_id!r} (see GET /v1/models)", "model_not_found", "model")
    for k, neutral in UNSUPPORTED.items():
        v = body.get(k)
        if not any(v == n and (type(v) is bool) == (type(n) is bool) for n in neutral):  # 0 is not false
            raise ApiError(400, f"{k} is not supported by FlowSpec (got {_short(v)}); leave it out"
                           + (f" or send {_short(neutral[1])}" if len(neutral) > 1 else ""), param=k)
    n = body.get("n")
    if n is not None and n != 1:
        raise ApiError(400, f"n must be 1 (one answer per request), not {_short(n)}", param="n")
    return body


def _checked(name: str, value: Any, param: str) -> Any:
    """One decoding field checked alone; ApiError(400) names it `param`, as the client sent it."""
    try:
        return check_field(name, value)
    except FieldError as e:
        raise ApiError(400, f"{param}: {e.reason}", param=param) from None


def _finish(body: dict[str, Any], meta: dict[str, Any], kind: str, own: dict[str, Any],
            params: dict[str, str]) -> GenCall:
    """The decoding fields every generation route shares (sampling, stop, FlowSpec's strategy
    and verify), with `own` (the route's translated max tokens and logprobs; `params` names
    them as the client did), checked as one DecodeRequest; then the streaming fields."""
    given = {k: body.get(k) for k in _SHARED if body.get(k) is not None}
    given.update({k: v for k, v in own.items() if v is not None})
    try:
        req = check_decode(given)
    except FieldError as e:
        top = e.field.split("[")[0].split(".")[0]  # "stop[1]" is in "stop"
        param = params.get(top, top)
        raise ApiError(400, f"{param}{e.field[len(top):]}: {e.reason}", param=param) from None
    for k in given:  # the checked values, of the fields the request gave
        v = getattr(req, k)
        if k != "stop" or v:
            meta[k] = list(v) if k == "stop" else v
    stop = list(req.stop)
    logprobs = req.logprobs
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, not {_short(stream)}", param="stream")
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise ApiError(400, "stream_options must be an object", param="stream_options")
    if opts and not stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
    usage = (opts or {}).get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise ApiError(400, f"stream_options.include_usage must be true or false, not {_short(usage)}",
                       param="stream_options")
    return GenCall(meta, stream, bool(usage), stop, kind, logprobs)


def _prompt(v: Any) -> dict[str, Any]:
    """One prompt: text (sent raw, without the chat template) or token ids."""
    what = "a non-empty string or a non-empty list of token ids"
    if v is None:
        raise ApiError(400, f"prompt is required: {what}", param="prompt")
    if isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
        if len(v) > 1:
            raise ApiError(400, f"prompt holds {len(v)} prompts; FlowSpec answers one prompt per request: send "
                           "each as a request of its own", param="prompt")
        v = v[0]  # a batch of one
    if isinstance(v, str) and v:
        return {"prompt": v, "raw": True}
    if isinstance(v, list) and v and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v):
        return {"prompt_ids": list(v)}
    raise ApiError(400, f"prompt must be {what}, not {_short(v)}", param="prompt")


def _messages(msgs: Any) -> list[dict[str, str]]:
    if msgs is None:
        raise ApiError(400, "messages is required: a non-empty list of {role, content}", param="messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "messages must be a non-empty list of {role, content}", param="messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with role and content", param="messages")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, not {_short(role)}",
                           param="messages")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            texts = []
            for p in content:
                if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                   param="messages")
                texts.append(p["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string, not {_short(content)}",
                           param="messages")
        out.append({"role": ROLES[role], "content": content})
    return out


def _short(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
