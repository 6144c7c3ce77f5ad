"""`flowspec bench`: the decoding strategies side by side on one ring (see cli.py).

prompts.py (MT-bench / JSONL prompts), run.py (the requests, interleaved by prompt),
summary.py (per-strategy numbers, text agreement, the JSON report), output.py (tables and
the plot), cli.py (the command).
"""

from __future__ import annotations

from .cli import add_bench_command, cmd_bench
from .options import BenchOptions
from .output import check_plot_available, plot_report, print_cpu_caps, print_report
from .prompts import MTBENCH, load_prompts, mtbench_first_turns, parse_strategies, read_jsonl_prompts
from .run import request_for, run_requests, schedule
from .summary import REPORT_VERSION, agreement, build_report, summarize, summarize_strategy

__all__ = ["MTBENCH", "REPORT_VERSION", "BenchOptions", "add_bench_command", "agreement", "build_report",
           "check_plot_available", "cmd_bench", "load_prompts", "mtbench_first_turns", "parse_strategies",
           "plot_report", "print_cpu_caps", "print_report", "read_jsonl_prompts", "request_for", "run_requests",
           "schedule", "summarize", "summarize_strategy"]
