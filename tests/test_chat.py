"""`flowspec chat`: under a pseudo-terminal (pexpect) and with piped stdin.

One chat runs in a pseudo-terminal of 80 columns and starts the ring of a fresh topology
itself (no cluster key in the environment: a random one is made); while it runs, piped
chats join the same ring through ``--url`` and ``--topology``; ``/quit`` stops the ring.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from ring_helpers import tiny_tok_model, write_topology  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow

FLOWSPEC = [sys.executable, "-m", "flowspec.cli"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\r")
MOVES = re.compile(r"\x1b\[[0-9;]*[ABCDEFGHJKf]|\r|\n")
MAX_TOKENS = 16


def chat_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TERM="xterm-256color", COLUMNS="80", LINES="40",
               XDG_STATE_HOME=str(Path(tempfile.gettempdir()) / "flowspec-test-state"))  # not the user's history
    for k in ("FLOWSPEC_CLUSTER_KEY", "FLOWSPEC_API_KEY"):
        env.pop(k, None)
    return env


def screen(text: str) -> str:
    """Terminal output without escape sequences, whitespace collapsed."""
    return " ".join(ANSI.sub("", text).split())


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return True
    except OSError:
        return False


def greedy_answer(model: Path, question: str, n: int) -> str:
    from flowspec.model.pipeline import LocalPipeline, greedy_generate
    from flowspec.model.tokenizer import Tokenizer

    tok = Tokenizer(model)
    pipe = LocalPipeline.load(model, 1, dtype="float32", max_context=512)
    res = greedy_generate(pipe, tok.encode_chat([{"role": "user", "content": question}]), n, tok.eos_ids)
    return tok.decode(res.token_ids)


@pytest.fixture(scope="module")
def tty_chat(tiny_tok_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A chat in a pseudo-terminal that started the ring of a fresh topology."""
    import pexpect
    import yaml

    folder = tmp_path_factory.mktemp("chat_ring")
    path = write_topology(folder, 3, tiny_tok_model, strategy="flowspec")
    topo = yaml.safe_load(path.read_text())
    child = pexpect.spawn(FLOWSPEC[0], FLOWSPEC[1:] + ["chat", "--topology", str(path), "--max-tokens",
                                                       str(MAX_TOKENS)],
                          env=chat_env(), dimensions=(40, 80), encoding="utf-8", timeout=120,
                          cwd=str(folder), preexec_fn=_default_sigint)
    log: list[str] = []
    child.logfile_read = _Sink(log)
    try:
        child.expect("you>")
        yield {"child": child, "path": path, "log": log, "model": tiny_tok_model,
               "url": f"http://127.0.0.1:{topo['api']['port']}", "ports": [n["port"] for n in topo["nodes"]] + [topo["api"]["port"]]}
    finally:
        if child.isalive():
            child.sendline("/quit")
            try:
                child.expect(pexpect.EOF, timeout=20)
            except pexpect.TIMEOUT:
                child.terminate(force=True)
        child.close()


class _Sink:
    """pexpect logfile that keeps everything the chat wrote."""

    def __init__(self, out: list[str]) -> None:
        self.out = out

    def write(self, s: str) -> None:
        self.out.append(s)

    def flush(self) -> None:
        pass


