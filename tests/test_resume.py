"""A request survives a node failure: the answer resumes when the ring is whole again.

Real `flowspec node` processes on loopback (tiny model, float32). A stage is stopped in
the middle of an answer, then killed and started again by hand, or stopped and continued;
the streamed answer must complete, every token exactly once, equal to the uninterrupted
answer (greedy and seeded sampling). Past the resume window the request ends with a clear
error that keeps what was produced.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from flowspec.config import Topology
from flowspec.errors import FlowSpecError, RingError
from flowspec.runtime.client import RingClient

from ring_helpers import (formed, generate, kill_leftovers, new_key, node_env, running_ring, tiny_tok_model,  # noqa: F401
                          wait_gone, wait_log, write_topology)

FAST = {"heartbeat_s": 0.2, "dead_after_s": 1.0, "read_timeout_s": 5.0}  # a dead node is noticed in ~1 s
PROMPT = [1, 504, 3458, 282, 4649, 314, 30, 198, 28, 216]


def request(strategy: str, temperature: float, n: int = 120) -> dict[str, Any]:
    r: dict[str, Any] = {"prompt_ids": PROMPT, "max_new_tokens": n, "temperature": temperature,
                         "strategy": strategy}
    if temperature:
        r["seed"] = 7
    return r


async def stream_with_failure(topo: Topology, key: bytes, req: dict[str, Any], fail: Any) -> dict[str, Any]:
    """Stream `req`; after the first tokens, call `fail()` (it stops and restarts a node).
    Returns the done event with the streamed ids, or raises what the stream raised."""
    c = await RingClient.connect(topo, key)
    streamed: list[int] = []
    try:
        async for ev in c.stream(req):
            if ev["type"] == "tokens":
                if not streamed:
                    await asyncio.get_running_loop().run_in_executor(None, fail)
                streamed += ev["ids"]
            else:
                return {**ev, "streamed": streamed}
    except RingError as e:
        e.streamed = streamed  # type: ignore[attr-defined]
        raise
    finally:
        await c.close()
    raise AssertionError("the stream ended without a done event")


def node(ring: Any, name: str) -> Any:
    return next(p for p in ring.procs if p.name == name and p.proc.poll() is None)


@pytest.mark.parametrize("strategy,temperature,how", [
    ("autoregressive", 0.0, "kill"), ("flowspec", 0.0, "kill"), ("flowspec", 0.8, "kill"),
    ("pipedec", 0.0, "stop"), ("chunked", 0.0, "stop"),
])
def test_the_answer_resumes_after_a_stage_fails(tmp_path: Path, tiny_tok_model: Path, strategy: str,
                                                temperature: float, how: str) -> None:
    path = write_topology(tmp_path, 3, tiny_tok_model, drafter="lookup", security=FAST,
                          decoding={"resume_window_s": 60})
    topo = Topology.load(str(path))
    with running_ring(path) as ring:
        req = dict(request(strategy, temperature), logprobs=1)  # the target's logprobs resume too
        whole = generate(topo, ring.key, req)
        truth = whole["token_ids"]
        assert len(truth) >= 40, "the tiny model stopped early; the test needs a long answer"
        events: dict[str, float] = {}

        def fail() -> None:
            p = node(ring, "stage1")
            os.kill(p.proc.pid, signal.SIGSTOP)  # frozen: the answer cannot finish meanwhile
            events["stopped"] = time.monotonic()
            time.sleep(2.0)  # past dead_after_s: the source holds the request
            if how == "kill":
                os.kill(p.proc.pid, signal.SIGKILL)
                p.proc.wait(5)
                ring.procs.remove(p)
                ring.spawn("stage1", str(path), append=True)
            else:
                os.kill(p.proc.pid, signal.SIGCONT)

        done = asyncio.run(stream_with_failure(topo, ring.key, req, fail))
        assert done["token_ids"] == truth  # equal to the uninterrupted answer
        assert done["streamed"] == truth  # and every token streamed exactly once
        assert [e["token"] for e in done["logprobs"]] == truth
        assert [e["logprob"] for e in done["logprobs"]] == pytest.approx([e["logprob"] for e in whole["logprobs"]],
                                                                         abs=1e-5)
        assert done["stats"]["resumed"] >= 1
        log = (ring.log_dir / "source.log").read_text()
        assert "is held with" in log and "resumes after" in log, log[-2000:]


def test_an_http_stream_pauses_through_a_stall_and_completes(tmp_path: Path, tiny_tok_model: Path) -> None:
    """The official openai client streams /v1/completions while a stage is frozen past
    dead_after_s and then continued: the stream only pauses (no error chunk), every token
    arrives once, and the text equals the uninterrupted answer's."""
    import openai

    path = write_topology(tmp_path, 3, tiny_tok_model, drafter="lookup", security=FAST, strategy="flowspec",
                          decoding={"resume_window_s": 60})
    topo = Topology.load(str(path))
    with running_ring(path, node_args=("--dtype", "float32")) as ring:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{topo.api.port}/v1", api_key="none", max_retries=0,
                               timeout=60.0)
        model = client.models.list().data[0].id
        whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=80)
        assert whole.usage.completion_tokens >= 40, "the tiny model stopped early; the test needs a long answer"
        p = node(ring, "stage1")
        pieces: list[str] = []
        finish = None
        for chunk in client.completions.create(model=model, prompt=PROMPT, max_tokens=80, stream=True):
            if chunk.choices:
                if not pieces:  # mid-answer: frozen past dead_after_s (1 s here), then continued
                    os.kill(p.proc.pid, signal.SIGSTOP)
                    time.sleep(2.0)
                    os.kill(p.proc.pid, signal.SIGCONT)
                pieces.append(chunk.choices[0].text)
                finish = chunk.choices[0].finish_reason or finish
        assert "".join(pieces) == whole.choices[0].text
        assert finish == whole.choices[0].finish_reason
        log = (ring.log_dir / "source.log").read_text()
        assert "is held with" in log and "resumes after" in log, log[-2000:]


