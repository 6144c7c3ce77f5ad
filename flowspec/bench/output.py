"""The report on the console (rich tables) and as a picture (matplotlib, optional)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from ..errors import FlowSpecError


def _num(v: float | None, fmt: str = ".2f", suffix: str = "") -> str:
    return "-" if v is None else f"{v:{fmt}}{suffix}"


def _dtype(settings: dict[str, Any]) -> str:
    given, here = settings.get("dtype", "?"), settings.get("dtype_here")
    return f"{here} (auto, on this machine)" if given == "auto" and here else str(given)


def print_report(report: dict[str, Any], console: Any) -> None:
    from rich import box
    from rich.table import Table

    st = report["strategies"]
    bases = sorted({d["stage_busy_basis"] for d in st.values()})
    t = Table(title=f"flowspec bench: {report['cluster']} ({report['mode']}), {report['settings']['count']} "
                    f"prompts x {report['settings']['max_new_tokens']} new tokens, {_dtype(report['settings'])}",
              caption=f"tok/s: decode (after the first token); e2e: end to end; xAR / xCh: decode speedup over "
                      f"autoregressive / chunked; acc: tokens per verification; busy: stages in ring order "
                      f"({' / '.join(bases)} time); source: draft / verify / wait share of request time",
              box=box.SIMPLE_HEAD, pad_edge=False)
    for col in ("strategy", "tok/s", "e2e", "xAR", "xCh", "acc", "tau", "busy", "source"):
        t.add_column(col, justify="left" if col in ("strategy", "busy") else "right", no_wrap=True)
    for name, d in st.items():
        busy = " ".join(f"{v:.2f}" for v in d["stage_busy"].values())
        src = d["source"]
        split = "/".join(_num(src.get(k), ".0%") for k in ("draft_frac", "verify_frac", "wait_frac"))
        t.add_row(name, _num(d["tokens_per_s"], ".1f"), _num(d["e2e_tokens_per_s"], ".1f"),
                  _num(d["speedup_vs_autoregressive"], ".2f"), _num(d["speedup_vs_chunked"], ".2f"),
                  _num(d["mean_accepted"]), _num(d["tau"]), busy, split)
    console.print(t)
    turn = [f"{name} {_num(d['respond_ms']['median'], '.1f')} / {_num(d['respond_ms']['p95'], '.1f')} ms"
            for name, d in st.items() if d.get("respond_ms", {}).get("segments")]
    if turn:
        console.print("source turnaround, a segment's return to the next departure (median / p95): "
                      + ", ".join(turn))
    waste = [f"{name} {d['wasted_rows_per_token']:.2f}" for name, d in st.items()
             if d.get("wasted_rows_per_token") is not None]
    if waste:
        console.print("rows sent and later pruned, per generated token: " + ", ".join(waste))
    for line in bound_lines(st):
        console.print(line)
    hops = sorted({k for d in st.values() for k in d["bytes_per_token"]},
                  key=lambda k: [r.get("name") for r in report["ring"]].index(k.split("->")[0])
                  if k.split("->")[0] in [r.get("name") for r in report["ring"]] else -1)
    if hops:
        b = Table(title="bytes per generated token, per hop", box=box.SIMPLE_HEAD, pad_edge=False)
        b.add_column("hop")
        for name in st:
            b.add_column(name, justify="right")
        for h in hops:
            b.add_row(h, *(_num(d["bytes_per_token"].get(h), ",.0f") for d in st.values()))
        console.print(b)
    print_cpu_caps(report.get("cpu_caps"), console)
    a = report["agreement"]
    if not a["checked"]:
        console.print(f"text agreement not checked (temperature {report['settings']['temperature']:g})")
    elif a["all_agree"]:
        console.print(f"[green]all {len(st)} strategies produced the same text on all {a['prompts']} prompts "
                      "(temperature 0)[/green]")
    else:
        first = a["mismatches"][0]
        console.print(f"[red]strategies disagree on {len(a['mismatches'])} (prompt, strategy) pairs; e.g. "
                      f"{first['strategy']} differs from {first['reference']} on prompt {first['prompt'] + 1} "
                      f"at token {first['first_diff']}[/red]")


def bound_lines(st: dict[str, Any]) -> list[str]:
    """The round bound of every drafting strategy: how close scheduling got, what tau would take."""
    lines = []
    for name, d in st.items():
        b = d.get("round_bound") or {}
        if name == "autoregressive" or not b.get("tokens_per_s"):
            continue
        line = (f"{name}: a round lasts at least a ring trip: tau {d['tau']:.2f} / ({b['trip_ms']:.0f} ms trip + "
                f"{b['floor_ms'] - b['trip_ms']:.0f} ms turnaround) = {b['tokens_per_s']:.1f} tok/s at most, "
                f"{_num(b['reached'], '.0%')} reached")
        if b.get("tau_for_target"):
            line += f"; {b['target_speedup']:g}x autoregressive needs tau >= {b['tau_for_target']:.2f} at this trip"
        lines.append(line)
        lines.extend(rounds_lines(name, d.get("rounds_profile")))
    return lines


def rounds_lines(name: str, prof: dict[str, Any] | None, depths: int = 8) -> list[str]:
    """Why a drafting strategy's rounds ended, and its acceptance by depth in a round."""
    if not prof:
        return []
    ends = prof["ends"]
    total = ends["missed"] + ends["undrafted"]
    if not total:
        return []
    share = " ".join(f"{a:.2f}" for a in prof["by_depth"][:depths])
    return [f"{name}: {total} rounds ended, {ends['missed'] / total:.0%} where the drafted children missed the "
            f"target's token, {ends['undrafted'] / total:.0%} where the tree had not grown yet; "
            f"accepted by depth in a round (0, 1, ...): {share}"]


