"""The source node's HTTP API: OpenAI-compatible chat and text completions, models, health and metrics.

Endpoints (``api`` section of the topology: host, port, optional Bearer key, queue size):

* ``POST /v1/chat/completions``: the OpenAI schema (``messages``, ``max_tokens`` or
  ``max_completion_tokens``, ``temperature``, ``top_p``, ``seed``, ``stop``, ``stream``
  with server-sent events ending in ``data: [DONE]``, ``stream_options.include_usage``,
  ``logprobs``/``top_logprobs``), plus the non-standard ``top_k``, ``strategy`` and ``verify``.
  Responses and stream chunks carry an extra ``flowspec`` object with the decoding
  statistics; standard clients ignore it.
* ``POST /v1/completions``: one raw-text prompt (text or token ids, no chat template),
  ``echo``, legacy ``logprobs: n``; the same other fields. Objects are shaped in api_format.py.
* ``GET /v1/models``, ``GET /v1/models/{id}``: the one model served, by its short id
  (``model.name``, default from ``model.target``); every response's ``model`` is that id.
* ``GET /health``: the ring as it is now (api_health.py: the nodes in ring order, a spare in a
  dead stage's place, the spares waiting); 200 when the ring is formed, else 503.
* ``GET /metrics``: Prometheus metrics (metrics.py: latency histograms, speculative-decoding,
  token, request, stage and link counters).

Up to ``decoding.max_active`` requests decode on the ring at once; more wait in the
source's queue, and one that finds ``api.queue_size`` requests waiting is answered 429.
Request bodies are checked in api_request.py. Every failure is a JSON
``{"error": {"message", "type", "code"}}`` with a 4xx/5xx status; nothing a client sends
stops the server. With a key configured, every endpoint but ``/health`` needs
``Authorization: Bearer KEY``; ``/health`` answers without it, but then only
``{"status": ...}`` (node addresses, layers and errors are for key holders). CORS
(``api.cors_origins``) and the access log (``api.access_log``) are in api_http.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from aiohttp import web

from .api_format import Reply
from .api_health import ring_health
from .api_http import TOKENS, Middleware, install_cors, log_access
from .api_request import ERROR_TYPES, ApiError, GenCall, parse_chat, parse_completion
from .errors import FlowSpecError, RequestError, RingError
from .metrics import ApiMetrics
from .runtime.decode import DoneEvent, TokensEvent
from .speculative.logprobs import TokenLogprob

if TYPE_CHECKING:
    from .config import Topology
    from .runtime.source_node import SourceNode

log = logging.getLogger(__name__)

MAX_BODY = 1 << 20  # bytes a request body may have


@dataclass
class ApiContext:
    """Everything a handler needs."""

    node: "SourceNode"  # the source node that serves the requests
    topo: "Topology"  # its topology (api section, model name)
    key: str | None  # the Bearer key, or None when the API is open
    started: float = field(default_factory=time.time)  # unix time the API started
    metrics: ApiMetrics = field(init=False)  # GET /metrics (metrics.py)

    def __post_init__(self) -> None:
        self.metrics = ApiMetrics(self.node, self.model_id, self.topo.decoding.strategy)

    @property
    def model_id(self) -> str:
        """The served model's short id (model.name, or derived from model.target)."""
        return self.topo.model.served_name

    def knows_model(self, name: str) -> bool:
        """Whether a request's `model` names the served model (its id, or model.target as written)."""
        return name in self.topo.model.aliases


CTX = web.AppKey("flowspec", ApiContext)


# ----------------------------------------------------------------------------- serving
async def start_api(node: "SourceNode", topo: "Topology") -> web.AppRunner:
    """Start the API on the topology's api address; FlowSpecError when it cannot serve
    (no key where one is configured, the port taken): a source never runs with an API
    that silently is not there."""
    key = topo.api_key()  # TopologyError names the variable or file
    app = make_app(node, topo, key)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=2.0)
    await runner.setup()
    host, port = topo.api.host, topo.api.port
    try:
        await web.TCPSite(runner, host, port, reuse_address=True).start()
    except OSError as e:
        await runner.cleanup()
        raise FlowSpecError(f"the HTTP API cannot listen on {host}:{port}: {e.strerror or e} (is another ring or "
                            f"program using that port? stop it, or change api.port in {topo.origin})") from None
    log.info("%s: HTTP API on http://%s:%d/v1 (%s)", node.name, host, port,
             "Bearer key required" if key else "no key")
    return runner


