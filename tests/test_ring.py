"""The ring with real `flowspec node` processes on loopback.

* `flowspec generate --local` on topologies/local.yaml (the default model, float32) gives
  exactly the single-process greedy tokens, plain and speculative;
* rings of 2 and 6 nodes with a tiny model give the single-process greedy tokens
  (autoregressive and flowspec, over RingClient);
* a wrong cluster key is refused (AuthError, a log line) and the ring keeps serving;
  silent, garbage, truncated, oversized and mistyped frames, before and after
  authentication, close only their own connection;
* a SIGKILLed or SIGSTOPped stage gives the caller an error that names it, within 10 s,
  and no node process outlives the ring;
* a well-formed segment a stage cannot compute is logged and reported to the source, and
  the stage lives on;
* `flowspec up` prints the ring and stops every node on SIGTERM and on Ctrl-C, and
  restarts a SIGKILLed stage, after which the ring re-forms and answers exactly;
* `flowspec node` with a bad topology or key exits 2 with one `flowspec: error:` line.

Every ring here uses free ephemeral ports, except the local.yaml test (7700-7703), which
is the only one on those ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import psutil
import pytest
import torch
import yaml

from flowspec.config import Topology
from flowspec.errors import FlowSpecError
from flowspec.model.pipeline import LocalPipeline, greedy_generate
from flowspec.model.tokenizer import Tokenizer
from flowspec.runtime.client import RingClient
from flowspec.runtime.launcher import LocalRing
from flowspec.runtime import protocol
from flowspec.runtime.protocol import HEADER, HEADER_SIZE, MAGIC, VERSION, Frame, FrameType, ProtocolError, SegmentMsg
from flowspec.runtime.transport import AuthError, client_auth, hello_meta, open_stream

from ring_helpers import tiny_tok_model  # noqa: F401  (a fixture, used by name)
from ring_helpers import (formed, free_ports, generate, impersonate, kill_leftovers, new_key, node_env, ring_logs,
                          running_ring, wait_gone, wait_log, write_topology)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
LOCAL_YAML = REPO / "topologies" / "local.yaml"
CLI = [sys.executable, "-m", "flowspec.cli"]
TINY_PROMPTS = [[1, 504, 3163, 436, 253, 3605], [9, 77, 300, 1200, 5, 48000, 17, 17, 17]]

_pipes: dict[str, LocalPipeline] = {}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread, like the nodes (--threads 1): tiny matrices on two busy cores are
    many times faster without thread synchronisation."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference(folder: Path, prompt: list[int], n: int) -> list[int]:
    """Single-process greedy tokens (float32), the ground truth of every ring."""
    with one_thread():
        if str(folder) not in _pipes:
            _pipes[str(folder)] = LocalPipeline.load(folder, 1, dtype="float32")
        return greedy_generate(_pipes[str(folder)], prompt, n, (2,)).token_ids


def load(path: Path) -> Topology:
    return Topology.load(str(path))


# ---------------------------------------------------------------------------- rings
def _ring(folder: Path, n: int, model: Path, **kw: Any) -> Iterator[tuple[Topology, Any]]:
    path = write_topology(folder, n, model, **kw)
    with running_ring(path, log_dir=folder) as ring:
        yield load(path), ring


@pytest.fixture(scope="module")
def ring2(tiny_tok_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from _ring(tmp_path_factory.mktemp("ring2"), 2, tiny_tok_model)


@pytest.fixture(scope="class")
def ring6(tiny_tok_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from _ring(tmp_path_factory.mktemp("ring6"), 6, tiny_tok_model)


# ------------------------------------------------------------- local.yaml, default model
@pytest.fixture(scope="module")
def local_yaml_reference(default_model_dir: Path) -> tuple[str, list[int]]:
    prompt = "Write a short story about a dragon who learns to fly."
    tok = Tokenizer(default_model_dir)
    ids = tok.encode_prompt(prompt)
    with one_thread():
        pipe = LocalPipeline.load(default_model_dir, 1, dtype="float32")
        return prompt, greedy_generate(pipe, ids, 32, tok.eos_ids).token_ids


def _ports_free(ports: list[int]) -> bool:
    for p in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


@pytest.mark.parametrize("strategy", ["autoregressive", "chunked", "pipedec", "flowspec"])
def test_generate_local_yaml_matches_greedy(strategy: str, local_yaml_reference: tuple[str, list[int]],
                                            tmp_path: Path) -> None:
    prompt, expected = local_yaml_reference
    assert _ports_free([7700, 7701, 7702, 7703]), "ports 7700-7703 (topologies/local.yaml) are in use"
    out = subprocess.run(
        [*CLI, "generate", "--topology", str(LOCAL_YAML), "--local", "--prompt", prompt, "--max-new-tokens", "32",
         "--dtype", "float32", "--json", "--strategy", strategy, "--threads", "1"],
        env=node_env(new_key()), cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["token_ids"] == expected
    assert res["stats"]["strategy"] == strategy and res["stats"]["new_tokens"] == len(expected)
    assert sorted(res["stats"]["hops"]["stages"]) == ["stage1", "stage2", "stage3"]
    # every node stopped with the command
    deadline = time.monotonic() + 5
    while not _ports_free([7700, 7701, 7702, 7703]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ports_free([7700, 7701, 7702, 7703]), "a node of the local ring is still listening"


# ------------------------------------------------------------ tiny model, 2 and 6 nodes
@pytest.mark.parametrize("strategy", ["autoregressive", "flowspec"])
def test_ring2_matches_greedy(strategy: str, ring2: Any, tiny_tok_model: Path) -> None:
    topo, ring = ring2
    for prompt in TINY_PROMPTS:
        res = generate(topo, ring.key, {"prompt_ids": prompt, "max_new_tokens": 40, "strategy": strategy})
        assert res["token_ids"] == reference(tiny_tok_model, prompt, 40), strategy
        assert res["stats"]["strategy"] == strategy


def test_request_tree_settings_take_effect_and_stay_exact(ring2: Any, tiny_tok_model: Path) -> None:
    """A request's own draft-tree settings (what `flowspec bench` variants send) shape its
    segments (at most `segment` rows each, at most `in_flight` in the ring) and leave the
    text as greedy decoding's; a bad setting is refused naming the field."""
    topo, ring = ring2
    prompt = TINY_PROMPTS[0]
    res = generate(topo, ring.key, {"prompt_ids": prompt, "max_new_tokens": 30, "strategy": "flowspec",
                                    "trace": True, "tree": {"segment": 2, "in_flight": 5}})
    assert res["token_ids"] == reference(tiny_tok_model, prompt, 30)
    decode = res["stats"]["trace"]["segments"][1:]  # the first to come back is the prompt's prefill
    assert decode and max(s["rows"] for s in decode) <= 2
    # more than the topology's auto in_flight (one per stage: 1 here) were in the ring at once
    events = sorted([(s["t_sent"], 1) for s in decode] + [(s["t_back"], -1) for s in decode])
    depth = peak = 0
    for _, d in events:
        depth += d
        peak = max(peak, depth)
    assert 1 < peak <= 5, peak
    with pytest.raises(FlowSpecError, match="tree.in_flight: must be an integer from 1 to 64"):
        generate(topo, ring.key, {"prompt_ids": prompt, "max_new_tokens": 4, "tree": {"in_flight": 0}})


