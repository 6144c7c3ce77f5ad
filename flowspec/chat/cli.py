"""`flowspec chat`, the command: its arguments, joining or starting the ring, signals, and
the session run on one event loop.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
from typing import Any

from ..cli_common import TOPOLOGY_ENV, env_default, env_value
from ..config import STRATEGIES, Topology
from ..errors import FlowSpecError, UsageError
from ..speculative.bounds import FieldError
from ..speculative.request import check_field
from .client import ApiClient, ChatError, api_url, error_message, normalize_url, wait_ready
from .history import history_path, line_editing
from .runner import keep_sigint_on_main_thread, new_runner
from .session import ChatOptions, ChatSession
from .view import ChatView, RingNotices


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def cmd_chat(args: argparse.Namespace) -> int:
    if not args.topology and not args.url:
        args.topology = env_value(TOPOLOGY_ENV)
    if bool(args.topology) == bool(args.url):
        raise UsageError(f"chat needs either --topology FILE (start or join a ring; or ${TOPOLOGY_ENV}) or "
                         "--url URL (a running HTTP API), not both or neither")
    for flag, name, value in (("--temperature", "temperature", args.temperature),
                              ("--max-tokens", "max_new_tokens", args.max_tokens)):
        if value is not None:  # the bounds of a request's field, said before the ring starts
            try:
                check_field(name, value)
            except FieldError as e:
                raise UsageError(f"{flag}: {e.reason}") from None
    opts = ChatOptions(args.temperature, args.strategy, args.max_tokens, args.system)
    tty = sys.stdin.isatty() and sys.stdout.isatty()
    notices = RingNotices()
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
        with new_runner() as runner:
            keep_sigint_on_main_thread(runner)
            client = ApiClient(url, key)
            runner.run(client.__aenter__())
            try:
                if topo is not None:
                    ring = _start_or_join(runner, client, topo, args, notices)
                else:
                    status, h = runner.run(client.health())
                    if status == 401:
                        raise FlowSpecError(f"the API at {client.base} refused the API key: {error_message(h)}")
                    if status != 200:
                        notices.not_ready(h.get("error") or error_message(h))
                with line_editing(tty):  # readline: editing and history at a terminal's prompt
                    ChatSession(client, opts, ChatView(tty), runner).loop(banner)
            finally:
                runner.run(client.__aexit__())
    finally:
        if ring is not None:
            notices.stopping()
            ring.stop()
        for s, h in old.items():
            signal.signal(s, h)
    return 0


def _start_or_join(runner: Any, client: ApiClient, topo: Topology, args: argparse.Namespace,
                   notices: RingNotices) -> Any:
    """Join the ring when its API answers, else start its local nodes; the LocalRing or None."""
    from ..testbed import local_ring_for

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
        with notices.starting(len(ring.procs), topo.origin, ring.log_dir):
            h = runner.run(wait_ready(client, args.timeout, ring.check_alive))
    except BaseException:
        ring.stop()
        raise
    notices.formed((n["name"] for n in h.get("nodes") or []), client.base)
    return ring


def add_chat_command(sub: Any) -> None:
    c = sub.add_parser("chat", help="chat with a ring: start or join --topology FILE, or use --url URL",
                       epilog=f"At a terminal the prompt edits lines and keeps a history in {history_path()}.")
    c.add_argument("--topology", metavar="FILE",
                   help="YAML topology: join its ring, or start its local nodes (default: "
                        f"{env_default(TOPOLOGY_ENV)}, unless --url is given)")
    c.add_argument("--url", help="a running HTTP API, e.g. http://127.0.0.1:8000")
    c.add_argument("--api-key", default=None, help="Bearer key of the API (default: the topology's, "
                   "or $FLOWSPEC_API_KEY with --url)")
    c.add_argument("--system", default=None, help="system prompt (default: none)")
    c.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature, 0 greedy (default: the topology's decoding.temperature)")
    c.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="decoding strategy (default: the topology's decoding.strategy)")
    c.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default: the topology's)")
    c.add_argument("--threads", type=int, default=0, help="torch threads per started node (0: cores / nodes)")
    c.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the ring to form")
    c.set_defaults(func=cmd_chat)
