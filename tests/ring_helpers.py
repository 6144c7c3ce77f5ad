"""Helpers for tests that run a real ring of `flowspec node` processes on loopback.

* ``free_ports(n)``: n distinct free TCP ports on 127.0.0.1 (bound to port 0 together, then
  released);
* ``write_topology(folder, n_nodes, target, ...)``: a topology YAML of one source and
  ``n_nodes - 1`` stages on 127.0.0.1 with free ports, ``layers: auto``;
* ``running_ring(path)``: a context manager that starts every node with ``LocalRing``,
  waits until the ring is formed and always stops every node again (SIGTERM, then SIGKILL,
  and a stopped process is continued first), so that no node process outlives it;
* ``build_tiny_tok_model(folder)`` / the ``tiny_tok_model`` fixture: a tiny random Llama with
  the default model's tokenizer (vocabulary 49152, eos 2), so a source node can load it;
* ``pids_alive(pids)``: which of these processes still exist (zombies count as gone);
* ``impersonate(ring, model, as_node, talk)``: speak to ``as_node``'s successor as
  ``as_node`` (authenticated, the right HELLO) while the real node is stopped.

Import them in a test module: ``from ring_helpers import running_ring, tiny_tok_model``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Iterator

import pytest
import yaml

from flowspec.config import Topology
from flowspec.runtime.client import RingClient, wait_formed
from flowspec.runtime.launcher import LocalRing

from conftest import build_tiny_hf_model, save_tiny_model, tiny_hf_config

KEY_ENV = "FLOWSPEC_CLUSTER_KEY"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
TINY_TOK_LAYERS = 6
TINY_TOK_VOCAB = 49152  # SmolLM2's vocabulary, so its tokenizer fits


# ------------------------------------------------------------------------------- ports
def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports that were free a moment ago (all bound at once, so never repeated)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


# ---------------------------------------------------------------------------- topology
def write_topology(folder: Path, n_nodes: int, target: str | Path, *, name: str = "ring.yaml",
                   cluster: str = "test-ring", dtype: str = "float32", max_context: int = 512,
                   strategy: str = "autoregressive", security: dict[str, Any] | None = None,
                   decoding: dict[str, Any] | None = None, drafter: str = "lookup") -> Path:
    """A topology file for a source and n_nodes - 1 stages on 127.0.0.1 with free ports."""
    assert n_nodes >= 2, "a ring needs a source and at least one stage"
    ports = free_ports(n_nodes + 1)  # the last one for the HTTP API
    nodes: list[dict[str, Any]] = [{"name": "source", "host": "127.0.0.1", "port": ports[0], "role": "source"}]
    for i in range(1, n_nodes):
        nodes.append({"name": f"stage{i}", "host": "127.0.0.1", "port": ports[i], "role": "stage",
                      "layers": "auto"})
    data: dict[str, Any] = {
        "cluster": cluster,
        "model": {"target": str(target), "drafter": drafter, "dtype": dtype, "max_context": max_context},
        "nodes": nodes,
        "api": {"host": "127.0.0.1", "port": ports[-1]},
        # resume_window_s 0: a broken ring fails its requests at once (tests of resuming set it)
        "decoding": {"strategy": strategy, "temperature": 0.0, "resume_window_s": 0, **(decoding or {})},
        "security": {"key_env": KEY_ENV, **(security or {})},
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def new_key() -> str:
    return secrets.token_hex(32)


def node_env(key: str | None) -> dict[str, str]:
    """Environment for node processes: the key (or none), offline Hugging Face, no stray threads."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop(KEY_ENV, None)
    if key is not None:
        env[KEY_ENV] = key
    return env


# ------------------------------------------------------------------------------ processes
def pids_alive(pids: Iterable[int]) -> list[int]:
    """The pids of `pids` that still name a live (not zombie) process."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is a test dependency here
        psutil = None
    alive = []
    for pid in pids:
        if psutil is not None:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
            continue
        try:  # pragma: no cover
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def kill_leftovers(launcher: Any, children: Iterable[int]) -> None:
    """Test clean-up: SIGKILL a launcher's process group if it still runs, then any child left."""
    if launcher.poll() is None:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    for pid in pids_alive(children):
        os.kill(pid, signal.SIGKILL)


def wait_gone(pids: Iterable[int], timeout: float = 10.0) -> list[int]:
    """Wait until none of pids is alive; return the ones still alive at the deadline."""
    pids = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        left = pids_alive(pids)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def stop_ring(ring: LocalRing, timeout: float = 10.0) -> None:
    """Stop every node of ring; continue stopped ones first, kill what does not stop."""
    for p in ring.procs:
        if p.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.proc.pid, signal.SIGCONT)
    try:
        ring.stop(timeout)
    finally:
        for p in ring.procs:
            if p.proc.poll() is None:
                p.proc.kill()
            with contextlib.suppress(Exception):
                p.proc.wait(5)


def formed(topo: Topology, key: bytes, timeout: float, ring: LocalRing | None = None) -> dict[str, Any]:
    """Block until the ring answers that it is formed (its status), or raise."""
    alive = ring.check_alive if ring is not None else None
    return asyncio.run(wait_formed(topo, key, timeout, alive))


