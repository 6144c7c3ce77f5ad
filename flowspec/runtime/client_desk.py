"""The source's server for binary-protocol clients (`flowspec generate --topology`, the
bench, the profiler): one connection per client, one request at a time on it, answered
with TOKENS frames and a DONE (or ERROR); CANCEL stops the running request."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..errors import FlowSpecError, RingError
from .decode import TokensEvent
from .protocol import Frame, FrameType, ProtocolError
from .transport import FrameStream, PeerGone

if TYPE_CHECKING:
    from .source_node import SourceNode

log = logging.getLogger(__name__)


class ClientDesk:
    """Serves the binary clients of one source node."""

    def __init__(self, node: "SourceNode") -> None:
        self.node = node

    async def serve(self, s: FrameStream, hello: dict[str, Any]) -> None:
        """Binary-protocol clients (`flowspec generate --topology`, `flowspec up`)."""
        pending: asyncio.Task[Frame] | None = None  # a read a request left running: the next frame
        try:
            while True:
                if pending is not None:
                    f, pending = await pending, None
                else:
                    f = await s.recv(timeout=3600)
                if f.type == FrameType.STATUS:
                    await s.send(Frame(FrameType.STATUS, f.request_id, meta=self.node.status()))
                elif f.type == FrameType.REQUEST:
                    pending = await self._client_request(s, f)
                elif f.type == FrameType.PROBE:
                    await self._client_probe(s, f)
                elif f.type == FrameType.HEARTBEAT:
                    continue
                else:
                    raise ProtocolError(f"unexpected {f.type.name} frame from a client")
        except (ProtocolError, PeerGone) as e:
            log.info("%s: client %s left: %s", self.node.name, s.peer, e)
        finally:
            if pending is not None and not pending.done():
                pending.cancel()

    async def _client_probe(self, s: FrameStream, f: Frame) -> None:
        """A profiler probe from a client (see probes.py): runs with the ring to itself."""
        try:
            if not self.node.ready.is_set():
                raise RingError(self.node.error or "the ring is not formed yet; start every node of the topology")
            async with self.node.admission.ring_to_itself():
                res = await self.node.probes.run(f.meta, self.node.links.downstream, self.node.links.succ.name)
            answer = Frame(FrameType.PROBE, f.request_id, meta=res)
        except FlowSpecError as e:
            answer = Frame(FrameType.ERROR, f.request_id, meta={"message": str(e)})
        try:
            await s.send(answer)
        except (ConnectionError, OSError) as e:
            log.info("%s: profiling client %s left: %s", self.node.name, s.peer, e)

    async def _client_request(self, s: FrameStream, f: Frame) -> "asyncio.Task[Frame] | None":
        """Serve one request; return the read of the client's next frame when one is running.

        That read is never cancelled: a frame the client sent right after DONE (its next
        request) may already be in it, and cancelling a read can lose a frame or half of one."""
        try:
            req = await self.node.prepare(f.meta)
        except FlowSpecError as e:
            await s.send(Frame(FrameType.ERROR, f.request_id, meta={"message": f"bad request: {e}"}))
            return None

        async def produce() -> None:
            async for ev in self.node.generate(req):
                if isinstance(ev, TokensEvent):
                    await s.send(Frame(FrameType.TOKENS, f.request_id, meta={"ids": ev.ids, "text": ev.text}))
                else:
                    await s.send(Frame(FrameType.DONE, f.request_id, meta=ev.as_dict()))

        task = asyncio.create_task(produce())
        reader: asyncio.Task[Frame] | None = asyncio.create_task(s.recv(timeout=3600))
        try:
            while True:
                assert reader is not None
                done, _ = await asyncio.wait({task, reader}, return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    exc = task.exception()
                    if exc is not None:
                        msg = str(exc) if isinstance(exc, FlowSpecError) else f"internal error: {exc!r}"
                        if not isinstance(exc, FlowSpecError):
                            log.exception("%s: request failed", self.node.name, exc_info=exc)
                        err: dict[str, Any] = {"message": msg}
                        if isinstance(exc, RingError) and exc.partial:
                            err["partial"] = exc.partial  # what was produced before the failure
                        await s.send(Frame(FrameType.ERROR, f.request_id, meta=err))
                    pending, reader = reader, None
                    return pending  # the caller goes on with this read
                g = reader.result()  # raises PeerGone when the client left: the request is cancelled
                reader = None
                if g.type == FrameType.CANCEL:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    await s.send(Frame(FrameType.ERROR, f.request_id, meta={"message": "cancelled"}))
                    return None
                if g.type == FrameType.STATUS:  # answered during a request too
                    await s.send(Frame(FrameType.STATUS, g.request_id, meta=self.node.status()))
                reader = asyncio.create_task(s.recv(timeout=3600))
        finally:
            for t in (task, reader):
                if t is not None and not t.done():
                    t.cancel()
            await asyncio.gather(task, *([reader] if reader is not None else []), return_exceptions=True)
