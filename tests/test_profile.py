"""tools/profile_hops.py on a local ring: tables, JSON, and a Chrome trace with a track per node."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ring_helpers import tiny_tok_model, write_topology  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parents[1]
TOOL = [sys.executable, str(ROOT / "tools" / "profile_hops.py")]


def env(key: str | None = None) -> dict[str, str]:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
             OMP_NUM_THREADS="1", COLUMNS="100")
    e.pop("FLOWSPEC_CLUSTER_KEY", None)
    if key is not None:
        e["FLOWSPEC_CLUSTER_KEY"] = key
    return e


@pytest.mark.slow
def test_profile_local_ring(tiny_tok_model: Path, tmp_path: Path) -> None:
    path = write_topology(tmp_path, 3, tiny_tok_model, strategy="flowspec")
    out_json, out_trace = tmp_path / "profile.json", tmp_path / "trace.json"
    r = subprocess.run(TOOL + ["--topology", str(path), "--local", "--reps", "2", "--bench-sizes", "1,4,16,64",
                               "--echo-sizes", "0,65536,262144", "--context", "32", "--max-new-tokens", "12",
                               "--json", str(out_json), "--trace", str(out_trace)],
                       capture_output=True, text=True, env=env(), timeout=240, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout + r.stderr
    for title in ("links: echo round trip", "stage compute", "one generation: where", "12 tokens in"):
        assert title in r.stdout, r.stdout
    for row in ("source->stage1", "stage1->stage2", "stage2->source", "wait for the ring", "n=64"):
        assert row in r.stdout, row

    report: dict[str, Any] = json.loads(out_json.read_text())
    links = {(x["from"], x["to"]): x for x in report["links"]}
    assert set(links) == {("source", "stage1"), ("stage1", "stage2"), ("stage2", "source")}
    for x in links.values():
        assert "error" not in x, x
        assert x["rtt_ms"] > 0 and [s[0] for s in x["samples"]] == [0, 65536, 262144]
    stages = {x["node"]: x for x in report["stages"]}
    assert set(stages) == {"stage1", "stage2"}
    for x in stages.values():
        assert "error" not in x, x
        assert [s[0] for s in x["sizes"]] == [1, 4, 16, 64] and all(s[1] > 0 for s in x["sizes"])
    assert report["generation"]["tokens"] == 12
    parts = {(b["where"], b["part"]) for b in report["breakdown"]}
    assert {("source", "draft"), ("source", "verify"), ("source", "wait for the ring"), ("stage1", "compute"),
            ("stage2", "queueing"), ("stage2->source", "wire")} <= parts

    trace = json.loads(out_trace.read_text())
    events = trace["traceEvents"]
    threads = {e["args"]["name"]: (e["pid"], e["tid"]) for e in events
               if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"source", "stage1", "stage2", "source->stage1", "stage2->source"} <= set(threads)
    node_tracks = {threads[n] for n in ("source", "stage1", "stage2")}
    assert len(node_tracks) == 3  # one track per node
    for n in ("source", "stage1", "stage2"):
        spans = [e for e in events if e["ph"] == "X" and (e["pid"], e["tid"]) == threads[n]]
        assert spans and all(e["dur"] > 0 and e["ts"] >= 0 for e in spans), n
        ends = sorted((e["ts"], e["ts"] + e["dur"]) for e in spans)
        assert all(a[1] <= b[0] + 1 for a, b in zip(ends, ends[1:])), f"{n}: overlapping spans"
    begins = [e for e in events if e["ph"] == "b"]
    assert begins and len(begins) == len([e for e in events if e["ph"] == "e"])


def test_segments_of_one_pass_are_one_span() -> None:
    """Segments that waited together at a stage ran in one pass (the same start and end in
    their hop records): the trace shows that pass once on the stage's track, not once per
    segment stacked on each other (the ring test above met this when stage1 batched two)."""
    from flowspec.profile_hops import NODE_PID, chrome_trace

    def seg(t_sent: float, rows: int, s1: tuple[float, float], s2: tuple[float, float]) -> dict[str, Any]:
        return {"t_sent": t_sent, "t_back": s2[1] + 0.002, "rows": rows,
                "hops": [["stage1", s1[0] - 0.001, s1[0], s1[1], s1[1], 100, 200],
                         ["stage2", s2[0] - 0.001, s2[0], s2[1], s2[1], 200, 300]]}

    segs = [seg(10.000, 3, (10.002, 10.010), (10.011, 10.020)),
            seg(10.001, 5, (10.002, 10.010), (10.021, 10.030)),  # batched with the first at stage1
            seg(10.015, 2, (10.016, 10.024), (10.031, 10.040))]
    report = {"trace": {"t0": 10.0, "segments": segs, "source": [[10.041, 10.043, 1]]}, "source_name": "source",
              "ring": [{"name": "stage1"}, {"name": "stage2"}], "cluster": "c", "model": "m"}
    events = chrome_trace(report)["traceEvents"]
    tids = {e["args"]["name"]: e["tid"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"
            and e["pid"] == NODE_PID}
    spans = {n: sorted((e["ts"], e["ts"] + e["dur"], e["name"]) for e in events
                       if e["ph"] == "X" and e["tid"] == tids[n] and e["pid"] == NODE_PID) for n in ("stage1", "stage2")}
    assert [s[2] for s in spans["stage1"]] == ["compute (2 segments, 8 rows out)", "compute (2 rows out)"]
    assert len(spans["stage2"]) == 3
    for n, ss in spans.items():
        assert all(a[1] <= b[0] + 1 for a, b in zip(ss, ss[1:])), n
    merged = next(e for e in events if e["ph"] == "X" and e["name"].startswith("compute (2 segments"))
    assert [p["segment"] for p in merged["args"]["segments"]] == [0, 1]


def test_profile_errors_are_messages(tmp_path: Path, tiny_tok_model: Path) -> None:
    path = write_topology(tmp_path, 2, tiny_tok_model)
    r = subprocess.run(TOOL + ["--topology", str(path)], capture_output=True, text=True, env=env(), timeout=60)
    assert r.returncode == 2 and "FLOWSPEC_CLUSTER_KEY" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(TOOL + ["--topology", str(path), "--timeout", "1"], capture_output=True, text=True,
                       env=env("k" * 32), timeout=60)
    assert r.returncode == 1 and "did not form within 1 s" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run(TOOL + ["--topology", str(tmp_path / "missing.yaml")], capture_output=True, text=True,
                       env=env(), timeout=60)
    assert r.returncode == 2 and "no such topology file" in r.stderr
    r = subprocess.run(TOOL + ["--topology", str(path), "--local", "--reps", "0"], capture_output=True, text=True,
                       env=env(), timeout=60)
    assert r.returncode == 2 and "reps must be an integer" in r.stderr and "Traceback" not in r.stderr
