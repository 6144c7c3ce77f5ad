"""Line editing and history at the chat's prompt in a terminal, with the stdlib ``readline``.

Within :func:`line_editing` the prompt edits the line (arrows, Home/End, Ctrl-A/E/W ...),
recalls earlier lines (Up/Down, Ctrl-R) and keeps them across chats in
``$XDG_STATE_HOME/flowspec/chat_history`` (``~/.local/state/...`` when that is unset; the
file is the user's alone: messages may be private). Best effort: without ``readline`` (some
Python builds) or without a writable home the chat works as before, without history.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterator

log = logging.getLogger(__name__)

HISTORY_LENGTH = 1000  # lines kept in the history file
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def history_path() -> Path:
    """Where the chat's history lives: $XDG_STATE_HOME/flowspec/chat_history, else ~/.local/state/..."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "flowspec" / "chat_history"


@contextlib.contextmanager
def line_editing(enabled: bool, path: Path | None = None) -> Iterator[bool]:
    """Turn readline on for input() within (read the history first, write it back after);
    yields whether it is on. Off when not enabled (stdin is not a terminal) or unavailable."""
    if not enabled:
        yield False
        return
    try:
        import readline
    except ImportError:
        log.info("no readline module in this Python: the chat prompt has no line editing or history")
        yield False
        return
    path = path or history_path()
    try:
        readline.read_history_file(str(path))
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("chat history %s not read: %s", path, e.strerror or e)
    readline.set_history_length(HISTORY_LENGTH)
    try:
        yield True
    finally:
        _save(readline, path)


def _save(readline: Any, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))  # created private, before readline writes it
        readline.write_history_file(str(path))
        os.chmod(path, 0o600)  # and kept private
    except OSError as e:
        log.warning("chat history not saved to %s: %s", path, e.strerror or e)


def read_line(console: Any, markup: str) -> str:
    """input() with a rich-markup prompt. Under readline the prompt goes to input() itself with
    its colour codes marked as invisible (\\001 ... \\002), so that editing and recalled lines
    redraw in the right columns. EOFError at the end of input, KeyboardInterrupt on Ctrl-C."""
    with console.capture() as captured:
        console.print(markup, end="")
    prompt = captured.get()
    if "readline" in sys.modules:
        prompt = _ANSI.sub(lambda m: f"\001{m.group(0)}\002", prompt)
    return input(prompt)