@contextlib.contextmanager
def running_ring(topo_path: str | Path, *, key: str | None = None, threads: int = 1,
                 node_args: Iterable[str] = ("--dtype", "float32", "--no-api"), timeout: float = 90.0,
                 log_dir: str | Path | None = None) -> Iterator[LocalRing]:
    """Start every node of the topology, wait until the ring is formed, yield the LocalRing.

    The cluster key is `key` (a fresh random one by default), also at ``ring.key``. On exit
    every node is stopped; no node process is left behind, even when the test failed."""
    topo = Topology.load(str(topo_path))
    key = key or new_key()
    ring = LocalRing(str(topo_path), topo, list(node_args), threads=threads,
                     log_dir=str(log_dir) if log_dir is not None else None, extra_env=node_env(key))
    try:
        ring.start()
        try:
            formed(topo, ring.key, timeout, ring)
        except BaseException as e:
            logs = "\n".join(f"--- {p.name} ({p.log_path}):\n{p.tail(30)}" for p in ring.procs)
            raise AssertionError(f"the ring did not form: {e}\n{logs}") from e
        yield ring
    finally:
        pids = [p.proc.pid for p in ring.procs]
        stop_ring(ring)
        left = wait_gone(pids, 5.0)
        assert not left, f"node processes left behind: {left}"


def ring_logs(ring: LocalRing) -> str:
    return "\n".join(f"--- {p.name}:\n{p.tail(40)}" for p in ring.procs)


def wait_log(ring: LocalRing, name: str, text: str, timeout: float = 5.0) -> str:
    """Wait until node `name`'s log contains text, at most `timeout` seconds; return the log
    (also after the timeout: the caller asserts on it)."""
    path = next(p.log_path for p in ring.procs if p.name == name)
    deadline = time.monotonic() + timeout
    while True:
        log = path.read_text(errors="replace")
        if text in log or time.monotonic() > deadline:
            return log
        time.sleep(0.05)


# ------------------------------------------------------------------------------- client
async def ring_generate(topo: Topology, key: bytes, request: dict[str, Any], timeout: float = 120.0
                        ) -> dict[str, Any]:
    """One request over a fresh client connection; the "done" event."""
    c = await RingClient.connect(topo, key)
    try:
        return await asyncio.wait_for(c.generate(request), timeout)
    finally:
        await c.close()


def generate(topo: Topology, key: bytes, request: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    return asyncio.run(ring_generate(topo, key, request, timeout))


# -------------------------------------------------------------------------- tiny model
def build_tiny_tok_model(folder: Path, layers: int = TINY_TOK_LAYERS, seed: int = 4321) -> Path:
    """A tiny random Llama (hidden 64, 4 heads, 2 kv heads) with SmolLM2's tokenizer files."""
    from flowspec.model.loader import resolve_model

    # conftest's tiny_llama kind (hidden 64, 4 heads, 2 kv heads, wide random weights), bigger
    cfg = tiny_hf_config("tiny_llama", vocab_size=TINY_TOK_VOCAB, max_position_embeddings=8192,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    cfg.num_hidden_layers = layers
    save_tiny_model(build_tiny_hf_model(cfg, seed=seed), folder)
    src = resolve_model("default")
    for f in TOKENIZER_FILES:
        if (src / f).is_file():
            shutil.copy(src / f, folder / f)
    return folder


@pytest.fixture(scope="session")
def tiny_tok_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session-wide tiny model with a tokenizer (6 layers, vocabulary 49152, eos 2)."""
    return build_tiny_tok_model(tmp_path_factory.mktemp("tiny_tok"))


# ------------------------------------------------------------------------- impersonation
def impersonate(ring: LocalRing, model: Path, as_node: str,
                talk: Callable[[Any], Awaitable[None]]) -> None:
    """Connect to the successor of `as_node` as `as_node` (cluster key, HELLO with the model's
    fingerprint) and run `talk(stream)`; the real `as_node` is stopped meanwhile, or it would
    reconnect at once and take its link back."""
    from flowspec.model.config import ModelConfig
    from flowspec.model.loader import model_fingerprint
    from flowspec.runtime.protocol import Frame, FrameType
    from flowspec.runtime.transport import client_auth, hello_meta, open_stream

    topo = ring.topo
    fingerprint = model_fingerprint(str(model), ModelConfig.from_file(str(model / "config.json")))
    succ = topo.successor(as_node)
    host, port = succ.address

    async def run() -> None:
        s = await open_stream(host, port, 1 << 26, 5.0, succ.name)
        try:
            await client_auth(s, ring.key)
            role = "source" if topo.node(as_node).is_source else "stage"
            await s.send(Frame(FrameType.HELLO, meta=hello_meta(topo.cluster, fingerprint, as_node, role, None)))
            f = await s.recv(5.0)
            assert f.type == FrameType.HELLO, f
            await talk(s)
        finally:
            await s.close()

    real = next(p for p in ring.procs if p.name == as_node)
    os.kill(real.proc.pid, signal.SIGSTOP)
    try:
        asyncio.run(run())
    finally:
        os.kill(real.proc.pid, signal.SIGCONT)
