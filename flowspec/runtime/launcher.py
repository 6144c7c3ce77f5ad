"""Start the nodes of a topology that live on this machine as separate processes, and stop them."""

from __future__ import annotations

import ctypes
import logging
import os
import errno
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Topology, is_local_host
from ..errors import FlowSpecError

log = logging.getLogger(__name__)


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the child gets SIGTERM when the launcher dies, so no node outlives it."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


RESTART_FIRST_S = 1.0  # pause before restarting a node that exited (doubles per quick failure) ...
RESTART_MAX_S = 30.0  # ... up to this
STABLE_S = 60.0  # a node that ran this long before it exited is restarted after the first pause again


@dataclass
class NodeProcess:
    name: str  # node name
    proc: subprocess.Popen[bytes]  # the running `flowspec node`
    log_path: Path  # its stderr
    started: float = field(default_factory=time.monotonic)  # when it was started (monotonic seconds)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])


def ports_in_use(topo: Topology, names: list[str], api: bool) -> list[str]:
    """The listening addresses of these nodes (and of the API) that something already holds."""
    wanted = [(n.name, n.host, n.port) for n in topo.nodes if n.name in names]
    if api:
        wanted.append(("the HTTP API", topo.api.host, topo.api.port))
    taken = []
    for who, host, port in wanted:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the nodes bind: TIME_WAIT is no obstacle
            try:
                s.bind((host, port))
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    taken.append(f"{host}:{port} ({who if who.startswith('the ') else f'node {who!r}'})")
    return taken


def check_ports_free(topo: Topology, names: list[str], api: bool) -> None:
    """FlowSpecError naming every address in use: fail before starting anything."""
    taken = ports_in_use(topo, names, api)
    if taken:
        raise FlowSpecError(
            f"{', '.join(taken)} {'is' if len(taken) == 1 else 'are'} already in use: another ring (a "
            f"`flowspec up` of this topology?) or another program holds {'it' if len(taken) == 1 else 'them'}; "
            f"stop it, or change the ports in {topo.origin}")


@dataclass
class _Backoff:
    """Restart state of one node."""

    delay: float = RESTART_FIRST_S  # the next pause before a restart
    due: float | None = None  # when the pending restart happens (None: none pending)


class LocalRing:
    """The local part of a ring: one process per node whose host is this machine."""

    def __init__(self, topo_path: str, topo: Topology, node_args: list[str] | None = None,
                 threads: int | None = None, log_dir: str | None = None,
                 extra_env: dict[str, str] | None = None) -> None:
        self.topo_path, self.topo = topo_path, topo
        self.node_args = node_args or []  # extra `flowspec node` flags (--dtype, --drafter)
        self.local = [n for n in topo.nodes if is_local_host(n.host)]
        if not self.local:
            raise FlowSpecError(f"{topo.origin}: no node of this topology lives on this machine")
        if threads is None:
            threads = topo.testbed.threads if topo.testbed else max(1, (os.cpu_count() or 1) // len(self.local))
        self.threads = threads
        self.log_dir = Path(log_dir or tempfile.mkdtemp(prefix="flowspec-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, **(extra_env or {}))
        self.procs: list[NodeProcess] = []
        self._backoff: dict[str, _Backoff] = {}  # node -> restart state (restart_dead)
        self.key = self._key()
        # the source started here serves the HTTP API unless told not to
        self.serves_api = topo.source in self.local and "--no-api" not in self.node_args
        if self.serves_api:
            topo.api_key(self.env)  # an unset api_key_env fails here, before any node starts

    def _key(self) -> bytes:
        """The cluster key; a random one for a ring whose nodes are all local and unkeyed."""
        try:
            return self.topo.cluster_key(self.env)
        except FlowSpecError:
            if len(self.local) != len(self.topo.nodes) or self.topo.security.key_file is not None:
                raise
            key = secrets.token_hex(32)
            self.env[self.topo.security.key_env] = key
            log.info("no cluster key set: using a fresh random key for this local ring")
            return key.encode()

    def start(self) -> None:
        check_ports_free(self.topo, [n.name for n in self.local], self.serves_api)
        for n in self.local:
            self.spawn(n.name, self.topo_path)
        log.info("started %d nodes; logs in %s", len(self.procs), self.log_dir)

    def spawn(self, name: str, topo_path: str, append: bool = False) -> NodeProcess:
        """Start `flowspec node` for one node, its output in the log folder (appended to on a restart)."""
        cmd = [sys.executable, "-m", "flowspec.cli", "node", "--topology", topo_path,
               "--name", name, "--threads", str(self.threads), *self.node_args]
        path = self.log_dir / f"{name}.log"
        with open(path, "ab" if append else "wb") as err:
            # own session: a Ctrl-C in the terminal reaches the launcher (up, chat, bench),
            # which stops the nodes with SIGTERM, never the nodes directly
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=subprocess.STDOUT,
                                 env=self.env, preexec_fn=_die_with_parent, start_new_session=True)
        proc = NodeProcess(name, p, path)
        self.procs.append(proc)
        return proc

    def _start_node(self, name: str) -> NodeProcess:
        """Start one node again (a restart): the same command, its log appended to."""
        return self.spawn(name, self.topo_path, append=True)

    def restart_dead(self) -> list[str]:
        """Restart the nodes that exited, each after a pause that doubles with every quick
        failure (1, 2, 4 ... 30 s; back to 1 s once a node ran STABLE_S). Returns one line
        per event (exit noticed, node restarted) for the console."""
        now = time.monotonic()
        lines: list[str] = []
        for np_ in list(self.procs):
            rc = np_.proc.poll()
            if rc is None:
                continue
            b = self._backoff.setdefault(np_.name, _Backoff())
            if b.due is None:
                ran = now - np_.started
                if ran > STABLE_S:
                    b.delay = RESTART_FIRST_S
                b.due = now + b.delay
                lines.append(f"node {np_.name!r} exited with code {rc} after {ran:.0f} s; restarting it in "
                             f"{b.delay:.0f} s (its log: {np_.log_path})")
            elif now >= b.due:
                self.procs.remove(np_)
                new = self._start_node(np_.name)
                b.delay, b.due = min(b.delay * 2, RESTART_MAX_S), None
                lines.append(f"node {np_.name!r} restarted (pid {new.proc.pid})")
        for line in lines:
            log.warning("%s", line)
        return lines

    def check_alive(self) -> None:
        for np_ in self.procs:
            rc = np_.proc.poll()
            if rc is not None:
                raise FlowSpecError(f"node {np_.name!r} exited with code {rc}; its log "
                                    f"({np_.log_path}) ends with:\n{np_.tail()}")

    def stop(self, timeout: float = 5.0) -> None:
        for np_ in self.procs:
            if np_.proc.poll() is None:
                np_.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for np_ in self.procs:
            try:
                np_.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("node %s did not stop in %.0f s; killing it", np_.name, timeout)
                np_.proc.kill()
                np_.proc.wait()

    def __enter__(self) -> "LocalRing":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
