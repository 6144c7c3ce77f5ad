"""The chat's terminal: rich rendering, the live answer and its status panel, prompts, notices.

In a terminal the answer streams in as Markdown in a live view above a status panel; without
one answers go as plain text to stdout and everything else to stderr. Every text the chat
shows the user is written here (the session and the command only say what happened).
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any, Callable, Iterable, Iterator, Mapping, TextIO

from .turn import Turn


def summary_line(t: Turn) -> str:
    s = t.stats
    parts = [f"{s.get('new_tokens', 0)} tokens", f"{s.get('tokens_per_s', 0.0):.1f} tok/s",
             f"{s.get('mean_accepted', 0.0):.2f} accepted/verify",
             f"tree {s.get('drafted', 0)} drafted, {s.get('pruned', 0)} pruned"]
    if t.finish:
        parts.append(f"finish: {t.finish}")
    return "[" + " · ".join(parts) + "]"


def health_text(h: dict[str, Any] | None, answering: bool = False) -> tuple[str, str]:
    """(text, rich style) of the ring's health; `answering`: an answer is streaming, so a
    broken ring holds it (the source resumes it within decoding.resume_window_s)."""
    if h is None:
        return "ring: ?", "dim"
    nodes = h.get("nodes") or []
    up = sum(1 for n in nodes if n.get("status") == "up")
    if h.get("formed"):
        return f"ring ok: {up}/{len(nodes)} nodes up" + _replaced(nodes) + _waiting(h.get("spares") or []), "green"
    why = h.get("error") or "not formed"
    if answering:
        return (f"ring degraded: {why}; the answer is held and resumes when the ring is whole again",
                "bold yellow")
    return f"ring unavailable: {why}", "bold red"


def _replaced(nodes: list[dict[str, Any]]) -> str:
    """' (spare1 holds stage2's layers 10-19)' for the spares serving a dead stage's place."""
    said = []
    for n in nodes:
        if n.get("in_place_of"):
            lay = n.get("layers")
            what = f"layers {lay[0]}-{lay[1] - 1}" if isinstance(lay, list) and len(lay) == 2 else "place"
            said.append(f"{n.get('name')} holds {n['in_place_of']}'s {what}")
    return f" ({'; '.join(said)})" if said else ""


def _waiting(spares: list[dict[str, Any]]) -> str:
    """'; 1 spare waiting: spare1' for the spares connected to the source."""
    names = [str(s.get("name")) for s in spares if s.get("status") == "waiting"]
    return f"; {len(names)} spare{'s' if len(names) != 1 else ''} waiting: {', '.join(names)}" if names else ""


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
    htext, hstyle = health_text(t.health, answering=t.streaming)
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


class ChatView:
    """The chat's side of the terminal: a rich console in a terminal, plain text without one."""

    def __init__(self, tty: bool, out: TextIO | None = None) -> None:
        from rich.console import Console

        self.tty = tty  # a terminal: live view and markup; else plain text
        self.console = Console() if tty else Console(file=sys.stderr, highlight=False, soft_wrap=True)
        self.out = out or sys.stdout  # plain mode: where answers go

    # ---------------------------------------------------------------- input
    def welcome(self, banner: str, model: str) -> None:
        """The first lines in a terminal (none without one)."""
        from rich.markup import escape

        if self.tty:
            self.console.print(f"[bold]FlowSpec chat[/] · {escape(banner)} · model {escape(model)}")
            self.console.print("[dim]type a message; /help for commands, Ctrl-C stops an answer, "
                               "Ctrl-D or /quit leaves[/]")

    def read(self) -> str:
        """One line of input; EOFError at its end, KeyboardInterrupt on Ctrl-C."""
        if self.tty:
            from .history import read_line

            return read_line(self.console, "[bold green]you>[/] ")  # line editing and history: history.py
        line = sys.stdin.readline()
        if not line:
            raise EOFError
        return line

    def end_of_input(self) -> None:
        if self.tty:
            self.console.print()

    def interrupted_at_prompt(self) -> None:
        self.console.print("\n[dim](Ctrl-C stops an answer; /quit or Ctrl-D leaves)[/]")

    # ------------------------------------------------------------- commands
    def cleared(self) -> None:
        self.console.print("[dim]conversation cleared[/]")

    def bad_temperature(self, arg: str, allowed: str) -> None:
        """`allowed`: what a request's temperature may be ("a number in [0, 2]")."""
        from rich.markup import escape

        self.console.print(f"[red]/temperature needs {escape(allowed)}, not {escape(repr(arg))}[/]")

    def temperature_set(self, v: float) -> None:
        self.console.print(f"[dim]temperature {v:g}[/]")

    def unknown_strategy(self, arg: str, choices: Iterable[str]) -> None:
        from rich.markup import escape

        self.console.print(f"[red]unknown strategy {escape(repr(arg))}; choose one of {', '.join(choices)}[/]")

    def strategy_set(self, name: str) -> None:
        self.console.print(f"[dim]strategy {name}[/]")

    def show_help(self, commands: Mapping[str, str]) -> None:
        for k, v in commands.items():
            self.console.print(f"  [bold]{k:<16}[/] {v}")

    def unknown_command(self, cmd: str, commands: Iterable[str]) -> None:
        from rich.markup import escape

        self.console.print(f"[red]unknown command {escape(cmd)}[/]; commands: "
                           f"{', '.join(c.split()[0] for c in commands)}")

    def show_stats(self, t: Turn | None) -> None:
        """/stats: the status panel of the last answer and the details of its statistics."""
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

    # -------------------------------------------------------------- answers
    def write(self, delta: str) -> None:
        """Plain mode: new text of the answer, as it arrives."""
        if delta:
            self.out.write(delta)
            self.out.flush()

    @contextlib.contextmanager
    def live(self, t: Turn) -> Iterator[Callable[[], None]]:
        """In a terminal: the answer so far above its status panel, redrawn by the callable yielded."""
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
            yield lambda: live.update(view())

    def show_answer(self, t: Turn, stopped: bool) -> None:
        """The answer once it ended (or was stopped) and its summary line."""
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
            self.console.print(line + (" [stopped]" if stopped else ""), markup=False)  # stderr in plain mode

    def show_error(self, message: str) -> None:
        from rich.markup import escape

        self.console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)


class RingNotices:
    """What `flowspec chat` says on stderr around the chat: the ring's start, readiness and stop."""

    def __init__(self) -> None:
        from rich.console import Console

        self.console = Console(stderr=True)  # stderr, in a terminal or not

    def not_ready(self, reason: str) -> None:
        self.console.print(f"the ring is not ready: {reason}", style="yellow", markup=False)

    def starting(self, nodes: int, origin: Any, log_dir: Any) -> Any:
        """A spinner while the nodes start (a context manager)."""
        from rich.markup import escape

        return self.console.status(escape(f"starting {nodes} nodes of {origin} (logs in {log_dir}) ..."))

    def formed(self, names: Iterable[str], base: str) -> None:
        self.console.print(f"[dim]ring formed: {' -> '.join(names)}; API at {base}[/]")

    def stopping(self) -> None:
        self.console.print("[dim]stopping the ring ...[/]")