def test_ring2_text_prompt_uses_the_tokenizer(ring2: Any, tiny_tok_model: Path) -> None:
    topo, ring = ring2
    tok = Tokenizer(tiny_tok_model)
    res = generate(topo, ring.key, {"prompt": "Hello there", "max_new_tokens": 12, "strategy": "flowspec"})
    assert res["token_ids"] == reference(tiny_tok_model, tok.encode_prompt("Hello there"), 12)
    assert res["text"] == tok.decode(res["token_ids"])
    assert res["stats"]["prompt_tokens"] == len(tok.encode_prompt("Hello there"))


class TestSixNodes:
    def test_status_lists_five_stages(self, ring6: Any) -> None:
        topo, ring = ring6

        async def status() -> dict[str, Any]:
            c = await RingClient.connect(topo, ring.key)
            try:
                return await c.status()
            finally:
                await c.close()

        st = asyncio.run(status())
        assert st["formed"] and [r["name"] for r in st["ring"]] == [f"stage{i}" for i in range(1, 6)]
        layers = [tuple(r["layers"]) for r in st["ring"]]
        assert layers[0][0] == 0 and layers[-1][1] == 6
        assert all(a[1] == b[0] for a, b in zip(layers, layers[1:]))

    @pytest.mark.parametrize("strategy", ["autoregressive", "flowspec"])
    def test_ring6_matches_greedy(self, strategy: str, ring6: Any, tiny_tok_model: Path) -> None:
        topo, ring = ring6

        async def both() -> list[dict[str, Any]]:  # two requests on one client connection
            c = await RingClient.connect(topo, ring.key)
            try:
                return [await c.generate({"prompt_ids": p, "max_new_tokens": 40, "strategy": strategy})
                        for p in TINY_PROMPTS]
            finally:
                await c.close()

        for prompt, res in zip(TINY_PROMPTS, asyncio.run(both())):
            assert res["token_ids"] == reference(tiny_tok_model, prompt, 40), strategy
            assert sorted(res["stats"]["hops"]["stages"]) == [f"stage{i}" for i in range(1, 6)]


