"""The `flowspec` command line: `flowspec check`, help with defaults, exit codes, the
FLOWSPEC_TOPOLOGY / FLOWSPEC_NODE defaults, the tools/ wrappers, and the chat's line history.

`check` runs in this process against tiny models (its sizes are compared with stages really
loaded) and against real sockets (one listening, one closed port)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from flowspec.cli import build_parser, main
from flowspec.cli_common import HelpFormatter, exit_code, run_reporting
from flowspec.config import Topology
from flowspec.errors import ModelError, RingError, TopologyError, UsageError

ROOT = Path(__file__).resolve().parents[1]
TOPOLOGIES = sorted((ROOT / "topologies").glob("*.yaml"))


def topology(folder: Path, target: Path | str, ports: tuple[int, ...], **decoding: Any) -> Path:
    """A source and len(ports) - 1 auto stages on 127.0.0.1 (float32, lookup drafter)."""
    nodes = [{"name": "source", "host": "127.0.0.1", "port": ports[0], "role": "source"}]
    nodes += [{"name": f"stage{i}", "host": "127.0.0.1", "port": p, "role": "stage", "layers": "auto"}
              for i, p in enumerate(ports[1:], 1)]
    data = {"cluster": "cli", "model": {"target": str(target), "drafter": "lookup", "dtype": "float32",
                                        "max_context": 128},
            "nodes": nodes, "decoding": {"max_active": 3, **decoding}}
    path = folder / "ring.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def listening() -> Iterator[list[int]]:
    """Two ports on 127.0.0.1 that accept connections while the test runs."""
    socks = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        socks.append(s)
    yield [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    return port


# ------------------------------------------------------------------------------ check
@pytest.mark.parametrize("path", TOPOLOGIES, ids=[p.name for p in TOPOLOGIES])
def test_check_shipped_topologies(path: Path, default_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    topo = Topology.load(path)
    assert f"{path}: valid" in out and "30 layers" in out
    spares = f", {len(topo.spares)} spare" if topo.spares else ""  # counted apart from the ring's nodes
    assert f"{len(topo.stages)} stage(s), {len(topo.stages) + 1} nodes in ring order{spares}\n" in out, out
    rows = [ln for ln in out.splitlines() if ln.split(" ")[0] in {n.name for n in topo.nodes}]
    assert [r.split()[0] for r in rows] == [n.name for n in topo.nodes]  # ring order
    by_name = {r.split()[0]: r for r in rows}
    assert "embedding + layers 0-" in by_name[topo.stages[0].name] and "+ norm" in by_name[topo.stages[-1].name]
    assert all("MiB" in by_name[n.name] for n in (topo.source, *topo.stages)) and out.count("total: weights") == 1


@pytest.mark.parametrize("verify", ["source", "last_stage", "auto"])
def test_check_sizes_are_what_the_stages_load(tiny_qwen2: Path, tmp_path: Path, verify: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from flowspec.check import size_text
    from flowspec.footprint import plan_ring
    from flowspec.model.config import ModelConfig
    from flowspec.model.stage import LMHead, Stage

    path = topology(tmp_path, tiny_qwen2, (7000, 7001, 7002), verify=verify)
    topo = Topology.load(path)
    cfg = ModelConfig.from_file(str(tiny_qwen2 / "config.json"))
    plans = plan_ring(topo, cfg)
    head = LMHead.load(tiny_qwen2, dtype="float32", cfg=cfg).weight
    assert plans[0].weight_bytes == head.numel() * head.element_size() and plans[0].kv_bytes == 0
    for p in plans[1:]:
        assert p.layers is not None
        stage = Stage.load(tiny_qwen2, *p.layers, dtype="float32", max_context=128, cfg=cfg)
        extra = head.numel() * 4 if verify != "source" and p.name == "stage2" else 0
        assert p.weight_bytes == stage.weight_bytes() + extra, p
        cache = stage.cache.keys + stage.cache.values
        assert p.kv_bytes == 3 * sum(t.numel() * t.element_size() for t in cache), p  # max_active 3
    assert plans[1].layers is not None and plans[2].layers is not None
    assert plans[1].layers[0] == 0 and plans[1].layers[1] == plans[2].layers[0] and plans[2].layers[1] == 6
    assert main(["check", str(path)]) == 0
    out = capsys.readouterr().out
    for p in plans:
        assert any(ln.startswith(p.name) and size_text(p.weight_bytes) in ln and p.holds in ln
                   for ln in out.splitlines()), (p, out)
    assert ("lm_head" in plans[-1].holds) == (verify != "source")
    chosen = {"source": "tokens chosen at the source", "last_stage": "tokens chosen at the last stage",
              "auto": "tokens chosen at the last stage while requests share the ring, else at the source"}[verify]
    assert chosen in " ".join(out.split()), out


def test_check_reports_every_bad_field_of_a_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Fields read by their declared rule are all checked, several in one section too."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("""
cluster: ring
model: {target: default, max_context: 0, dtype: float8}
nodes:
  - {name: source, host: 127.0.0.1, port: 7700, role: source}
  - {name: stage1, host: 127.0.0.1, port: 7701, role: stage, layers: auto}
