"""A client of a running ring: talks to the source over the authenticated binary protocol."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, AsyncIterator

from ..config import Topology
from ..errors import FlowSpecError, RingError
from .protocol import Frame, FrameType
from .transport import FrameStream, HandshakeError, PeerGone, client_auth, hello_meta, open_stream


class RingClient:
    def __init__(self, stream: FrameStream, source_hello: dict[str, Any]) -> None:
        self.s = stream
        self.source = source_hello
        self._ids = itertools.count(1)

    @classmethod
    async def connect(cls, topo: Topology, key: bytes, timeout: float = 5.0) -> "RingClient":
        src = topo.source
        host, port = src.address
        s = await open_stream(host, port, topo.security.max_frame_bytes, 3600.0, f"source {src.name!r}", timeout)
        try:
            await client_auth(s, key, timeout, encrypt=topo.security.encrypt)
            await s.send(Frame(FrameType.HELLO, meta=hello_meta(topo.cluster, "", "client", "client", None)))
            f = await s.recv(timeout)
            if f.type == FrameType.REJECT:
                raise HandshakeError(str(f.meta.get("reason")))
            if f.type != FrameType.HELLO:
                raise HandshakeError(f"{host}:{port} did not answer like a FlowSpec source")
            if f.meta.get("cluster") != topo.cluster:
                raise HandshakeError(f"{host}:{port} serves cluster {f.meta.get('cluster')!r}, "
                                     f"not {topo.cluster!r}")
        except BaseException:
            await s.close()
            raise
        return cls(s, f.meta)

    async def close(self) -> None:
        await self.s.close()

    async def status(self) -> dict[str, Any]:
        await self.s.send(Frame(FrameType.STATUS))
        f = await self.s.recv(10.0)
        return f.meta

    async def stream(self, request: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Send a request; yield {"type": "tokens", ...} events and finally the "done" event."""
        rid = next(self._ids)
        await self.s.send(Frame(FrameType.REQUEST, rid, meta=request))
        while True:
            f = await self.s.recv(3600.0)
            if f.type == FrameType.TOKENS:
                yield {"type": "tokens", **f.meta}
            elif f.type == FrameType.DONE:
                yield f.meta
                return
            elif f.type == FrameType.ERROR:
                msg, partial = str(f.meta.get("message")), f.meta.get("partial")
                if isinstance(partial, dict) and partial.get("token_ids"):
                    text = str(partial.get("text") or "")
                    shown = text if len(text) <= 200 else text[:200] + "..."
                    raise RingError(f"{msg}; {len(partial['token_ids'])} tokens were produced before the "
                                    f"failure: {shown!r}", partial)
                raise FlowSpecError(msg)

    async def probe(self, meta: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
        """One ring probe through the source (see probes.py): its answer."""
        await self.s.send(Frame(FrameType.PROBE, 1, meta=meta))
        while True:
            f = await self.s.recv(timeout)
            if f.type == FrameType.PROBE:
                return f.meta
            if f.type == FrameType.ERROR:
                raise FlowSpecError(f"the {meta.get('op')} probe failed: {f.meta.get('message')}")

    async def cancel(self) -> None:
        await self.s.send(Frame(FrameType.CANCEL))

    async def generate(self, request: dict[str, Any]) -> dict[str, Any]:
        async for ev in self.stream(request):
            if ev.get("type") == "done":
                return ev
        raise PeerGone("the source ended the request without an answer")


async def wait_formed(topo: Topology, key: bytes, timeout: float, alive: Any = None) -> dict[str, Any]:
    """Poll the source until the ring is formed; `alive()` may raise to abort early."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last = "the source is not answering yet"
    while loop.time() < deadline:
        if alive is not None:
            alive()
        try:
            c = await RingClient.connect(topo, key, timeout=2.0)
            try:
                st = await c.status()
            finally:
                await c.close()
            if st.get("formed"):
                return st
            last = st.get("error") or "the ring is still forming"
        except (PeerGone, OSError, asyncio.TimeoutError) as e:
            last = str(e)
        await asyncio.sleep(0.3)
    raise FlowSpecError(f"the ring did not form within {timeout:.0f} s: {last}")