def test_one_connection_many_requests_and_status(ring2: Any, tiny_tok_model: Path) -> None:
    """Back-to-back requests on one connection are all answered (a request sent right after
    DONE used to be lost), and a STATUS sent during a request is answered too."""
    topo, ring = ring2
    expected = reference(tiny_tok_model, TINY_PROMPTS[0], 6)

    async def run() -> list[FrameType]:
        c = await RingClient.connect(topo, ring.key)
        try:
            for _ in range(8):
                res = await asyncio.wait_for(c.generate({"prompt_ids": TINY_PROMPTS[0], "max_new_tokens": 6}), 20)
                assert res["token_ids"] == expected
            await c.s.send(Frame(FrameType.REQUEST, 99, meta={"prompt_ids": TINY_PROMPTS[1], "max_new_tokens": 300}))
            first = await c.s.recv(20)
            assert first.type == FrameType.TOKENS, first
            await c.s.send(Frame(FrameType.STATUS, 100))
            seen: list[FrameType] = []
            while FrameType.DONE not in seen or FrameType.STATUS not in seen:
                f = await c.s.recv(20)
                seen.append(f.type)
                if f.type == FrameType.STATUS:
                    assert f.request_id == 100 and f.meta["formed"]
            return seen
        finally:
            await c.close()

    seen = asyncio.run(run())
    assert set(seen) <= {FrameType.TOKENS, FrameType.STATUS, FrameType.DONE}, seen


def test_auto_tree_settings_are_measured_for_the_ring(ring2: Any, tiny_tok_model: Path) -> None:
    """With segment, in_flight and expand "auto" (the default), the source measures its ring
    once it has formed (stage passes, links, its lm_head) and every request gets what it
    chose; the answer stays exact."""
    topo, ring = ring2
    assert topo.decoding.tree.auto == ("segment", "in_flight", "expand")

    async def run() -> tuple[dict[str, Any], dict[str, Any]]:
        c = await RingClient.connect(topo, ring.key)
        try:
            deadline = time.monotonic() + 30
            while "trip_ms" not in (tree := (await c.status())["tree"]):
                assert time.monotonic() < deadline, f"the ring was not measured: {tree}"
                await asyncio.sleep(0.2)
            res = await asyncio.wait_for(c.generate({"prompt_ids": TINY_PROMPTS[1], "max_new_tokens": 12,
                                                     "strategy": "flowspec"}), 30)
            return tree, res
        finally:
            await c.close()

    tree, res = asyncio.run(run())
    top_k = topo.decoding.tree.top_k
    assert 1 <= tree["segment"] <= 2 * top_k and tree["in_flight"] >= 1
    assert tree["expand"] == tree["segment"] * tree["in_flight"] and tree["trip_ms"] >= tree["bottleneck_ms"] > 0
    used = res["stats"]["tree"]
    assert (used["segment"], used["in_flight"], used["expand"]) == (tree["segment"], tree["in_flight"],
                                                                     tree["expand"])
    assert res["token_ids"] == reference(tiny_tok_model, TINY_PROMPTS[1], 12)


