"""tools/simulate_ring.py on the default model with the bundled EAGLE head: it runs, and what it
prints and writes is the real strategies' output (it measures its own cost table first)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_simulator_runs_the_strategies(default_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "sim.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="200")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "simulate_ring.py"),
                        "--topology", str(ROOT / "topologies" / "local.yaml"), "--limit", "1",
                        "--max-new-tokens", "12", "--reps", "1", "--strategies", "autoregressive,flowspec",
                        "--json", str(out)], capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert "simulated" in r.stdout and "flowspec: " in r.stdout and "rounds ended" in r.stdout, r.stdout
    res = json.loads(out.read_text())
    assert set(res) == {"autoregressive", "flowspec"}
    (ar,), (fs,) = res["autoregressive"], res["flowspec"]
    assert ar["stats"]["new_tokens"] == fs["stats"]["new_tokens"] == 12
    assert ar["stats"]["tau"] == 1.0 and fs["stats"]["drafted"] > 0  # the head drafted
    assert fs["decode_ms"] > 0 and fs["stats"]["draft_s"] > 0