def test_a_probe_holding_the_ring_lets_go_when_a_stage_dies(tmp_path: Path, tiny_tok_model: Path) -> None:
    """A ring probe (the profiler's, or the source's own tuning at formation) holds the ring:
    no request decodes meanwhile. When a stage dies under it, the probe ends at once with a
    message, the stages that were timing their passes for it stop, and once the stage is back
    the ring serves requests again (before, the probe waited out its timeout, minutes, and
    every request waited behind it)."""
    path = write_topology(tmp_path, 3, tiny_tok_model, drafter="lookup", security=FAST)
    topo = Topology.load(str(path))
    with running_ring(path) as ring:
        truth = generate(topo, ring.key, request("flowspec", 0.0, 24))["token_ids"]
        p = node(ring, "stage2")

        async def probe_and_kill() -> tuple[str, float]:
            c = await RingClient.connect(topo, ring.key)
            try:  # long enough to be cut: 1,650 passes of 256 tokens per stage, ~30 s in all
                asyncio.get_running_loop().call_later(0.5, p.proc.kill)
                t0 = time.monotonic()
                with pytest.raises(FlowSpecError) as ei:
                    await c.probe({"op": "bench", "sizes": [256] * 32, "reps": 50, "context": 8})
                return str(ei.value), time.monotonic() - t0
            finally:
                await c.close()

        msg, took = asyncio.run(probe_and_kill())
        assert "the bench probe failed" in msg and "broke" in msg, msg
        assert took < 10, took  # whole, the probe takes ~30 s; its own timeout here is 2.3 hours
        # stage1 stops timing its share once its successor is gone (it held its compute thread,
        # and the ring's next FORM behind it, for the rest of the ~30 s before)
        stopped = "stopped: the ring broke while this stage timed its passes"
        assert stopped in wait_log(ring, "stage1", stopped, timeout=10.0)
        p.proc.wait(5)
        ring.procs.remove(p)
        ring.spawn("stage2", str(path), append=True)
        formed(topo, ring.key, 60.0, ring)
        assert generate(topo, ring.key, request("flowspec", 0.0, 24), timeout=60)["token_ids"] == truth