def make_app(node: "SourceNode", topo: "Topology", key: str | None) -> web.Application:
    """The aiohttp application of the API (used by start_api and by tests)."""
    app = web.Application(client_max_size=MAX_BODY)
    middlewares: list[Middleware] = [log_access] if topo.api.access_log else []  # outermost first
    if topo.api.cors_origins:
        middlewares.append(install_cors(app, topo.api.cors_origins))  # preflights need no key
    app.middlewares.extend([*middlewares, _errors])
    app[CTX] = ApiContext(node, topo, key)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model_info)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Authentication, and every failure as a JSON error; counts the responses."""
    ctx = request.app[CTX]
    endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
    try:
        if ctx.key is not None and request.path != "/health":
            _check_key(request, ctx.key)
        resp = await handler(request)
    except ApiError as e:
        resp = error_response(e.status, e.message, e.code, e.param, e.partial)
        if e.retry_after is not None:
            resp.headers["Retry-After"] = str(e.retry_after)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        resp = error_response(e.status, _http_message(request, e))
    except asyncio.CancelledError:
        ctx.metrics.http_response(endpoint, 499)  # the client left before the answer
        raise
    except Exception as e:  # a bug: answered, logged, never fatal to the server
        log.exception("%s %s failed", request.method, request.path)
        resp = error_response(500, f"internal error: {type(e).__name__}: {e}")
    ctx.metrics.http_response(endpoint, resp.status)
    return resp


def _has_key(request: web.Request, key: str) -> bool:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key.encode())


def _check_key(request: web.Request, key: str) -> None:
    if not request.headers.get("Authorization"):
        raise ApiError(401, "missing API key: send the header 'Authorization: Bearer KEY'", "invalid_api_key")
    if not _has_key(request, key):
        raise ApiError(401, "invalid API key", "invalid_api_key")


def _http_message(request: web.Request, e: web.HTTPException) -> str:
    if e.status == 404:
        return (f"no endpoint {request.method} {request.path}; this server has POST /v1/chat/completions, "
                "POST /v1/completions, GET /v1/models, GET /v1/models/{id}, GET /health and GET /metrics")
    if e.status == 405:
        return f"{request.method} is not allowed on {request.path}"
    if e.status == 413:
        return f"the request body is larger than {MAX_BODY} bytes"
    return e.text or e.reason


def error_response(status: int, message: str, code: str | None = None, param: str | None = None,
                   partial: dict[str, Any] | None = None) -> web.Response:
    err: dict[str, Any] = {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                           "param": param, "code": code}
    if partial:
        err["partial"] = partial
    return web.json_response({"error": err}, status=status)


# ----------------------------------------------------------------------------- endpoints
async def models(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    return web.json_response({"object": "list", "data": [_model_object(ctx)]})


async def model_info(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    name = request.match_info["model"]
    if not ctx.knows_model(name):
        raise ApiError(404, f"the model {name!r} is not served here; this server serves {ctx.model_id!r}",
                       "model_not_found", "model")
    return web.json_response(_model_object(ctx))


def _model_object(ctx: ApiContext) -> dict[str, Any]:
    return {"id": ctx.model_id, "object": "model", "created": int(ctx.started), "owned_by": "flowspec"}


async def health(request: web.Request) -> web.Response:
    """The ring's status; with a key configured, node details only for callers that send it."""
    ctx = request.app[CTX]
    h = ring_health(ctx.node, ctx.topo)
    status = 200 if h["formed"] else 503
    if ctx.key is not None and not _has_key(request, ctx.key):
        return web.json_response({"status": h["status"]}, status=status)
    return web.json_response(h, status=status)


async def metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[CTX].metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": content_type})


# ------------------------------------------------------------------------ completions
async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    t_arrival = time.perf_counter()
    return await _answer(request, ctx, parse_chat(await _read_json(request), ctx), t_arrival)


async def completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    t_arrival = time.perf_counter()
    return await _answer(request, ctx, parse_completion(await _read_json(request), ctx), t_arrival)


async def _read_json(request: web.Request) -> Any:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"the request body is larger than {MAX_BODY} bytes") from None
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {str(e)[:200]}") from None


