"""The chat's wire client: the source's HTTP API (health, models, streaming chat completions).

Nothing here prints: failures are :class:`ChatError` (the API refused, did not answer, or
the stream broke) or, while waiting for the ring, :class:`FlowSpecError`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable

from ..config import Topology
from ..errors import FlowSpecError


class ChatError(FlowSpecError):
    """The API refused a request or the stream broke."""


class ApiClient:
    """The HTTP API of a source node, over aiohttp."""

    def __init__(self, url: str, key: str | None) -> None:
        self.base = normalize_url(url)  # http://host:port, without /v1
        self.key = key  # Bearer key, or None
        self._session: Any = None  # aiohttp.ClientSession, opened in the event loop

    async def __aenter__(self) -> "ApiClient":
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=None)
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        self._session = aiohttp.ClientSession(timeout=timeout, headers=headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._session.close()

    async def health(self) -> tuple[int, dict[str, Any]]:
        """(HTTP status, body) of GET /health; ChatError when nothing answers."""
        import aiohttp

        try:
            async with self._session.get(self.base + "/health", timeout=aiohttp.ClientTimeout(total=5)) as r:
                return r.status, await _json(r)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise ChatError(f"the API at {self.base} does not answer: {e or type(e).__name__}") from None

    async def model(self) -> str:
        import aiohttp

        try:
            async with self._session.get(self.base + "/v1/models") as r:
                body = await _json(r)
                if r.status != 200:
                    raise ChatError(f"GET /v1/models: {r.status}: {error_message(body)}")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
            raise ChatError(f"the API at {self.base} does not answer: {e}") from None
        data = body.get("data") or [{}]
        return str(data[0].get("id", "default"))

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST a streaming chat completion; yield its chunks."""
        import aiohttp

        try:
            async with self._session.post(self.base + "/v1/chat/completions", json=dict(body, stream=True)) as r:
                if r.status != 200:
                    raise ChatError(f"{r.status}: {error_message(await _json(r))}")
                async for line in r.content:
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        raise ChatError(error_message(chunk))
                    yield chunk
            raise ChatError(f"the answer was cut off: {self.base} closed the stream before its end (did the "
                            "source node stop? see its log); what arrived is kept above")
        except (aiohttp.ClientError, OSError) as e:
            raise ChatError(f"lost the connection to {self.base}: {e}") from None
        except ValueError as e:
            raise ChatError(f"the API sent something that is not an event stream: {e}") from None


async def _json(r: Any) -> dict[str, Any]:
    try:
        body = await r.json(content_type=None)
    except (ValueError, UnicodeDecodeError):
        return {"error": {"message": (await r.text())[:200]}}
    return body if isinstance(body, dict) else {}


def error_message(body: dict[str, Any]) -> str:
    """The message of an API error body (``{"error": {"message": ...}}`` or anything else)."""
    err = body.get("error")
    if isinstance(err, dict):
        return str(err.get("message") or err)
    return str(err or body)


def normalize_url(url: str) -> str:
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[:-3]
    return url


def api_url(topo: Topology) -> str:
    host = topo.api.host
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{topo.api.port}"


async def wait_ready(client: ApiClient, timeout: float, alive: Callable[[], None] | None) -> dict[str, Any]:
    """Poll /health until the ring is formed; alive() may raise to give up early."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "the API does not answer yet"
    while loop.time() < deadline:
        if alive is not None:
            alive()
        try:
            status, h = await client.health()
            if status == 200:
                return h
            if status == 401:
                raise FlowSpecError(f"the API at {client.base} refused the API key: {error_message(h)}")
            if "formed" not in h:
                raise FlowSpecError(f"{client.base}/health answered HTTP {status} but is not a FlowSpec API; "
                                    "is another program using that port?")
            last = h.get("error") or "the ring is still forming"
        except ChatError as e:
            last = str(e)
        await asyncio.sleep(0.3)
    raise FlowSpecError(f"the ring did not become ready within {timeout:.0f} s: {last}")