api: {port: 70000, queue_size: 0}
decoding: {prefill_chunk: 0, max_active: 100}
security: {heartbeat_s: -1, max_frame_mb: 0}
""")
    assert main(["check", str(bad)]) == 2
    out, err = capsys.readouterr()
    expected = ["model.dtype: unknown dtype 'float8'", "model.max_context: must be an integer >= 64, not 0",
                "api.port: must be an integer from 1 to 65535, not 70000",
                "api.queue_size: must be an integer >= 1, not 0", "decoding.prefill_chunk: must be an integer >= 1",
                "decoding.max_active: must be an integer from 1 to 64, not 100",
                "security.heartbeat_s: must be a number > 0, not -1", "security.max_frame_mb: must be a number > 0"]
    lines = err.splitlines()
    assert len(lines) == len(expected), err
    for want, line in zip(expected, lines):
        assert line.startswith(f"flowspec: error: {bad}: {want}"), (want, line)
    assert out == "" and "Traceback" not in err


def test_check_reports_every_problem_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("""
cluster: ring
model: {target: default, dtype: float8}
nodes:
  - {name: source, host: 127.0.0.1, port: 7700, role: source}
  - {name: stage1, host: 127.0.0.1, port: 7700, role: stage, layers: "9-3"}
  - {name: stage1, host: "bad host", port: 7702, role: stage, prot: 1}