async def _answer(request: web.Request, ctx: ApiContext, call: GenCall, t_arrival: float) -> web.StreamResponse:
    """Run a checked generation request on the ring; the whole answer, or its stream."""
    node = ctx.node
    # cheap refusals first: nothing is tokenized for a request that cannot be served
    if not node.ready.is_set():
        raise ApiError(503, f"the ring is not available: {node.error or 'it is not formed yet'}", "ring_down")
    if node.queued >= ctx.topo.api.queue_size:
        err = ApiError(429, f"the queue is full: {node.active} requests are decoding (decoding.max_active) and "
                       f"{node.queued} wait (api.queue_size); retry later", "queue_full")
        err.retry_after = _retry_after(node)
        raise err
    try:
        req = await node.prepare(call.meta)
    except RequestError as e:
        if call.kind == "text" and e.param in ("prompt_ids", "messages"):  # a completion's prompt is `prompt`
            raise ApiError(400, str(e).replace("prompt_ids", "prompt (token ids)", 1), param="prompt") from None
        raise ApiError(400, str(e), param=e.param) from None
    except FlowSpecError as e:
        raise ApiError(400, str(e)) from None
    echo = ""
    if call.echo:  # the prompt as sent (token ids: their text)
        ids = call.meta.get("prompt_ids")
        echo = call.meta["prompt"] if ids is None else await asyncio.get_running_loop().run_in_executor(
            None, node.tok.decode, ids)
    reply = Reply(call, ctx.model_id, len(req.prompt_ids), node.tok.pieces, echo)
    request[TOKENS] = (len(req.prompt_ids), 0)
    gen = ctx.metrics.watch(t_arrival, len(req.prompt_ids)).observe(node.generate(req))
    async with contextlib.aclosing(gen):
        try:
            first = await gen.__anext__()
        except RingError as e:
            raise _ring_failed(e) from None
        except StopAsyncIteration:
            raise ApiError(500, "the ring ended the request without an answer") from None
        if call.stream:
            return await _stream(request, ctx, call, reply, gen, first)
        done = first
        try:
            while not isinstance(done, DoneEvent):
                done = await gen.__anext__()
        except RingError as e:
            raise _ring_failed(e) from None
    request[TOKENS] = (len(req.prompt_ids), len(done.token_ids))
    if call.logprobs is None:
        return web.json_response(reply.response(done, _public_stats(done.stats)))
    body = await asyncio.get_running_loop().run_in_executor(  # naming the tokens of logprobs
        None, reply.response, done, _public_stats(done.stats))
    return web.json_response(body)


def _retry_after(node: "SourceNode") -> int:
    """Seconds until a place in the queue is likely to free up: the mean time of the
    requests served so far (5 s before the first one), at least 1."""
    m = node.metrics
    mean = m["decode_s"] / m["requests"] if m["requests"] else 5.0
    return max(1, math.ceil(mean))


def _ring_failed(e: RingError) -> ApiError:
    """503 for a ring failure; what was produced before it travels in error.partial."""
    partial = e.partial or {}
    n = len(partial.get("token_ids") or [])  # type: ignore[arg-type]
    extra = f" ({n} tokens were produced before the failure: see error.partial)" if n else ""
    err = ApiError(503, f"the ring failed: {e}{extra}", "ring_down")
    if n:
        err.partial = partial
    return err


async def _stream(request: web.Request, ctx: ApiContext, call: GenCall, reply: Reply, gen: Any,
                  first: TokensEvent | DoneEvent) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                       "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    sent = ""  # text streamed so far (the source's deltas: stop strings and partial characters held back)
    pending: list[TokenLogprob] = []  # logprobs of tokens whose text has not been sent yet
    prompt_tokens = reply.prompt_tokens

    async def send(obj: Any) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
        await resp.write(f"data: {data}\n\n".encode())

    ev = first
    try:
        for chunk in reply.opening():
            await send(chunk)
        while True:
            if isinstance(ev, DoneEvent):
                final = ev.text
                rest = final[len(sent):] if final.startswith(sent) else ""
                request[TOKENS] = (prompt_tokens, len(ev.token_ids))
                for chunk in reply.closing(ev, rest, pending, _public_stats(ev.stats)):
                    await send(chunk)
                break
            pending.extend(ev.logprobs or ())
            delta = ev.text
            if delta:
                sent += delta
                await send(reply.chunk(delta, lps=pending, flowspec=ev.live))
                pending = []
            try:
                ev = await gen.__anext__()
            except RingError as e:
                await send({"error": {"message": f"the ring failed: {e}; the answer so far was streamed above",
                                      "type": "service_unavailable", "param": None, "code": "ring_down"}})
                break
        await send("[DONE]")
        await resp.write_eof()
    except (ConnectionError, OSError):  # the client left: closing the generator frees the ring
        log.info("a streaming client left before the end of its answer")
    except Exception as e:  # a bug: the headers are sent, so it is reported in the stream
        log.exception("a streamed answer failed")
        with contextlib.suppress(ConnectionError, OSError):
            await send({"error": {"message": f"internal error: {type(e).__name__}: {e}", "type": "server_error",
                                  "param": None, "code": None}})
            await send("[DONE]")
    return resp


def _public_stats(stats: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in stats.items() if k != "trace"}