def test_past_the_resume_window_the_error_keeps_the_partial_answer(tmp_path: Path, tiny_tok_model: Path) -> None:
    path = write_topology(tmp_path, 3, tiny_tok_model, drafter="lookup", security=FAST,
                          decoding={"resume_window_s": 2})
    topo = Topology.load(str(path))
    with running_ring(path) as ring:
        req = request("autoregressive", 0.0)
        truth = generate(topo, ring.key, req)["token_ids"]
        p = node(ring, "stage2")

        def fail() -> None:
            os.kill(p.proc.pid, signal.SIGKILL)
            p.proc.wait(5)

        t0 = time.monotonic()
        with pytest.raises(FlowSpecError) as ei:
            asyncio.run(stream_with_failure(topo, ring.key, req, fail))
        took = time.monotonic() - t0
        msg = str(ei.value)
        assert "resume window (2 s, decoding.resume_window_s)" in msg and "stage2" in msg, msg
        assert "restart the missing node" in msg
        partial = list((getattr(ei.value, "partial", None) or {}).get("token_ids") or [])
        assert partial and partial == truth[:len(partial)]
        assert partial == getattr(ei.value, "streamed", partial)[:len(partial)]
        assert took < 30
        ring.procs.remove(p)


def test_up_restarts_a_killed_stage_and_the_held_answer_resumes(tmp_path: Path, tiny_tok_model: Path) -> None:
    """`flowspec up` supervises: the stage it restarts after a SIGKILL lets the answer finish."""
    path = write_topology(tmp_path, 3, tiny_tok_model, drafter="lookup", security=FAST,
                          decoding={"resume_window_s": 60})
    key = new_key()
    err = open(tmp_path / "up.err", "w")
    up = subprocess.Popen([sys.executable, "-m", "flowspec.cli", "up", str(path), "--threads", "1", "--dtype",
                           "float32", "--timeout", "90"], stdout=subprocess.PIPE, stderr=err, text=True,
                          env=dict(node_env(key), COLUMNS="200"), cwd=tmp_path, start_new_session=True)
    out: list[str] = []
    threading.Thread(target=lambda: out.extend(iter(up.stdout.readline, "")), daemon=True).start()  # type: ignore[union-attr]
    children: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while not any("ring formed" in line for line in out) and time.monotonic() < deadline and up.poll() is None:
            time.sleep(0.2)
        assert any("ring formed" in line for line in out), "".join(out) + (tmp_path / "up.err").read_text()[-3000:]
        topo = Topology.load(str(path))
        req = request("flowspec", 0.0)
        truth = generate(topo, key.encode(), req)["token_ids"]
        victim = next(c for c in psutil.Process(up.pid).children(recursive=True) if "stage2" in c.cmdline())

        def fail() -> None:
            victim.suspend()  # mid-answer for sure, then gone
            time.sleep(1.5)
            victim.kill()

        done = asyncio.run(stream_with_failure(topo, key.encode(), req, fail))
        assert done["token_ids"] == truth and done["streamed"] == truth
        assert done["stats"]["resumed"] >= 1
        assert any("node 'stage2' restarted" in line for line in out), "".join(out)
        children = [c.pid for c in psutil.Process(up.pid).children(recursive=True)]
        up.send_signal(signal.SIGTERM)
        up.wait(20)
        assert up.returncode == 0
        assert wait_gone(children, 5.0) == [], "node processes outlived `flowspec up`"
    finally:
        kill_leftovers(up, children)
        err.close()
