"""`flowspec chat`: a multi-turn chat with a ring, through the source's HTTP API.

``--topology FILE`` joins the ring when its API answers, else starts the topology's local
nodes (and stops them on exit); ``--url URL`` talks to a running API. In a terminal the
answer streams in as Markdown in a live view, above a status panel (tokens/s, accepted
tokens per verification, draft tree, each stage's busy fraction, each link's latency,
ring health). Without a terminal it prints plain text and one stats line per answer.

Ctrl-C stops the current answer (the HTTP stream is closed, which cancels the request on
the ring); Ctrl-D or ``/quit`` leaves.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from .config import STRATEGIES, Topology
from .errors import FlowSpecError

log = logging.getLogger(__name__)

COMMANDS = {
    "/reset": "forget the conversation",
    "/temperature X": "sampling temperature (0 = greedy)",
    "/strategy NAME": f"decoding strategy: {' | '.join(STRATEGIES)}",
    "/stats": "statistics of the last answer",
    "/help": "this list",
    "/quit": "leave (also Ctrl-D)",
}
HEALTH_EVERY_S = 2.0  # how often the ring's health is polled during an answer


class ChatError(FlowSpecError):
    """The API refused a request or the stream broke."""


@dataclass
class ChatOptions:
    """What each request asks for; slash commands change it."""

    temperature: float | None = None  # None: the topology's default
    strategy: str | None = None  # None: the topology's default
    max_tokens: int | None = None  # None: the topology's default
    system: str | None = None  # system prompt, or None


# ---------------------------------------------------------------------------- client
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
                    raise ChatError(f"GET /v1/models: {r.status}: {_message(body)}")
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
                    raise ChatError(f"{r.status}: {_message(await _json(r))}")
                async for line in r.content:
                    line = line.strip()
                    if not line.startswith(b"data:"):
                        continue
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return
                    chunk = json.loads(data)
                    if chunk.get("error"):
                        raise ChatError(_message(chunk))
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


def _message(body: dict[str, Any]) -> str:
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


# ----------------------------------------------------------------------------- state
@dataclass
class Turn:
    """One answer as it streams in."""

    answer: str = ""  # text so far
    stats: dict[str, Any] = field(default_factory=dict)  # latest FlowSpec statistics (live, then final)
    final: bool = False  # stats are the request's final statistics
    finish: str | None = None  # finish reason once known
    health: dict[str, Any] | None = None  # latest GET /health body
    t0: float = field(default_factory=time.perf_counter)  # when the request was sent

    def apply(self, chunk: dict[str, Any]) -> str:
        """Take a stream chunk; return its new text."""
        delta = ""
        for c in chunk.get("choices") or []:
            delta += (c.get("delta") or {}).get("content") or ""
            if c.get("finish_reason"):
                self.finish = c["finish_reason"]
        self.answer += delta
        fs = chunk.get("flowspec")
        if isinstance(fs, dict):
            self.stats = fs
            self.final = self.finish is not None
        return delta


def summary_line(t: Turn) -> str:
    s = t.stats
    parts = [f"{s.get('new_tokens', 0)} tokens", f"{s.get('tokens_per_s', 0.0):.1f} tok/s",
             f"{s.get('mean_accepted', 0.0):.2f} accepted/verify",
             f"tree {s.get('drafted', 0)} drafted, {s.get('pruned', 0)} pruned"]
    if t.finish:
        parts.append(f"finish: {t.finish}")
    return "[" + " · ".join(parts) + "]"


def health_text(h: dict[str, Any] | None) -> tuple[str, str]:
    """(text, rich style) of the ring's health."""
    if h is None:
        return "ring: ?", "dim"
    nodes = h.get("nodes") or []
    up = sum(1 for n in nodes if n.get("status") == "up")
    if h.get("formed"):
        return f"ring ok: {up}/{len(nodes)} nodes up", "green"
    return f"ring unavailable: {h.get('error') or 'not formed'}", "bold red"


