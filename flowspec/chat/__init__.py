"""`flowspec chat`: a multi-turn chat with a ring, through the source's HTTP API.

``--topology FILE`` joins the ring when its API answers, else starts the topology's local
nodes (and stops them on exit); ``--url URL`` talks to a running API. In a terminal the
answer streams in as Markdown in a live view, above a status panel (tokens/s, accepted
tokens per verification, draft tree, each stage's busy fraction, each link's latency,
ring health). Without a terminal it prints plain text and one stats line per answer.

Ctrl-C stops the current answer (the HTTP stream is closed, which cancels the request on
the ring); Ctrl-D or ``/quit`` leaves.

client.py (the HTTP API: health, models, streamed completions, waiting for the ring),
turn.py (one answer as it streams in), view.py (the terminal: rich rendering, prompts,
notices), session.py (the conversation, slash commands, the loop), runner.py (the event
loop, Ctrl-C), cli.py (the command: arguments, joining or starting the ring).
"""

from __future__ import annotations

from .cli import add_chat_command, cmd_chat
from .client import ApiClient, ChatError, api_url, error_message, normalize_url, wait_ready
from .runner import keep_sigint_on_main_thread, new_runner
from .session import COMMANDS, HEALTH_EVERY_S, ChatOptions, ChatSession
from .turn import Turn
from .view import ChatView, RingNotices, health_text, status_panel, summary_line

__all__ = ["COMMANDS", "HEALTH_EVERY_S", "ApiClient", "ChatError", "ChatOptions", "ChatSession", "ChatView",
           "RingNotices", "Turn", "add_chat_command", "api_url", "cmd_chat", "error_message", "health_text",
           "keep_sigint_on_main_thread", "new_runner", "normalize_url", "status_panel", "summary_line",
           "wait_ready"]