def _default_sigint() -> None:
    """Run from a background job, the test runner may ignore SIGINT, and children inherit
    that; a terminal program under test must get Ctrl-C as a user's terminal gives it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_tty_chat_answers_with_stats(tty_chat: dict[str, Any]) -> None:
    child = tty_chat["child"]
    head = screen("".join(tty_chat["log"]))
    assert "FlowSpec chat" in head and "ring formed" in head
    start = len(tty_chat["log"])
    child.sendline("Hello, who are you?")
    child.expect(r"accepted/verify.*\n")
    child.expect("you>")
    out = "".join(tty_chat["log"][start:])
    shown = screen(out)
    want = greedy_answer(tty_chat["model"], "Hello, who are you?", MAX_TOKENS)
    words = [w for w in want.split() if w.isalnum()][:3]
    assert words and all(w in shown for w in words), (words, shown)
    assert re.search(rf"\[{MAX_TOKENS} tokens · [0-9.]+ tok/s · [0-9.]+ accepted/verify · tree \d+ drafted, "
                     r"\d+ pruned", shown), shown
    assert "flowspec" in shown and "stage1" in shown and "stage2" in shown  # the live status panel
    pieces = [ANSI.sub("", x) for x in MOVES.split(out)]  # text between cursor movements
    assert max(len(x) for x in pieces) <= 80, "wider than 80 columns"
    child.sendline("/stats")
    child.expect("ring ok: 3/3 nodes up")
    child.expect("you>")
    child.sendintr()  # Ctrl-C at the prompt does not leave
    child.expect("Ctrl-C stops an answer")
    child.sendline("/temperature lots")
    child.expect("needs a number")
    child.expect("you>")


def test_piped_chat_over_url(tty_chat: dict[str, Any]) -> None:
    q = "What is two plus two?"
    r = subprocess.run(FLOWSPEC + ["chat", "--url", tty_chat["url"] + "/v1", "--max-tokens", str(MAX_TOKENS)],
                       input=f"{q}\n/strategy nonsense\n/strategy autoregressive\n{q}\n/reset\n/stats\n/quit\n",
                       capture_output=True, text=True, env=chat_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    want = greedy_answer(tty_chat["model"], q, MAX_TOKENS)
    # the same answer twice (greedy; the second turn has the first in its context, so compare the first)
    assert r.stdout.startswith(want + "\n"), (r.stdout, want)
    assert "\x1b[" not in r.stdout  # plain text without a terminal
    stats = [line for line in r.stderr.splitlines() if line.startswith("[")]
    assert len(stats) == 2 and all(f"{MAX_TOKENS} tokens" in s and "tok/s" in s for s in stats), r.stderr
    assert "unknown strategy 'nonsense'" in r.stderr
    assert "no answer yet" in r.stderr  # /stats after /reset
    assert "Traceback" not in r.stderr


def test_piped_chat_joins_a_running_ring(tty_chat: dict[str, Any]) -> None:
    r = subprocess.run(FLOWSPEC + ["chat", "--topology", str(tty_chat["path"]), "--max-tokens", "4"],
                       input="Hi\n", capture_output=True, text=True, env=chat_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "4 tokens" in r.stderr and r.stdout.strip()
    assert "starting" not in r.stderr  # it joined: nothing was started


def test_chat_errors_are_messages(tmp_path: Path) -> None:
    r = subprocess.run(FLOWSPEC + ["chat"], capture_output=True, text=True, env=chat_env(), timeout=60)
    assert r.returncode == 2 and "--topology FILE" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(FLOWSPEC + ["chat", "--url", "http://127.0.0.1:9"], input="hi\n", capture_output=True,
                       text=True, env=chat_env(), timeout=60)
    assert r.returncode == 1 and "does not answer" in r.stderr and "Traceback" not in r.stderr  # runtime: 1


def test_tty_quit_stops_the_ring(tty_chat: dict[str, Any]) -> None:
    """Runs last: /quit ends the chat and stops the nodes it started."""
    import pexpect

    child = tty_chat["child"]
    child.sendline("/quit")
    child.expect("stopping the ring")
    child.expect(pexpect.EOF, timeout=30)
    child.close()
    assert child.exitstatus == 0
    deadline = time.monotonic() + 10
    while any(listening(p) for p in tty_chat["ports"]):
        assert time.monotonic() < deadline, "the ring's nodes are still running"
        time.sleep(0.2)


def test_a_broken_ring_during_an_answer_reads_as_held_not_failed() -> None:
    """While an answer streams, the source holds it through a broken ring (resume window):
    the panel says so; between answers the same health reads as unavailable."""
    from rich.console import Console

    from flowspec.chat import Turn, health_text, status_panel

    broken = {"formed": False, "error": "node 'stage2' is unreachable: connection refused", "nodes": []}
    text, style = health_text(broken, answering=True)
    assert text.startswith("ring degraded: node 'stage2' is unreachable") and "resumes" in text
    assert style == "bold yellow"
    assert health_text(broken) == ("ring unavailable: node 'stage2' is unreachable: connection refused",
                                   "bold red")
    assert health_text({"formed": True, "nodes": [{"status": "up"}] * 4}, answering=True)[0] == \
        "ring ok: 4/4 nodes up"
    console = Console(width=200, record=True)
    console.print(status_panel(Turn(health=broken, streaming=True)))
    assert "ring degraded" in console.export_text()
    console.print(status_panel(Turn(health=broken)))
    assert "ring unavailable" in console.export_text()