def status_panel(t: Turn) -> Any:
    """The rich panel under the answer: speed, acceptance, tree, stages, links, health."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    s = t.stats
    head = Text()
    head.append(f"{s.get('tokens_per_s', 0.0):6.1f} tok/s", "bold cyan")
    head.append(f"  {s.get('mean_accepted', 0.0):.2f} accepted/verify", "bold")
    head.append(f"  tree {s.get('drafted', 0)} drafted, {s.get('pruned', 0)} pruned")
    head.append(f"  {s.get('new_tokens', 0)} tok")
    hops = s.get("hops") or {}
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, max_width=12)
    grid.add_column(width=18)
    grid.add_column(justify="right", width=4)
    grid.add_column(no_wrap=True, max_width=24)
    grid.add_column(justify="right", no_wrap=True)
    stages = list((hops.get("stages") or {}).items())
    links = list((hops.get("links") or {}).items())
    for i in range(max(len(stages), len(links))):
        row: list[Any] = ["", "", "", "", ""]
        if i < len(stages):
            name, st = stages[i]
            busy = float(st.get("busy", 0.0))
            row[:3] = [name, ProgressBar(total=1.0, completed=min(busy, 1.0), width=18), f"{100 * busy:.0f}%"]
        if i < len(links):
            lk, lv = links[i]
            row[3:] = [lk, f"{float(lv.get('mean_ms', 0.0)):.2f} ms"]
        grid.add_row(*row)
    htext, hstyle = health_text(t.health)
    title = "flowspec" + (" (final)" if t.final else "")
    return Panel(Group(head, grid, Text(htext, style=hstyle)), title=title, title_align="left",
                 border_style="blue")


class _Tail:
    """The last lines of a renderable, so a long answer scrolls inside the live view."""

    def __init__(self, renderable: Any, max_lines: int) -> None:
        self.renderable, self.max_lines = renderable, max_lines

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.segment import Segment

        lines = console.render_lines(self.renderable, options, pad=False)
        for line in lines[-self.max_lines:]:
            yield from line
            yield Segment.line()


# ------------------------------------------------------------------------------- UI
class ChatSession:
    """The conversation and the terminal: reads input, runs turns, handles slash commands."""

    def __init__(self, client: ApiClient, opts: ChatOptions, tty: bool, runner: Any,
                 out: Any = None) -> None:
        from rich.console import Console

        self.client, self.opts, self.tty, self.runner = client, opts, tty, runner
        self.console = Console() if tty else Console(file=sys.stderr, highlight=False, soft_wrap=True)
        self.out = out or sys.stdout  # plain mode: where answers go
        self.messages: list[dict[str, str]] = []  # the conversation (without the system prompt)
        self.last: Turn | None = None  # the last answer
        self.model = "default"

    # ------------------------------------------------------------------ loop
    def loop(self, banner: str) -> None:
        from rich.markup import escape

        self.model = self.runner.run(self.client.model())
        if self.tty:
            self.console.print(f"[bold]FlowSpec chat[/] · {escape(banner)} · model {escape(self.model)}")
            self.console.print("[dim]type a message; /help for commands, Ctrl-C stops an answer, "
                               "Ctrl-D or /quit leaves[/]")
        while True:
            try:
                line = self.read()
            except EOFError:
                if self.tty:
                    self.console.print()
                break
            except KeyboardInterrupt:
                self.console.print("\n[dim](Ctrl-C stops an answer; /quit or Ctrl-D leaves)[/]")
                continue
            line = line.strip()
            if not line:
                continue
            if line.startswith("/"):
                if self.command(line):
                    break
                continue
            self.ask(line)

    def read(self) -> str:
        if self.tty:
            return self.console.input("[bold green]you>[/] ")
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line

    # -------------------------------------------------------------- commands
    def command(self, line: str) -> bool:
        """Run a slash command; True to leave."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        say = self.console.print
        from rich.markup import escape
        if cmd in ("/quit", "/exit", "/q"):
            return True
        if cmd == "/reset":
            self.messages.clear()
            self.last = None
            say("[dim]conversation cleared[/]")
        elif cmd == "/temperature":
            try:
                v = float(arg)
                if not 0.0 <= v <= 2.0:
                    raise ValueError
            except ValueError:
                say(f"[red]/temperature needs a number from 0 to 2, not {escape(repr(arg))}[/]")
                return False
            self.opts.temperature = v
            say(f"[dim]temperature {v:g}[/]")
        elif cmd == "/strategy":
            if arg not in STRATEGIES:
                say(f"[red]unknown strategy {escape(repr(arg))}; choose one of {', '.join(STRATEGIES)}[/]")
                return False
            self.opts.strategy = arg
            say(f"[dim]strategy {arg}[/]")
        elif cmd == "/stats":
            self.show_stats()
        elif cmd == "/help":
            for k, v in COMMANDS.items():
                say(f"  [bold]{k:<16}[/] {v}")
        else:
            say(f"[red]unknown command {escape(cmd)}[/]; commands: {', '.join(c.split()[0] for c in COMMANDS)}")
        return False

    def show_stats(self) -> None:
        t = self.last
        if t is None or not t.stats:
            self.console.print("[dim]no answer yet[/]")
            return
        s = t.stats
        self.console.print(status_panel(t))
        src = s.get("source") or {}
        details = [f"strategy {s.get('strategy', '?')}", f"prompt {s.get('prompt_tokens', '?')} tokens",
                   f"prefill {s.get('prefill_s', 0):.3f} s", f"decode {s.get('decode_s', 0):.3f} s",
                   f"draft {src.get('draft_s', 0):.3f} s", f"verify {src.get('verify_s', 0):.3f} s",
                   f"wait {src.get('wait_s', 0):.3f} s", f"verifications {s.get('verifications', 0)}",
                   f"tau {s.get('tau', 0)}"]
        self.console.print("  " + " · ".join(details), soft_wrap=False)

    # ------------------------------------------------------------------ turns
    def request_body(self) -> dict[str, Any]:
        msgs = ([{"role": "system", "content": self.opts.system}] if self.opts.system else []) + self.messages
        body: dict[str, Any] = {"model": self.model, "messages": msgs}
        for k, v in (("temperature", self.opts.temperature), ("strategy", self.opts.strategy),
                     ("max_tokens", self.opts.max_tokens)):
            if v is not None:
                body[k] = v
        return body

    def ask(self, text: str) -> None:
        from rich.markup import escape

        self.messages.append({"role": "user", "content": text})
        turn = Turn()
        stopped = False
        try:
            self.runner.run(self._turn(turn))
        except KeyboardInterrupt:
            stopped = True
        except ChatError as e:
            if turn.answer:
                self._show_answer(turn, stopped=False)
            self.console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
            if not turn.answer:
                self.messages.pop()  # nothing came back: the question is not part of the conversation
                return
        else:
            self._show_answer(turn, stopped=False)
        if stopped:
            self._show_answer(turn, stopped=True)
        self.last = turn
        if turn.answer:
            self.messages.append({"role": "assistant", "content": turn.answer})
        else:
            self.messages.pop()

    def _show_answer(self, t: Turn, stopped: bool) -> None:
        if self.tty:
            from rich.markdown import Markdown

            if t.answer:
                self.console.print(Markdown(t.answer))
            line = summary_line(t) if t.stats else ""
            if stopped:
                line = (line + " " if line else "") + "[stopped]"
            if line:
                self.console.print(line, style="dim", markup=False)
        else:
            self.out.write("\n")
            self.out.flush()
            line = summary_line(t) if t.stats else "[no statistics]"
            print(line + (" [stopped]" if stopped else ""), file=sys.stderr, flush=True)

    async def _turn(self, t: Turn) -> None:
        body = self.request_body()
        if not self.tty:
            async for chunk in self.client.stream(body):
                delta = t.apply(chunk)
                if delta:
                    self.out.write(delta)
                    self.out.flush()
            with contextlib.suppress(ChatError):
                _, t.health = await self.client.health()
            return
        from rich.console import Group
        from rich.live import Live
        from rich.markdown import Markdown
        from rich.spinner import Spinner

        def view() -> Any:
            panel = status_panel(t)
            room = max(3, self.console.size.height - 9 - len((t.stats.get("hops") or {}).get("stages") or {}))
            top = _Tail(Markdown(t.answer), room) if t.answer else Spinner("dots", text="thinking ...")
            return Group(top, panel)

        with Live(view(), console=self.console, refresh_per_second=10, transient=True,
                  auto_refresh=True) as live:
            poller = asyncio.create_task(self._poll_health(t, lambda: live.update(view())))
            try:
                async for chunk in self.client.stream(body):
                    t.apply(chunk)
                    live.update(view())
            finally:
                poller.cancel()
                await asyncio.gather(poller, return_exceptions=True)

    async def _poll_health(self, t: Turn, refresh: Callable[[], None]) -> None:
        while True:
            try:
                _, t.health = await self.client.health()
            except ChatError as e:
                t.health = {"formed": False, "error": str(e), "nodes": []}
            refresh()
            await asyncio.sleep(HEALTH_EVERY_S)


