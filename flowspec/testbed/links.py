"""Emulated links: a TCP proxy adding latency, jitter, a bandwidth limit and stalls, byte-exact."""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import threading
from dataclasses import dataclass
from typing import Any

from ..config import LinkSpec
from ..errors import FlowSpecError

log = logging.getLogger(__name__)


@dataclass
class LinkShaper:
    """When each chunk sent into one direction of an emulated link arrives at the far end.

    The line serialises chunks one after the other at the link's rate (a FIFO), a chunk
    may first stall (a lost packet's retransmission), and every chunk then travels for the
    latency plus a uniform jitter; arrivals never overtake each other."""

    link: LinkSpec  # the emulated link
    rng: random.Random  # draws jitter and stalls
    free_at: float = 0.0  # when the line has finished serialising what it was given
    last_arrival: float = 0.0  # arrival time of the previous chunk (FIFO order)

    def arrival(self, nbytes: int, now: float) -> float:
        """The arrival time of a chunk of nbytes handed to the link at now (same clock)."""
        start = max(now, self.free_at)
        if self.link.stall_prob > 0 and self.rng.random() < self.link.stall_prob:
            start += self.link.stall_ms / 1000.0
        rate = self.link.bandwidth_mbit
        done = start + (nbytes * 8 / (rate * 1e6) if rate else 0.0)
        self.free_at = done
        at = done + self.link.latency_ms / 1000.0
        if self.link.jitter_ms > 0:
            at += self.rng.uniform(0.0, self.link.jitter_ms / 1000.0)
        at = max(at, self.last_arrival)
        self.last_arrival = at
        return at


class LinkProxy:
    """A TCP proxy emulating one link: connections to `listen` are forwarded to `target`.

    Both directions get the link's latency, jitter, bandwidth and stalls (each its own
    line); bytes pass unchanged and in order. Runs on the event loop that calls start()."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], link: LinkSpec,
                 name: str = "link", rng: random.Random | None = None, chunk: int = 16384,
                 queue_chunks: int = 256, connect_timeout: float = 1.0) -> None:
        self.listen = listen  # (host, port) to accept on; port 0 picks a free one
        self.target = target  # (host, port) every accepted connection is forwarded to
        self.link = link  # the emulated link
        self.name = name  # for log messages, e.g. "stage1->stage2"
        self.rng = rng or random.Random()  # jitter and stall draws
        self.chunk = chunk  # largest chunk read (and timed) at once
        self.queue_chunks = queue_chunks  # chunks buffered per direction before reading pauses
        self.connect_timeout = connect_timeout  # seconds to keep trying to reach the target
        self.bytes_fwd = 0  # bytes delivered listen -> target
        self.bytes_back = 0  # bytes delivered target -> listen
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task[Any]] = set()

    @property
    def port(self) -> int:
        """The port it listens on (the one picked, when listen asked for port 0)."""
        if self._server is None or not self._server.sockets:
            return self.listen[1]
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        host, port = self.listen
        try:
            self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        except OSError as e:
            raise FlowSpecError(f"link {self.name}: cannot listen on {host}:{port}: {e.strerror or e} "
                                "(is a node or another testbed using that port?)") from None
        log.debug("link %s: %s:%d -> %s:%d (%s)", self.name, host, self.port, *self.target, self.link)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        self._conns.clear()
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), 5.0)

    async def _dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to the target, retrying briefly (the node may still be starting)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.connect_timeout
        while True:
            try:
                return await asyncio.open_connection(*self.target)
            except OSError:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.05)

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conns.add(task)
        uw: asyncio.StreamWriter | None = None
        try:
            try:
                ur, uw = await self._dial()
            except OSError as e:
                log.debug("link %s: target %s:%d unreachable: %s", self.name, *self.target, e)
                return
            fwd = asyncio.create_task(self._pump(cr, uw, LinkShaper(self.link, self.rng), True))
            back = asyncio.create_task(self._pump(ur, cw, LinkShaper(self.link, self.rng), False))
            try:
                await asyncio.gather(fwd, back)
            except (OSError, asyncio.IncompleteReadError) as e:
                log.debug("link %s: connection ended: %s", self.name, e)
            finally:
                for t in (fwd, back):
                    t.cancel()
                await asyncio.gather(fwd, back, return_exceptions=True)
        except asyncio.CancelledError:
            pass  # close(): the connection ends here (a cancelled handler upsets asyncio.streams)
        finally:
            for w in (cw, uw):
                if w is not None:
                    w.close()
            if task is not None:
                self._conns.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shaper: LinkShaper,
                    forward: bool) -> None:
        """Move bytes from reader to writer, each chunk delivered at its emulated arrival time."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(self.queue_chunks)

        async def take() -> None:
            while True:
                data = await reader.read(self.chunk)
                if not data:
                    await queue.put(None)
                    return
                await queue.put((shaper.arrival(len(data), loop.time()), data))

        async def deliver() -> None:
            while True:
                item = await queue.get()
                if item is None:
                    if writer.can_write_eof() and not writer.is_closing():
                        writer.write_eof()
                    return
                at, data = item
                delay = at - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                writer.write(data)
                await writer.drain()
                if forward:
                    self.bytes_fwd += len(data)
                else:
                    self.bytes_back += len(data)

        tasks = [asyncio.create_task(take()), asyncio.create_task(deliver())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


class ProxyHub:
    """Link proxies on an event loop of their own, in a background thread."""

    def __init__(self) -> None:
        self.proxies: list[LinkProxy] = []  # the started proxies
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            # Ctrl-C and SIGTERM must reach the main thread at once (it stops the nodes), not this one
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="flowspec-links", daemon=True)
        self._thread.start()
        ready.wait(5.0)

    def add(self, proxy: LinkProxy) -> LinkProxy:
        if self._loop is None:
            raise RuntimeError("ProxyHub.add before start")
        asyncio.run_coroutine_threadsafe(proxy.start(), self._loop).result(10.0)
        self.proxies.append(proxy)
        return proxy

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if thread.is_alive():
            for p in self.proxies:
                try:
                    asyncio.run_coroutine_threadsafe(p.close(), loop).result(5.0)
                except Exception as e:  # a proxy that does not close still goes with the loop
                    log.warning("link %s did not close cleanly: %s", p.name, e)
            try:
                asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result(5.0)
            except Exception:  # only name lookups ever run there
                pass
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5.0)
        if not thread.is_alive():
            loop.close()
        self._loop = self._thread = None
        self.proxies = []