decoding: {strategy: flowspc}
""")
    assert main(["check", str(bad)]) == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    expected = ["model.dtype: unknown dtype 'float8'", "nodes[1].port: 127.0.0.1:7700 is already used by nodes[0]",
                "nodes[1].layers: '9-3' ends before it starts", "nodes[2].prot: unknown key (did you mean 'port'?)",
                "nodes[2].name: 'stage1' is already the name of nodes[1]", "nodes[2].host: must be a hostname",
                "decoding.strategy: unknown strategy 'flowspc' (did you mean 'flowspec'?)"]
    assert len(lines) == len(expected), err
    for want, line in zip(expected, lines):
        assert line.startswith(f"flowspec: error: {bad}: {want}"), (want, line)
    assert out == "" and "Traceback" not in err
    # a misspelt required key is said once (by its "did you mean"), not twice
    good = topology(tmp_path, "default", (7000, 7001))
    good.write_text(good.read_text().replace("cluster:", "clustr:"))
    assert main(["check", str(good)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"flowspec: error: {good}: clustr: unknown key (did you mean 'cluster'?) (allowed: "
        "cluster, model, nodes, api, decoding, security, testbed)"]


def test_check_memory_too_small_is_an_invalid_file(tiny_llama: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    path = topology(tmp_path, tiny_llama, (7000, 7001))
    data = yaml.safe_load(path.read_text())
    data["nodes"][1]["memory_gb"] = 1e-6
    path.write_text(yaml.safe_dump(data))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "nodes[1].memory_gb" in err and "holds no layer" in err


def test_check_reach(tiny_llama: Path, tmp_path: Path, listening: list[int],
                     capsys: pytest.CaptureFixture[str]) -> None:
    down = closed_port()
    path = topology(tmp_path, tiny_llama, (listening[0], down))
    assert main(["check", str(path), "--reach", "--timeout", "1"]) == 1
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith(("source ", "stage1 "))}
    assert rows["source"].endswith("answers")
    assert rows["stage1"].endswith("NO: connection refused (nothing listens there)")
    assert f"reach: 1 of 2 nodes answer; no answer from stage1 (127.0.0.1:{down})" in out
    path = topology(tmp_path, tiny_llama, tuple(listening))
    assert main(["check", "--topology", str(path), "--reach"]) == 0
    assert "reach: all 2 nodes answer" in capsys.readouterr().out


def test_check_without_the_model_here(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = topology(tmp_path, tmp_path / "elsewhere", (7000, 7001, 7002))
    assert main(["check", str(path)]) == 1  # valid, but the model cannot be read on this machine
    out, err = capsys.readouterr()
    assert f"{path}: valid" in out and "stage1  stage   127.0.0.1:7001  auto" in out
    assert "the model or the drafter cannot be read on this machine" in err and "not found" in err
    data = yaml.safe_load(path.read_text())
    data["model"]["num_layers"] = 6  # the split is known without the model
    path.write_text(yaml.safe_dump(data))
    assert main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "stage1  stage   127.0.0.1:7001  0-2" in out and "stage2  stage   127.0.0.1:7002  3-5" in out


# ------------------------------------------------------------------- help and exits
def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_flag_has_help_and_shows_its_default() -> None:
    subs = _subparsers(build_parser())
    assert {"prepare", "generate", "node", "up", "chat", "bench", "check", "profile", "train-drafter"} <= set(subs)
    for name, sp in subs.items():
        if name == "train-drafter":  # its own parser: see test_wrappers_and_moved_tools
            continue
        assert sp.formatter_class is HelpFormatter, name
        for a in sp._actions:
            if isinstance(a, argparse._HelpAction):
                continue
            assert a.help, f"flowspec {name} {a.option_strings or a.dest}: no help text"
            shown = HelpFormatter(prog="x")._get_help_string(a)
            if a.default not in (None, False):
                assert "default" in shown, f"flowspec {name} {a.option_strings}: default {a.default!r} not shown"
    help_text = " ".join(subs["node"].format_help().split())
    assert "--threads THREADS torch compute threads (0: torch's default) (default: 0)" in help_text
    assert "$FLOWSPEC_TOPOLOGY, unset now" in help_text and "$FLOWSPEC_NODE, unset now" in help_text


def test_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(UsageError("x")) == exit_code(TopologyError("x")) == 2
    assert exit_code(ModelError("x")) == exit_code(RingError("x")) == 1

    def interrupted() -> int:
        raise KeyboardInterrupt

    assert run_reporting("t", interrupted) == 130
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:  # argparse: a bad flag value
        main(["generate", "--prompt", "hi", "--strategy", "fastest"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["node", "--topology", "x.yaml", "--name", "a", "--drafter", "magic"])
    assert e.value.code == 2
    assert "argument --drafter: 'magic': give lookup, none, eagle, eagle:PATH or model:PATH" in capsys.readouterr().err
    assert main(["generate", "--prompt", "hi", "--model", "default", "--topology", "x.yaml"]) == 2  # UsageError
    assert main(["generate", "--prompt", "hi", "--topology", str(tmp_path / "none.yaml")]) == 2  # TopologyError
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path / "missing")]) == 1  # ModelError: runtime
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and err[0].startswith("flowspec: error: --model generates in this process")
    assert "no such topology file" in err[1] and "not found" in err[2]


def test_environment_defaults(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["node"])  # neither --topology nor $FLOWSPEC_TOPOLOGY
    assert e.value.code == 2
    path = topology(tmp_path, tiny_llama, (7000, 7001))
    monkeypatch.setenv("FLOWSPEC_TOPOLOGY", str(path))
    monkeypatch.setenv("FLOWSPEC_NODE", "stage1")
    p = build_parser()
    args = p.parse_args(["node"])
    assert (args.topology, args.name) == (str(path), "stage1")
    args = p.parse_args(["node", "--name", "source", "--topology", "other.yaml"])  # flags win
    assert (args.topology, args.name) == ("other.yaml", "source")
    shown = "".join(_subparsers(p)["up"].format_help().split())  # without the line breaks help wraps in
    assert "".join(f"(default: $FLOWSPEC_TOPOLOGY, now {str(path)!r})".split()) in shown
    assert p.parse_args(["up"]).topology_file == str(path)
    assert p.parse_args(["bench"]).topology == p.parse_args(["profile"]).topology == str(path)
    assert main(["check"]) == 0 and f"{path}: valid" in capsys.readouterr().out
    # generate and chat: the variable names the ring unless --model / --url says otherwise
    monkeypatch.setenv("FLOWSPEC_TOPOLOGY", str(tmp_path / "gone.yaml"))
    assert main(["generate", "--prompt", "hi"]) == 2
    assert main(["chat"]) == 2
    err = capsys.readouterr().err
    assert err.count("gone.yaml: no such topology file") == 2
    assert main(["generate", "--prompt", "hi", "--model", str(tmp_path / "missing")]) == 1
    assert "gone.yaml" not in capsys.readouterr().err


def test_wrappers_and_moved_tools(capsys: pytest.CaptureFixture[str]) -> None:
    env = dict(os.environ, PYTHONPATH="")
    r = subprocess.run([sys.executable, str(ROOT / "tools" / "profile_hops.py"), "--help"], capture_output=True,
                       text=True, env=env, timeout=120, cwd="/")
    assert r.returncode == 0 and r.stdout.startswith("usage: profile_hops.py"), r.stderr
    assert "--echo-sizes ECHO_SIZES" in r.stdout and "(default: 3)" in r.stdout
    # tools/train_drafter.py as a process: tests/test_train_drafter.py
    with pytest.raises(SystemExit) as e:
        main(["train-drafter", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: flowspec train-drafter") and "answer tokens to record (default: 1050000)" in out
    with pytest.raises(SystemExit) as e:
        main(["profile", "--help"])
    assert e.value.code == 0 and "usage: flowspec profile" in capsys.readouterr().out


# ----------------------------------------------------------------------- chat history
def test_chat_prompt_edits_lines_and_keeps_history(tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    pytest.importorskip("readline")
    script = tmp_path / "prompt.py"
    script.write_text(
        "from rich.console import Console\n"
        "from flowspec.chat.history import line_editing, read_line\n"
        "console = Console()\n"
        "with line_editing(True) as on:\n"
        "    print('readline', on)\n"
        "    for _ in range(2):\n"
        "        print('got', repr(read_line(console, '[bold green]you>[/] ')))\n")
    env = dict(os.environ, XDG_STATE_HOME=str(tmp_path / "state"), TERM="xterm-256color", PYTHONPATH=str(ROOT))
    history = tmp_path / "state" / "flowspec" / "chat_history"
    history.parent.mkdir(parents=True)
    history.write_text("an older line\n")
    child = pexpect.spawn(sys.executable, [str(script)], env=env, encoding="utf-8", timeout=60, dimensions=(24, 80))
    child.expect("readline True")
    child.expect("you>")
    child.send("helo\x1b[Dl\r")  # a typo mended by moving the cursor left: helo -> hello
    child.expect("got 'hello'")
    child.expect("you>")
    child.send("\x1b[A\x1b[A\r")  # Up twice: the line of an earlier chat, read from the history file
    child.expect("got 'an older line'")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert history.read_text().splitlines()[-2:] == ["hello", "an older line"]
    assert history.stat().st_mode & 0o077 == 0  # the user's alone