class _Runner:
    """asyncio.Runner for Python 3.10: one loop for many run() calls; Ctrl-C cancels the running one."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def __enter__(self) -> "_Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        pending = asyncio.all_tasks(self.loop)
        for t in pending:
            t.cancel()
        if pending:
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()

    def run(self, coro: Any) -> Any:
        task = self.loop.create_task(coro)
        try:
            return self.loop.run_until_complete(task)
        except KeyboardInterrupt:
            task.cancel()
            with contextlib.suppress(BaseException):
                self.loop.run_until_complete(task)
            raise


def _block_sigint() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


def _keep_sigint_on_main_thread(runner: Any) -> None:
    """Worker threads (aiohttp's name lookups) block SIGINT, so a Ctrl-C at the prompt is
    delivered to the main thread, whose readline then raises KeyboardInterrupt at once."""
    import concurrent.futures

    get_loop = getattr(runner, "get_loop", None)
    if get_loop is not None:
        get_loop().set_default_executor(
            concurrent.futures.ThreadPoolExecutor(4, thread_name_prefix="chat-io", initializer=_block_sigint))


def _runner() -> Any:
    return asyncio.Runner() if hasattr(asyncio, "Runner") else _Runner()


# ---------------------------------------------------------------------- ring startup
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
                raise FlowSpecError(f"the API at {client.base} refused the API key: {_message(h)}")
            if "formed" not in h:
                raise FlowSpecError(f"{client.base}/health answered HTTP {status} but is not a FlowSpec API; "
                                    "is another program using that port?")
            last = h.get("error") or "the ring is still forming"
        except ChatError as e:
            last = str(e)
        await asyncio.sleep(0.3)
    raise FlowSpecError(f"the ring did not become ready within {timeout:.0f} s: {last}")


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def cmd_chat(args: argparse.Namespace) -> int:
    from rich.console import Console

    if bool(args.topology) == bool(args.url):
        raise FlowSpecError("chat needs either --topology FILE (start or join a ring) or --url URL "
                            "(a running HTTP API), not both or neither")
    opts = ChatOptions(args.temperature, args.strategy, args.max_tokens, args.system)
    if opts.strategy is not None and opts.strategy not in STRATEGIES:
        raise FlowSpecError(f"unknown strategy {opts.strategy!r}; choose one of {', '.join(STRATEGIES)}")
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    err = Console(stderr=True)
    ring = None
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}

    def leave(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    for s in old:
        signal.signal(s, leave)
    try:
        if args.url:
            url, key, banner = args.url, args.api_key or os.environ.get("FLOWSPEC_API_KEY"), normalize_url(args.url)
            topo = None
        else:
            topo = Topology.load(args.topology)
            url, key = api_url(topo), args.api_key or topo.api_key()
            banner = f"ring {topo.cluster!r} ({len(topo.stages)} stages)"
        with _runner() as runner:
            _keep_sigint_on_main_thread(runner)
            client = ApiClient(url, key)
            runner.run(client.__aenter__())
            try:
                if topo is not None:
                    ring = _start_or_join(runner, client, topo, args, err)
                else:
                    status, h = runner.run(client.health())
                    if status == 401:
                        raise FlowSpecError(f"the API at {client.base} refused the API key: {_message(h)}")
                    if status != 200:
                        err.print(f"the ring is not ready: {h.get('error') or _message(h)}", style="yellow",
                                  markup=False)
                ChatSession(client, opts, tty, runner).loop(banner)
            finally:
                runner.run(client.__aexit__())
    finally:
        if ring is not None:
            err.print("[dim]stopping the ring ...[/]")
            ring.stop()
        for s, h in old.items():
            signal.signal(s, h)
    return 0


def _start_or_join(runner: Any, client: ApiClient, topo: Topology, args: argparse.Namespace,
                   err: Any) -> Any:
    """Join the ring when its API answers, else start its local nodes; the LocalRing or None."""
    from rich.markup import escape

    from .testbed import local_ring_for

    try:
        runner.run(client.health())
        answering = True
    except ChatError:
        answering = False
    if answering:
        runner.run(wait_ready(client, args.timeout, None))
        return None
    src = topo.source
    if _port_open(src.host, src.port):
        raise FlowSpecError(f"the source {src.name!r} answers at {src.host}:{src.port} but its HTTP API at "
                            f"{client.base} does not; start it without --no-api, or use --url")
    ring = local_ring_for(args, topo, [])  # emulated links and CPU caps when the topology has a testbed
    try:
        ring.start()  # nodes run in their own session: Ctrl-C stops an answer, not the ring
        with err.status(escape(f"starting {len(ring.procs)} nodes of {topo.origin} (logs in {ring.log_dir}) ...")):
            h = runner.run(wait_ready(client, args.timeout, ring.check_alive))
    except BaseException:
        ring.stop()
        raise
    err.print(f"[dim]ring formed: {' -> '.join(n['name'] for n in h.get('nodes') or [])}; "
              f"API at {client.base}[/]")
    return ring


def add_chat_command(sub: Any) -> None:
    c = sub.add_parser("chat", help="chat with a ring: start or join --topology FILE, or use --url URL")
    c.add_argument("--topology", help="YAML topology: join its ring, or start its local nodes")
    c.add_argument("--url", help="a running HTTP API, e.g. http://127.0.0.1:8000")
    c.add_argument("--api-key", default=None, help="Bearer key of the API (default: the topology's, "
                   "or $FLOWSPEC_API_KEY with --url)")
    c.add_argument("--system", default=None, help="system prompt")
    c.add_argument("--temperature", type=float, default=None)
    c.add_argument("--strategy", default=None, help=" | ".join(STRATEGIES))
    c.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default: the topology's)")
    c.add_argument("--threads", type=int, default=0, help="torch threads per started node")
    c.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the ring to form")
    c.set_defaults(func=cmd_chat)
