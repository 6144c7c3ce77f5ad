"""Attacks on a real ring's wire (processes on loopback), and nodes that must never join.

A proxy that speaks the framing (not the key) sits between the source and the stage: after
the handshake it flips one bit of, or replays, the first frame that carries the prompt.
The stage must close the link, the source must fail the request with the reason, no token
other than the true answer's may reach the client, and the ring must form again and
answer correctly. A node with other weights of the same architecture never joins.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from flowspec.config import Topology
from flowspec.errors import FlowSpecError
from flowspec.runtime.client import wait_formed
from flowspec.runtime.launcher import LocalRing
from flowspec.runtime.protocol import HEADER, HEADER_SIZE
from flowspec.runtime.seal import LENGTH, LENGTH_SIZE

from ring_helpers import (build_tiny_tok_model, free_ports, generate, new_key, node_env, stop_ring,  # noqa: F401
                          tiny_tok_model, wait_gone, wait_log, write_topology)

PROMPT = {"prompt_ids": [1, 504, 3458, 282, 4649, 314, 30, 198, 28, 216], "max_new_tokens": 12,
          "temperature": 0.0, "strategy": "autoregressive"}
BIG = 150  # bytes: a sealed frame this long carries a segment, not a heartbeat


class FramingProxy:
    """A TCP proxy source -> stage that knows where frames begin but holds no key.

    `arm(mode)`: the next sealed frame of at least BIG bytes from the source is altered
    ("flip": one bit in the middle of its body) or sent twice ("replay"); once."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = free_ports(1)[0]
        self.mode: str | None = None
        self.hits = 0  # frames altered or replayed
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        self._ready.wait(5)

    def arm(self, mode: str) -> None:
        self.loop.call_soon_threadsafe(setattr, self, "mode", mode)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._ready.set()
        self.loop.run_forever()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            cw.close()
            return
        back = asyncio.ensure_future(self._copy(sr, cw))
        try:
            head = await cr.readexactly(HEADER_SIZE)  # the AUTH frame, in clear
            _, _, _, _, _, mlen, plen, _ = HEADER.unpack(head)
            sw.write(head + await cr.readexactly(mlen + plen))
            while True:  # sealed frames from here on
                prefix = await cr.readexactly(LENGTH_SIZE)
                body = bytearray(await cr.readexactly(LENGTH.unpack(prefix)[0]))
                out = bytes(prefix + body)
                if self.mode is not None and len(body) >= BIG:
                    if self.mode == "flip":
                        body[len(body) // 2] ^= 0x04
                        out = bytes(prefix + body)
                    else:
                        out = out + out
                    self.mode, self.hits = None, self.hits + 1
                sw.write(out)
                await sw.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            back.cancel()
            sw.close()
            cw.close()

    @staticmethod
    async def _copy(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass


def variant(path: Path, name: str, edit: Any) -> Path:
    """A copy of a topology file with `edit(data)` applied."""
    data = yaml.safe_load(path.read_text())
    edit(data)
    out = path.with_name(name)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


@contextlib.contextmanager
def ring_of(paths: dict[str, Path], key: str, env: dict[str, str] | None = None) -> Iterator[LocalRing]:
    """Start each node from its own topology file; stop them all afterwards."""
    first = next(iter(paths.values()))
    ring = LocalRing(str(first), Topology.load(str(first)), ["--dtype", "float32", "--no-api"], threads=1,
                     extra_env={**node_env(key), **(env or {})})
    try:
        for name, p in paths.items():
            ring.spawn(name, str(p))
        yield ring
    finally:
        pids = [p.proc.pid for p in ring.procs]
        stop_ring(ring)
        assert not wait_gone(pids, 5.0)


@pytest.mark.parametrize("mode,encrypt,direction", [
    ("flip", True, "out"), ("replay", True, "out"), ("flip", False, "out"), ("flip", True, "back"),
    ("replay", True, "back"),
])
def test_altered_or_replayed_frame_closes_the_link_and_no_wrong_token_is_produced(
        tmp_path: Path, tiny_tok_model: Path, mode: str, encrypt: bool, direction: str) -> None:
    """out: the proxy sits on the source's link to the stage (prompt tokens, tree updates);
    back: on the last stage's link to the source (hidden states coming home)."""
    real = write_topology(tmp_path, 2, tiny_tok_model, security={"encrypt": encrypt})
    topo = Topology.load(str(real))
    dialed = 1 if direction == "out" else 0  # the node whose listening port the proxy stands in for
    proxy = FramingProxy(topo.nodes[dialed].port)
    key = new_key()
    via = variant(real, "via-proxy.yaml",
                  lambda d: d["nodes"][dialed].__setitem__("port", proxy.port))  # its predecessor dials the proxy
    dialer = "source" if direction == "out" else "stage1"
    receiver = "stage1" if direction == "out" else "source"
    try:
        with ring_of({"source": real, "stage1": real, dialer: via}, key) as ring:
            asyncio.run(wait_formed(topo, key.encode(), 90, ring.check_alive))
            truth = generate(topo, key.encode(), PROMPT)["token_ids"]
            assert len(truth) == PROMPT["max_new_tokens"]
            proxy.arm(mode)
            with pytest.raises(FlowSpecError) as ei:
                generate(topo, key.encode(), PROMPT)
            assert proxy.hits == 1
            msg = str(ei.value)
            closer = "'stage1' closed its link from 'source'" if direction == "out" else \
                "the source closed its link from 'stage1'"
            assert closer in msg and "failed authentication" in msg, msg
            partial = getattr(ei.value, "partial", None) or {}
            got = list(partial.get("token_ids") or [])
            assert got == truth[:len(got)]  # nothing but the true answer's tokens, if any
            log = wait_log(ring, receiver, "failed authentication")
            assert "failed authentication" in log and "Traceback" not in log
            asyncio.run(wait_formed(topo, key.encode(), 60, ring.check_alive))  # a fresh session
            assert generate(topo, key.encode(), PROMPT)["token_ids"] == truth
    finally:
        proxy.close()


def test_a_node_with_another_key_never_joins(tmp_path: Path, tiny_tok_model: Path) -> None:
    """A real stage process started with another cluster key: the handshake fails on both
    ends with a message about the key, the ring never forms, nothing is decoded."""
    mine = write_topology(tmp_path, 2, tiny_tok_model)
    theirs = variant(mine, "other-key.yaml", lambda d: d["security"].__setitem__("key_env", "OTHER_RING_KEY"))
    key = new_key()
    with ring_of({"source": mine, "stage1": theirs}, key, {"OTHER_RING_KEY": new_key()}) as ring:
        log = wait_log(ring, "stage1", "refused a connection", timeout=90)
        assert "refused a connection from" in log and "wrong cluster key" in log, log
        with pytest.raises(FlowSpecError, match="did not form"):
            asyncio.run(wait_formed(Topology.load(str(mine)), key.encode(), 3, ring.check_alive))
        src = (ring.log_dir / "source.log").read_text()
        assert "refused us" in src and "wrong cluster key" in src and "Traceback" not in src + log, src[-2000:]


def test_a_node_with_other_weights_never_joins(tmp_path: Path, tiny_tok_model: Path) -> None:
    other = build_tiny_tok_model(tmp_path / "other-weights", seed=999)  # same architecture
    mine = write_topology(tmp_path, 2, tiny_tok_model)
    theirs = variant(mine, "other.yaml", lambda d: d["model"].__setitem__("target", str(other)))
    key = new_key()
    with ring_of({"source": mine, "stage1": theirs}, key) as ring:
        log = wait_log(ring, "stage1", "fingerprint (architecture and weights) mismatch", timeout=90)
        assert "model fingerprint (architecture and weights) mismatch" in log, log
        with pytest.raises(FlowSpecError, match="did not form"):
            asyncio.run(wait_formed(Topology.load(str(mine)), key.encode(), 3, ring.check_alive))


def test_nodes_that_disagree_on_encryption_say_so(tmp_path: Path, tiny_tok_model: Path) -> None:
    mine = write_topology(tmp_path, 2, tiny_tok_model)
    plain = variant(mine, "plain.yaml", lambda d: d["security"].__setitem__("encrypt", False))
    key = new_key()
    with ring_of({"source": mine, "stage1": plain}, key) as ring:
        log = wait_log(ring, "source", "security.encrypt is true here but false on", timeout=90)
        assert "security.encrypt is true here but false on stage1" in log, log
