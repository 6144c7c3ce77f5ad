"""HTTP plumbing of the API that is not about generating: CORS and the access log.

* **CORS** (``api.cors_origins``): a browser page from one of these origins (or any, with
  ``"*"``) may call the API. A preflight (``OPTIONS`` with ``Origin`` and
  ``Access-Control-Request-Method``) is answered 204 before authentication (browsers send
  no credentials with it), or 403 naming the origin when it is not allowed; every
  response to an allowed origin, streamed ones too, carries ``Access-Control-Allow-Origin``.
  Without ``api.cors_origins`` nothing of this is installed.
* **Access log** (``api.access_log: true``): one line per request on the logger
  ``flowspec.access`` (INFO): client, method, path, status, prompt+completion tokens of a
  generation request, and duration (a streamed answer's whole duration).

Both are aiohttp middlewares; no dependency beyond aiohttp.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable

from aiohttp import web

access_log = logging.getLogger("flowspec.access")

# (prompt tokens, completion tokens) of a generation request, set by its handler for the access log
TOKENS = web.RequestKey("flowspec_tokens", tuple)
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"  # what a preflight may ask for when it names none
CORS_MAX_AGE_S = 600  # how long a browser may keep a preflight's answer

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]


def install_cors(app: web.Application, origins: tuple[str, ...]) -> Middleware:
    """The preflight middleware for `origins`; also adds the CORS headers to every response."""
    any_origin = "*" in origins

    def allowed(origin: str) -> bool:
        return any_origin or origin.lower().rstrip("/") in origins

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if request.method != "OPTIONS" or not origin or "Access-Control-Request-Method" not in request.headers:
            return await handler(request)
        if not allowed(origin):
            return web.json_response({"error": {
                "message": f"the origin {origin!r} may not call this API; add it to api.cors_origins in the topology",
                "type": "permission_error", "param": None, "code": "cors_origin"}}, status=403)
        asked = request.headers.get("Access-Control-Request-Headers")
        return web.Response(status=204, headers={"Access-Control-Allow-Methods": CORS_METHODS,
                                                 "Access-Control-Allow-Headers": asked or CORS_HEADERS,
                                                 "Access-Control-Max-Age": str(CORS_MAX_AGE_S)})

    async def headers(request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin and allowed(origin):
            response.headers["Access-Control-Allow-Origin"] = "*" if any_origin else origin
            response.headers["Access-Control-Expose-Headers"] = "Retry-After"
            if not any_origin:
                response.headers.add("Vary", "Origin")

    app.on_response_prepare.append(headers)
    return cors


@web.middleware
async def log_access(request: web.Request, handler: Handler) -> web.StreamResponse:
    """One line per request: client, method, path, status, tokens, duration."""
    t0 = time.perf_counter()
    status = 500
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    except web.HTTPException as e:
        status = e.status
        raise
    except asyncio.CancelledError:
        status = 499  # the client left before the answer
        raise
    finally:
        tokens = request.get(TOKENS)
        access_log.info("%s %s %s %d tokens=%s %.3f s", request.remote or "-", request.method, request.path_qs,
                        status, f"{tokens[0]}+{tokens[1]}" if tokens else "-", time.perf_counter() - t0)
