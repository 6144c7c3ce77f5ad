"""The two links every ring node has: to its successor (it connects) and from its
predecessor (it accepts), with authentication, handshake, heartbeats and a watchdog.

Who the neighbours are follows the ring plan (ring_plan.py): the file's order until a
spare takes a dead stage's place; a newer plan seen at a handshake, in a REJECT or handed
over by the node (RING, FORM) is adopted at once, and the links follow it."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from ..config import NodeSpec, Topology
from .protocol import Frame, FrameType, ProtocolError
from .ring_plan import RingPlan
from .tasks import LogLimiter, Silence, start_supervised
from .transport import (AuthError, FrameStream, HandshakeError, PeerGone, check_hello, client_auth,
                        open_stream, server_auth)

log = logging.getLogger(__name__)

Handler = Callable[[FrameStream, dict[str, Any]], Awaitable[None]]
REMIND_FIRST_S = 300.0  # a lost successor that stays unreachable is mentioned again after this long ...
REMIND_EVERY_S = 1800.0  # ... and then this often (the first loss is logged at once)
# the longest pause between two attempts to reach a successor that is gone: bounds how long a
# restarted node waits for its predecessor (attempts start at 0.1 s and grow by half each time)
RETRY_MAX_S = 1.0


class _Replanned(Exception):
    """A newer ring plan came with the handshake: connect to the successor it names."""


class RingLinks:
    """Owns the server socket, the successor connection and liveness of both neighbours.

    `on_upstream(stream, hello)` runs for an authenticated predecessor, `on_client` for an
    authenticated client (only the source accepts clients), `on_spare` for a spare node
    announcing itself (only the source); each runs until the connection ends.
    `on_dead(name, reason)` is called once per neighbour failure."""

    def __init__(self, topo: Topology, name: str, key: bytes, hello: dict[str, Any],
                 on_upstream: Handler, on_client: Handler | None,
                 on_downstream_frame: Callable[[Frame], Awaitable[None]],
                 on_dead: Callable[[str, str], Awaitable[None]], on_spare: Handler | None = None,
                 plan: RingPlan | None = None) -> None:
        self.topo, self.name, self.key, self.hello = topo, name, key, hello
        self.me = topo.node(name)
        self.plan = plan or RingPlan.initial(topo)  # who sits where in the ring now
        self.ousted = asyncio.Event()  # a newer plan has given this node's place to another node
        self._on_spare = on_spare
        sec = topo.security
        self.max_frame = sec.max_frame_bytes
        self.encrypt = sec.encrypt
        self.read_timeout = sec.read_timeout_s
        self.heartbeat = sec.heartbeat_s
        self.dead_after = sec.dead_after_s
        self._on_upstream, self._on_client = on_upstream, on_client
        self._on_down_frame, self._on_dead = on_downstream_frame, on_dead
        self.upstream: FrameStream | None = None
        self.downstream: FrameStream | None = None
        self.down_ready = asyncio.Event()
        self.up_ready = asyncio.Event()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._connector: asyncio.Task[Any] | None = None  # the loop connecting to the successor
        self.closing = False
        self._refusals = LogLimiter(log)  # refused connections: a stranger can open thousands

    # ------------------------------------------------------------------ the plan
    @property
    def succ(self) -> NodeSpec:
        return self.topo.node(self.plan.successor(self.name))

    @property
    def pred(self) -> NodeSpec:
        return self.topo.node(self.plan.predecessor(self.name))

    @property
    def succ_is_source(self) -> bool:
        return self.name in self.plan and self.succ.is_source

    def hello_now(self) -> dict[str, Any]:
        """This node's HELLO, with the ring plan it follows."""
        return dict(self.hello, plan=self.plan.as_meta())

    async def adopt(self, plan: RingPlan | None) -> bool:
        """Follow `plan` if it is newer than this node's: reconnect to a new successor, drop a
        predecessor that is no longer one; True when adopted."""
        if plan is None or plan.epoch <= self.plan.epoch:
            return False
        old = self.plan
        self.plan = plan
        if self.name not in plan:
            log.warning("%s: node %r has taken this node's place in the ring (%s); it leaves the ring",
                        self.name, plan.order[old.order.index(self.name)] if self.name in old else "?", plan)
            self.ousted.set()
            return True
        log.info("%s: the ring is now %s", self.name, plan)
        if self.name not in old or old.successor(self.name) != plan.successor(self.name):
            self._restart_connector()
        up = self.upstream
        if up is not None and up.label != self.pred.name:
            self.upstream = None
            self.up_ready.clear()
            await up.close()
        return True

    def _restart_connector(self) -> None:
        """Connect to the successor of the current plan (from the next loop iteration when the
        loop itself adopted the plan)."""
        if self.closing:
            return
        if self._connector is not None and self._connector is not asyncio.current_task():
            self._connector.cancel()
        elif self._connector is not None:
            return  # the connecting loop itself: it checks the successor's name after adopting
        self._connector = start_supervised(f"{self.name}: the link to the successor", self._connect_loop, log,
                                           lambda: self.closing or self.ousted.is_set())

    # ------------------------------------------------------------------ lifecycle
    @property
    def listening(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        host, port = self.me.address
        try:
            self._server = await asyncio.start_server(self._accept, host, port, reuse_address=True)
        except OSError as e:
            from ..errors import FlowSpecError

            raise FlowSpecError(
                f"node {self.name!r} cannot listen on {host}:{port}: {e.strerror or e} "
                "(is another node or program using that port?)") from None
        log.info("%s listening on %s:%d", self.name, host, port)
        closing = lambda: self.closing  # noqa: E731
        self._restart_connector()
        self._tasks.append(start_supervised(f"{self.name}: the heartbeat watchdog", self._heartbeats, log,
                                            closing))

    async def close(self) -> None:
        self.closing = True
        for t in self._tasks + ([self._connector] if self._connector is not None else []):
            t.cancel()
        if self._server is not None:
            self._server.close()
        for s in (self.upstream, self.downstream):
            if s is not None:
                await s.close()

    # ------------------------------------------------------------------ accepting
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._accept_inner(reader, writer)
        except asyncio.CancelledError:  # shutting down
            writer.close()
        except Exception:  # a bug in serving one connection: logged, the node serves on
            log.exception("%s: a connection failed", self.name)
            writer.close()

    async def _accept_inner(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        s = FrameStream(reader, writer, self.max_frame, self.read_timeout, "peer")
        try:
            await server_auth(s, self.key, encrypt=self.encrypt)
            f = await s.recv(5.0)
            if f.type != FrameType.HELLO:
                raise ProtocolError("expected HELLO after authentication")
            theirs = f.meta
            check_hello(self.hello, theirs)
            role = theirs.get("role")
            if role == "client":
                if self._on_client is None:
                    raise HandshakeError(f"node {self.name!r} is a stage; clients talk to the source")
            elif role == "spare":
                if self._on_spare is None:
                    raise HandshakeError(f"node {self.name!r} is a stage; spares announce themselves to the source")
            else:
                await self.adopt(RingPlan.from_meta(self.topo, theirs.get("plan")))
                if self.name not in self.plan:
                    raise HandshakeError(f"node {self.name!r} is no longer part of the ring ({self.plan})")
                if theirs.get("name") != self.pred.name:
                    raise HandshakeError(
                        f"node {theirs.get('name')!r} connected to {self.name!r}, but in the ring "
                        f"{self.plan} the predecessor of {self.name!r} is {self.pred.name!r}")
            await s.send(Frame(FrameType.HELLO, meta=self.hello_now()))
        except (AuthError, HandshakeError, ProtocolError, PeerGone) as e:
            self._refusals.warning("%s: refused a connection from %s: %s", self.name, s.peer, e)
            # tell the peer why: a client with the wrong key gets AuthError, not a bare close
            if isinstance(e, (HandshakeError, AuthError)):
                try:  # an authenticated peer also gets the ring plan: it may have been replaced
                    await s.send(Frame(FrameType.REJECT, meta={"reason": str(e), **(
                        {"plan": self.plan.as_meta()} if s.authenticated else {})}))
                except Exception:  # the peer may be gone already
                    pass
            await s.close()
            return
        s.label = str(theirs.get("name") or "client")
        if role in ("client", "spare"):
            serve = self._on_client if role == "client" else self._on_spare
            assert serve is not None
            try:
                await serve(s, theirs)
            finally:
                await s.close()
            return
        if self.upstream is not None:
            log.info("%s: predecessor %s reconnected; replacing the old link", self.name, s.label)
            await self.upstream.close()
        self.upstream = s
        self.up_ready.set()
        log.info("%s: predecessor %s connected from %s", self.name, s.label, s.peer)
        try:
            await self._on_upstream(s, theirs)
        finally:
            if self.upstream is s:
                self.upstream = None
                self.up_ready.clear()
                if not self.closing:
                    await self._on_dead(s.label, "its connection closed")
            await s.close()

    # ----------------------------------------------------------------- connecting
    async def _connect_loop(self) -> None:
        delay = 0.1
        reminder = time.monotonic() + 10.0  # at start: say after a while whom this node waits for
        while not self.closing and not self.ousted.is_set():
            succ = self.succ  # per attempt: a newer plan may name another successor
            host, port = succ.address
            s: FrameStream | None = None
            try:
                s = await open_stream(host, port, self.max_frame, self.read_timeout, succ.name)
                await client_auth(s, self.key, encrypt=self.encrypt)
                await s.send(Frame(FrameType.HELLO, meta=self.hello_now()))
                f = await s.recv(5.0)
                if f.type == FrameType.REJECT:  # with a newer plan when this node is out of date
                    if await self.adopt(RingPlan.from_meta(self.topo, f.meta.get("plan"))):
                        raise _Replanned
                    raise HandshakeError(str(f.meta.get("reason")))
                if f.type != FrameType.HELLO:
                    raise ProtocolError("expected HELLO")
                check_hello(self.hello, f.meta)
                await self.adopt(RingPlan.from_meta(self.topo, f.meta.get("plan")))
                if self.ousted.is_set() or self.succ.name != succ.name:
                    raise _Replanned
                if f.meta.get("name") != succ.name:
                    raise HandshakeError(
                        f"{host}:{port} is node {f.meta.get('name')!r}, but the topology puts "
                        f"{succ.name!r} there")
            except _Replanned:
                if s is not None:
                    await s.close()
                delay = 0.1
                continue
            except (AuthError, HandshakeError) as e:
                if s is not None:
                    await s.close()
                await self._on_dead(succ.name, str(e))
                log.error("%s: %s", self.name, e)
                await asyncio.sleep(2.0)
                continue
            except (PeerGone, ProtocolError) as e:
                if s is not None:
                    await s.close()
                if time.monotonic() > reminder:
                    log.warning("%s: still waiting for %s: %s", self.name, succ.name, e)
                    reminder = time.monotonic() + REMIND_EVERY_S
                await asyncio.sleep(delay)
                delay = min(delay * 1.5, RETRY_MAX_S)
                continue
            delay = 0.1
            self.downstream = s
            self.down_ready.set()
            log.info("%s: connected to successor %s at %s:%d", self.name, succ.name, host, port)
            try:
                while True:  # the successor only sends heartbeats and errors back
                    f = await s.recv()
                    if f.type != FrameType.HEARTBEAT:
                        await self._on_down_frame(f)
            except (PeerGone, ProtocolError) as e:
                if not self.closing:
                    log.warning("%s: %s", self.name, self.gone_message(succ.name, str(e)))
                    reminder = time.monotonic() + REMIND_FIRST_S
            finally:
                if self.downstream is s:  # (a connector started for a newer plan may have replaced it)
                    self.downstream = None
                    self.down_ready.clear()
                await s.close()
            if not self.closing and not self.ousted.is_set():
                await self._on_dead(succ.name, "its connection closed")

    def gone_message(self, who: str, reason: str) -> str:
        """One clear line for a neighbour that went away (logged once per loss)."""
        if self.topo.node(who).is_source and not self.me.is_source:
            return (f"lost the source {who!r} ({reason}); this stage keeps its layers loaded and rejoins the ring "
                    "when the source is back")
        return f"lost {who!r} ({reason}); reconnecting in the background"

    # ------------------------------------------------------------------ liveness
    async def _heartbeats(self) -> None:
        """Send heartbeats both ways and declare a neighbour dead after dead_after_s of silence.

        Silence is counted only while this node's loop ran: a tick that comes late (the
        loop was busy, or the process was stopped) adds at most two heartbeat periods, and
        the readers get to read what arrived meanwhile before the next judgement."""
        hb = Frame(FrameType.HEARTBEAT)
        clocks: dict[int, Silence] = {}
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.heartbeat)
            now = time.monotonic()
            elapsed, last = now - last, now
            if elapsed > 3 * self.heartbeat:
                log.warning("%s: this node's event loop did not run for %.1f s; peers are not blamed for it",
                            self.name, elapsed - self.heartbeat)
            streams = [(s, s.label) for s in (self.downstream, self.upstream) if s is not None]
            clocks = {id(s): clocks.get(id(s)) or Silence(2 * self.heartbeat) for s, _ in streams}
            for s, who in streams:
                silent = clocks[id(s)].tick(s.last_seen, elapsed)
                if silent > self.dead_after:
                    log.warning("%s: %s sent nothing for %.1f s", self.name, who, silent)
                    await self._on_dead(who, f"no heartbeat for {silent:.1f} s (stuck or cut off)")
                    await s.close()
                    continue
                try:
                    s.send_nowait(hb)
                except Exception:  # a broken socket is noticed by its reader
                    pass