def print_cpu_caps(caps: dict[str, Any] | None, console: Any) -> None:
    """One line of the CPU caps as applied; every warning in red (an uncapped node runs at full speed)."""
    if not caps or not caps.get("nodes"):
        return
    parts = []
    for name, c in caps["nodes"].items():
        if c.get("capped"):
            thr = c.get("throttled_periods")
            per = c.get("periods")
            extra = f", throttled in {thr}/{per} periods" if thr is not None and per else ""
            parts.append(f"{name} {c['cores']:g} core ({c['quota_us']}/{c['period_us']} us{extra})")
        elif c.get("wanted") is None:
            parts.append(f"{name} uncapped")
        else:
            parts.append(f"[red]{name} UNCAPPED[/red]")
    console.print(f"cpu caps ({caps.get('mechanism') or 'none'}): " + ", ".join(parts))
    for w in caps.get("warnings", []):
        console.print(f"[red]WARNING: {w}[/red]")


def check_plot_available() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise FlowSpecError("--plot needs matplotlib: pip install 'flowspec[plot]' (or pip install matplotlib)")


def plot_report(report: dict[str, Any], path: str | Path) -> None:
    """Bars of tokens/s by strategy, and a timeline of one request per strategy (when traced)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = report["strategies"]
    names = list(st)
    first = min((r["prompt_index"] for r in report["requests"]), default=0)
    traced = {r["strategy"]: r for r in report["requests"]
              if r["prompt_index"] == first and isinstance(r["stats"].get("trace"), dict)}
    rows = len(traced)
    fig, axes = plt.subplots(1 + rows, 1, figsize=(10, 3 + 1.6 * rows), squeeze=False,
                             gridspec_kw={"height_ratios": [2] + [1] * rows})
    ax = axes[0][0]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [st[n]["tokens_per_s"] for n in names], 0.4, label="decode")
    ax.bar([i + 0.2 for i in x], [st[n]["e2e_tokens_per_s"] for n in names], 0.4, label="end to end")
    for i, n in enumerate(names):
        sp = st[n].get("speedup_vs_autoregressive")
        if sp is not None:
            ax.annotate(f"{sp:.2f}x", (i - 0.2, st[n]["tokens_per_s"]), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), names)
    ax.set_ylabel("tokens/s")
    ax.set_title(f"{report['cluster']}: {report['settings']['count']} prompts, "
                 f"{report['settings']['max_new_tokens']} new tokens")
    top = max([st[n]["tokens_per_s"] for n in names] + [st[n]["e2e_tokens_per_s"] for n in names] + [1e-9])
    ax.set_ylim(0, top * 1.3)  # room for the labels and the legend above the bars
    ax.legend(loc="upper right", ncol=2)
    order = ["source"] + [r.get("name") for r in report["ring"]]
    end = max((float(r["stats"].get("total_s", 0)) for r in traced.values()), default=1.0)
    for row, (name, rec) in enumerate(traced.items(), 1):
        axt = axes[row][0]
        tr, stats = rec["stats"]["trace"], rec["stats"]
        t0 = float(tr["t0"])
        lanes = {n: j for j, n in enumerate(order)}
        spans: dict[str, list[tuple[float, float]]] = {}
        for seg in tr.get("segments", []):
            for h in seg.get("hops", []):
                spans.setdefault(str(h[0]), []).append((float(h[2]) - t0, float(h[3]) - float(h[2])))
        spans["source"] = [(float(s) - t0, float(e) - float(s)) for s, e, *_ in tr.get("source", [])]
        for n, sp in spans.items():
            j = lanes.setdefault(n, len(lanes))
            axt.broken_barh(sp, (j - 0.4, 0.8))
        axt.axvspan(0, float(stats.get("prefill_s", 0)), color="0.9", zorder=0)
        axt.set_yticks(range(len(lanes)), list(lanes))
        axt.set_xlim(0, end)
        axt.invert_yaxis()
        axt.set_title(f"{name}: one request ({stats.get('new_tokens')} tokens; shaded: prefill)", fontsize=9)
    axes[-1][0].set_xlabel("seconds since the request started")
    fig.tight_layout()
    fig.savefig(str(path), dpi=120)
    plt.close(fig)