# ---------------------------------------------------------------------- authentication
def test_wrong_key_is_refused_and_ring_still_serves(ring2: Any, tiny_tok_model: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """So are a wrong key and a node of the previous protocol version (both ways, with a message
    naming the two versions)."""
    topo, ring = ring2
    wrong = b"not-the-cluster-key-" + os.urandom(8).hex().encode()

    async def attempts() -> None:
        with pytest.raises(AuthError, match="wrong cluster key"):
            await RingClient.connect(topo, wrong)
        # a stage refuses a wrong key the same way
        host, port = topo.node("stage1").address
        s = await open_stream(host, port, 1 << 20, 5.0, "stage1")
        try:
            with pytest.raises(AuthError):
                await client_auth(s, wrong)
        finally:
            await s.close()

    async def previous_version() -> bytes:
        """A node of the previous protocol version at stage1's door: the challenge it reads, and
        the AUTH frame it answers with (any key: the version is checked first)."""
        r, w = await asyncio.open_connection(*topo.node("stage1").address)
        try:
            challenge = await r.readexactly(HEADER_SIZE)
            w.write(raw_header(int(FrameType.AUTH), 0, 48, version=VERSION - 1) + os.urandom(48))
            await w.drain()
            assert await closed_within(r, 4.0)
        finally:
            w.close()
        return challenge

    asyncio.run(attempts())
    challenge = asyncio.run(previous_version())
    for name in ("source", "stage1"):
        log = wait_log(ring, name, "wrong cluster key")
        assert "refused a connection" in log and "wrong cluster key" in log, log[-2000:]
    # the newer node names both versions ...
    log = wait_log(ring, "stage1", "this node speaks")
    assert f"protocol version {VERSION - 1}, this node speaks {VERSION}; upgrade the older node" in log, log[-2000:]
    # ... and so does the older one, reading the newer node's challenge (the RING frame is not sent to it)
    monkeypatch.setattr(protocol, "VERSION", VERSION - 1)
    with pytest.raises(ProtocolError, match=f"^protocol version {VERSION}, this node speaks {VERSION - 1}; "
                                            "upgrade the older node$"):
        protocol.parse_header(challenge, 4096)
    monkeypatch.undo()
    ring.check_alive()
    res = generate(topo, ring.key, {"prompt_ids": TINY_PROMPTS[0], "max_new_tokens": 8})
    assert res["token_ids"] == reference(tiny_tok_model, TINY_PROMPTS[0], 8)


# ---------------------------------------------------------------- malformed connections
def raw_header(ftype: int, mlen: int, plen: int, version: int = VERSION) -> bytes:
    import struct
    import zlib

    head = HEADER.pack(MAGIC, version, ftype, 0, 0, mlen, plen, 0)
    return head[:-4] + struct.pack("!I", zlib.crc32(head[:-4]))


def junk_cases(authenticated: bool) -> dict[str, tuple[bytes, bool]]:
    """name -> (bytes to send, whether to half-close after them)."""
    limit = (1 << 30) if authenticated else 8192  # over max_frame (64 MiB) / the pre-auth limit
    seg = SegmentMsg([0], [-1], [0], tokens=torch.tensor([5])).to_frame(1, 1).encode()
    return {
        "random bytes": (os.urandom(200), False),
        "http": (b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", False),
        "oversized": (raw_header(int(FrameType.AUTH if not authenticated else FrameType.HELLO), 0, limit), False),
        "truncated": (raw_header(int(FrameType.AUTH), 0, 64) + b"x" * 10, True),
        "short header": (seg[:11], True),
        "wrong type": (seg, False),
        "unknown type": (raw_header(99, 0, 0), False),
        "deep json": (raw_header(int(FrameType.HELLO), 3000, 0) + b"[" * 3000, False),
        "bad json": (raw_header(int(FrameType.HELLO), 4, 0) + b"\xff{{{", False),
        # after auth: a sealed frame of 1,000 bytes announced, 10 sent (closed at the HELLO timeout)
        **({"stalled frame": (struct.pack("!I", 1000) + b"x" * 10, False)} if authenticated else {}),
    }


async def closed_within(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the peer closes the connection within timeout (whatever it sends before)."""
    async def drain() -> None:
        while await reader.read(65536):
            pass

    try:
        await asyncio.wait_for(drain(), timeout)
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except asyncio.TimeoutError:
        return False


async def junk_pre_auth(host: str, port: int, data: bytes, eof: bool) -> bool:
    r, w = await asyncio.open_connection(host, port)
    try:
        w.write(data)
        if eof:
            w.write_eof()
        await w.drain()
        return await closed_within(r, 4.0)
    except (ConnectionResetError, BrokenPipeError):
        return True
    finally:
        w.close()


async def junk_post_auth(host: str, port: int, key: bytes, data: bytes, eof: bool) -> bool:
    s = await open_stream(host, port, 1 << 26, 5.0, "node")
    try:
        await client_auth(s, key)  # a real handshake with the right key, then junk instead of HELLO
        s.writer.write(data)
        if eof:
            s.writer.write_eof()
        await s.writer.drain()
        # junk read as a sealed length in range (random bytes: 1 in 64) is a frame that never
        # arrives: the node waits out its 5 s HELLO timeout, then hangs up
        return await closed_within(s.reader, 7.0)
    except (ConnectionResetError, BrokenPipeError):
        return True
    finally:
        await s.close()


async def junk_after_hello(topo: Topology, key: bytes, data: bytes) -> bool:
    """A fully connected client that then sends junk to the source."""
    c = await RingClient.connect(topo, key)
    try:
        c.s.writer.write(data)
        await c.s.writer.drain()
        return await closed_within(c.s.reader, 4.0)
    except (ConnectionResetError, BrokenPipeError):
        return True
    finally:
        await c.close()


async def silent(host: str, port: int) -> tuple[bool, float]:
    """Connect and send nothing: the node must hang up after its auth timeout (5 s)."""
    t0 = time.monotonic()
    r, w = await asyncio.open_connection(host, port)
    try:
        return await closed_within(r, 9.0), time.monotonic() - t0
    finally:
        w.close()


def test_malformed_connections_are_closed_and_ring_survives(ring2: Any, tiny_tok_model: Path) -> None:
    topo, ring = ring2

    async def run() -> dict[str, Any]:
        checks: dict[str, Any] = {}
        for name in ("source", "stage1"):
            host, port = topo.node(name).address
            checks[f"{name}: silent"] = silent(host, port)
            for case, (data, eof) in junk_cases(False).items():
                checks[f"{name}: before auth: {case}"] = junk_pre_auth(host, port, data, eof)
            for case, (data, eof) in junk_cases(True).items():
                checks[f"{name}: after auth: {case}"] = junk_post_auth(host, port, ring.key, data, eof)
        for case, (data, _) in junk_cases(True).items():
            if case not in ("truncated", "short header", "stalled frame"):  # (these wait for read_timeout_s)
                checks[f"source: after hello: {case}"] = junk_after_hello(topo, ring.key, data)
        results = await asyncio.gather(*checks.values())
        return dict(zip(checks, results))

    results = asyncio.run(run())
    for name in ("source", "stage1"):
        closed, took = results.pop(f"{name}: silent")
        assert closed and took < 8.0, f"{name} kept a silent connection open for {took:.1f} s"
    still_open = [k for k, ok in results.items() if not ok]
    assert not still_open, f"connections not closed: {still_open}"
    ring.check_alive()
    logs = ring_logs(ring)
    assert "Traceback" not in logs and "Unhandled" not in logs, logs
    res = generate(topo, ring.key, {"prompt_ids": TINY_PROMPTS[1], "max_new_tokens": 16, "strategy": "flowspec"})
    assert res["token_ids"] == reference(tiny_tok_model, TINY_PROMPTS[1], 16)


def test_bad_requests_and_clients_at_stages_are_refused(ring2: Any) -> None:
    topo, ring = ring2

    async def run() -> None:
        c = await RingClient.connect(topo, ring.key)
        try:
            for bad in ({"prompt_ids": ["x"]}, {"prompt_ids": [10**9]}, {"prompt": ""},
                        {"prompt_ids": [5], "strategy": "warp"}, {"prompt_ids": [5], "max_new_tokens": -3},
                        {"prompt_ids": [5], "max_new_tokens": 10**6}):
                with pytest.raises(FlowSpecError, match="bad request"):
                    await c.generate(bad)
            assert (await c.status())["formed"]  # the connection is still good
        finally:
            await c.close()
        # a client that talks to a stage is told to use the source
        host, port = topo.node("stage1").address
        s = await open_stream(host, port, 1 << 20, 5.0, "stage1")
        try:
            await client_auth(s, ring.key)
            await s.send(Frame(FrameType.HELLO, meta=hello_meta(topo.cluster, "", "client", "client", None)))
            f = await s.recv(5.0)
            assert f.type == FrameType.REJECT and "source" in f.meta["reason"]
        finally:
            await s.close()

    asyncio.run(run())
    ring.check_alive()


# ------------------------------------------------------------------------- node failures
@pytest.fixture
def ring4(tiny_tok_model: Path, tmp_path: Path) -> Any:
    yield from _ring(tmp_path, 4, tiny_tok_model, max_context=4096)


async def _fail_mid_generation(topo: Topology, key: bytes, act: Any, after: float = 0.5
                               ) -> tuple[str | None, float, int]:
    """Stream a long generation; call act() after `after` s of tokens; return (error, s to it, tokens)."""
    c = await RingClient.connect(topo, key)
    t_act: float | None = None
    got = 0

    async def consume() -> None:
        nonlocal t_act, got
        t0 = time.monotonic()
        async for ev in c.stream({"prompt_ids": TINY_PROMPTS[1], "max_new_tokens": 3000,
                                  "strategy": "autoregressive"}):
            if ev.get("type") == "done":
                raise AssertionError(f"the generation finished ({len(ev['token_ids'])} tokens) before the failure")
            got += len(ev["ids"])
            if t_act is None and time.monotonic() - t0 >= after:
                act()
                t_act = time.monotonic()

    try:
        await asyncio.wait_for(consume(), 60)
    except FlowSpecError as e:
        assert t_act is not None, f"failed before the fault was injected: {e}"
        return str(e), time.monotonic() - t_act, got
    finally:
        await c.close()
    return None, 0.0, got


def test_killed_stage_is_reported_and_no_process_is_left(ring4: Any) -> None:
    topo, ring = ring4
    victim = next(p for p in ring.procs if p.name == "stage2")
    pids = [p.proc.pid for p in ring.procs]
    err, took, got = asyncio.run(_fail_mid_generation(topo, ring.key, lambda: os.kill(victim.proc.pid, signal.SIGKILL)))
    assert err is not None and got > 0
    assert "stage2" in err, err
    assert took < 10.0, f"the error came {took:.1f} s after the kill"

    async def status() -> dict[str, Any]:
        c = await RingClient.connect(topo, ring.key)
        try:
            return await c.status()
        finally:
            await c.close()

    st = asyncio.run(status())  # the source still answers, and knows why the ring is down
    assert not st["formed"] and "stage2" in (st["error"] or ""), st
    with pytest.raises(FlowSpecError, match="stage2"):
        generate(topo, ring.key, {"prompt_ids": [5], "max_new_tokens": 4})
    ring.stop()
    assert wait_gone(pids, 5.0) == []


def test_stopped_stage_is_reported_and_ring_recovers(ring4: Any, tiny_tok_model: Path) -> None:
    topo, ring = ring4
    victim = next(p for p in ring.procs if p.name == "stage2")
    pids = [p.proc.pid for p in ring.procs]
    try:
        err, took, got = asyncio.run(
            _fail_mid_generation(topo, ring.key, lambda: os.kill(victim.proc.pid, signal.SIGSTOP)))
    finally:
        os.kill(victim.proc.pid, signal.SIGCONT)
    assert err is not None and got > 0
    assert "stage2" in err, err
    assert took < 10.0, f"the error came {took:.1f} s after the stage stopped"
    # the stage runs again: its neighbours reconnect and the source forms the ring anew
    formed(topo, ring.key, 40.0, ring)
    res = generate(topo, ring.key, {"prompt_ids": TINY_PROMPTS[0], "max_new_tokens": 12})
    assert res["token_ids"] == reference(tiny_tok_model, TINY_PROMPTS[0], 12)
    ring.stop()
    assert wait_gone(pids, 5.0) == []


def test_segment_a_stage_cannot_compute_is_reported_and_ring_recovers(ring4: Any, tiny_tok_model: Path) -> None:
    """An authenticated peer speaking as stage2's predecessor sends a well-formed segment whose
    activations do not fit (wrong width, integers): stage2 logs it and reports it toward the
    source instead of dying, and the ring serves exact tokens again once re-formed."""
    topo, ring = ring4
    bad = SegmentMsg([0, 1], [-1, 0], [0, 1], hidden=torch.ones(2, 7, dtype=torch.int64)).to_frame(1, 1)

    async def talk(s: Any) -> None:
        await s.send(Frame(FrameType.RESET, 1))  # opens request 1's KV cache, as the source would
        await s.send(bad)
        await asyncio.sleep(1.0)  # stay connected while the stage computes and reports

    impersonate(ring, tiny_tok_model, "stage1", talk)  # stage2's predecessor
    log = wait_log(ring, "stage2", "could not be computed")
    assert "segment 1 could not be computed" in log, ring_logs(ring)
    log = wait_log(ring, "source", "'stage2' reports")  # forwarded by stage3
    assert "segment failed on 'stage2': its data does not fit this stage" in log, ring_logs(ring)
    ring.check_alive()
    assert "Traceback" not in ring_logs(ring), ring_logs(ring)
    formed(topo, ring.key, 40.0, ring)
    res = generate(topo, ring.key, {"prompt_ids": TINY_PROMPTS[1], "max_new_tokens": 12, "strategy": "flowspec"})
    assert res["token_ids"] == reference(tiny_tok_model, TINY_PROMPTS[1], 12)


# --------------------------------------------------------------------------- flowspec up
def _read_until(stream: Any, marker: str, timeout: float) -> tuple[str, bool]:
    lines: list[str] = []
    done = threading.Event()

    def reader() -> None:
        for line in stream:
            lines.append(line)
            if marker in line:
                done.set()
                return
        done.set()

    threading.Thread(target=reader, daemon=True).start()
    done.wait(timeout)
    text = "".join(lines)
    return text, marker in text


@pytest.mark.parametrize("how", ["SIGTERM", "Ctrl-C"])
def test_up_prints_ring_and_stops_every_node(how: str, tiny_tok_model: Path, tmp_path: Path) -> None:
    path = write_topology(tmp_path, 3, tiny_tok_model)
    data = yaml.safe_load(path.read_text())  # and a spare: listed in the table, outside the ring
    data["nodes"].append({"name": "spare1", "host": "127.0.0.1", "port": free_ports(1)[0], "role": "spare",
                          "memory_gb": 2})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    env = dict(node_env(new_key()), COLUMNS="200")
    err = open(tmp_path / "up.err", "w")
    up = subprocess.Popen([*CLI, "up", str(path), "--threads", "1", "--dtype", "float32", "--timeout", "90"],
                          stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=tmp_path,
                          start_new_session=True,
                          # a runner started from a background job ignores SIGINT; `up` must not
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    children: list[int] = []
    try:
        out, formed = _read_until(up.stdout, "ring formed", 120)
        assert formed, f"no summary: {out}\n{(tmp_path / 'up.err').read_text()[-3000:]}"
        for word in ("source", "stage1", "stage2", "0-2", "3-5", "ready"):
            assert word in out, (word, out)
        spare = next((ln for ln in out.splitlines() if "spare1" in ln), "")
        assert "spare, waiting" in spare and "up to 2 GiB" in spare, out
        children = [c.pid for c in psutil.Process(up.pid).children(recursive=True)]
        assert len(children) == 4, children
        for pid in children:  # every node's PID and log are printed (issue 14, defect 5)
            assert str(pid) in out, (pid, out)
        assert out.count(".log") >= 4 and "API at http://127.0.0.1:" in out, out
        if how == "SIGTERM":
            up.send_signal(signal.SIGTERM)
        else:  # the terminal sends SIGINT to the whole foreground process group
            os.killpg(up.pid, signal.SIGINT)
        rest, _ = up.communicate(timeout=20)
        assert up.returncode == 0, (up.returncode, rest, (tmp_path / "up.err").read_text()[-3000:])
        assert "stopping the ring" in rest
        assert wait_gone(children, 5.0) == [], "node processes outlived `flowspec up`"
    finally:
        kill_leftovers(up, children)
        err.close()


def test_up_restarts_a_killed_stage_and_the_ring_serves_again(tiny_tok_model: Path, tmp_path: Path) -> None:
    """Issue 17's first step: `flowspec up` supervises its nodes. A SIGKILLed stage is started
    again, the ring re-forms by itself, answers exactly, and SIGTERM still leaves no process."""
    path = write_topology(tmp_path, 3, tiny_tok_model)
    key = new_key()
    env = dict(node_env(key), COLUMNS="200")
    err = open(tmp_path / "up.err", "w")
    up = subprocess.Popen([*CLI, "up", str(path), "--threads", "1", "--dtype", "float32", "--timeout", "90"],
                          stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=tmp_path,
                          start_new_session=True)
    children: list[int] = []
    try:
        out, ok = _read_until(up.stdout, "ring formed", 120)
        assert ok, f"no summary: {out}\n{(tmp_path / 'up.err').read_text()[-3000:]}"
        topo = Topology.load(str(path))
        victim = next(c for c in psutil.Process(up.pid).children(recursive=True) if "stage2" in c.cmdline())
        victim.kill()
        out, ok = _read_until(up.stdout, "restarted", 30)
        assert ok and "node 'stage2' exited with code -9" in out, out
        formed(topo, key.encode(), 40.0)
        res = generate(topo, key.encode(), {"prompt_ids": TINY_PROMPTS[0], "max_new_tokens": 12})
        assert res["token_ids"] == reference(tiny_tok_model, TINY_PROMPTS[0], 12)
        children = [c.pid for c in psutil.Process(up.pid).children(recursive=True)]
        assert len(children) == 3 and victim.pid not in children, children
        up.send_signal(signal.SIGTERM)
        up.communicate(timeout=20)
        assert up.returncode == 0
        assert wait_gone(children, 5.0) == [], "node processes outlived `flowspec up`"
    finally:
        kill_leftovers(up, children)
        err.close()


def test_a_node_that_keeps_failing_is_restarted_with_a_growing_pause(tiny_tok_model: Path, tmp_path: Path) -> None:
    """`flowspec up`'s supervision (LocalRing.restart_dead) on a real process that exits at
    once every time (a node name the topology lacks: exit code 2): the pause before each
    restart doubles, 1, 2, 4 s, and every exit and restart is reported."""
    path = write_topology(tmp_path, 2, tiny_tok_model)
    ring = LocalRing(str(path), Topology.load(str(path)), ["--no-api"], threads=1, log_dir=str(tmp_path / "logs"))
    lines: list[str] = []
    try:
        ring.spawn("ghost", str(path))
        deadline = time.monotonic() + 60
        while sum("restarting it in" in x for x in lines) < 3 and time.monotonic() < deadline:
            lines += ring.restart_dead()
            time.sleep(0.05)
    finally:
        ring.stop()
    pauses = [x.split("restarting it in ")[1].split(" s")[0] for x in lines if "restarting it in" in x]
    assert pauses == ["1", "2", "4"], lines
    assert all("exited with code 2" in x for x in lines if "restarting it in" in x), lines
    assert sum("node 'ghost' restarted" in x for x in lines) == 2, lines
    assert "no node named 'ghost'" in (tmp_path / "logs" / "ghost.log").read_text()


# ----------------------------------------------------------------------- node CLI errors
def test_node_config_errors_exit_2_with_one_line(tiny_tok_model: Path, tmp_path: Path) -> None:
    good = write_topology(tmp_path, 2, tiny_tok_model)
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("cluster:", "clustr:", 1))
    overlap = tmp_path / "overlap.yaml"
    overlap.write_text(good.read_text().replace("layers: auto", "layers: 3-1", 1))
    key = new_key()
    cases = {
        "unknown key": ([str(bad), "source"], key, "clustr"),
        "bad layers": ([str(overlap), "stage1"], key, "nodes[1].layers"),
        "unknown node": ([str(good), "nobody"], key, "no node named 'nobody'"),
        "missing key": ([str(good), "stage1"], None, "FLOWSPEC_CLUSTER_KEY"),
        "short key": ([str(good), "source"], "tooshort", "at least 16"),
    }
    procs = {name: subprocess.Popen([*CLI, "node", "--topology", topo, "--name", node, "--threads", "1"],
                                    env=node_env(k), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    cwd=tmp_path)
             for name, ((topo, node), k, _) in cases.items()}
    for name, p in procs.items():
        out, errtext = p.communicate(timeout=60)
        lines = [ln for ln in errtext.splitlines() if ln.strip()]
        assert p.returncode == 2, (name, p.returncode, errtext)
        assert len(lines) == 1 and lines[0].startswith("flowspec: error:"), (name, errtext)
        assert "Traceback" not in errtext and cases[name][2] in lines[0], (name, lines[0])
