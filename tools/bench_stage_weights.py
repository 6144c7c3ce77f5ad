#!/usr/bin/env python
"""What ``model.stage_weights: int8`` costs and saves, on the default model.

* memory: an 8-layer middle stage (layers 8-15) loaded in a fresh process per setting: its
  weight bytes (from its tensors) and the rise of the process's RSS high-water mark while
  loading (VmHWM, Linux);
* speed: ``Stage.forward`` of the same 8 layers on segments of 1 and 8 rows (a random tree)
  over a committed prefix of 128 tokens, the settings taking turns run by run; medians;
* agreement: greedy decoding in one process (``LocalPipeline``, 2 stages) of the first
  ``--prompts`` MT-bench first turns, ``--tokens`` tokens each, with int8 stages against the
  same dtype's own weights: tokens identical until the first divergence, the share of
  positions that hold the same token, and teacher-forced, the share of the reference
  answer's tokens that int8 also chooses after the same context. bfloat16 against float32
  is measured the same way, as the scale of what a change of precision alone does.

    python tools/bench_stage_weights.py --json stage_weights.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch

from bench_engine import random_tree_parents, timed_pass
from flowspec.model.config import ModelConfig
from flowspec.model.loader import resolve_model
from flowspec.model.pipeline import LocalPipeline, greedy_generate, prefill
from flowspec.model.stage import Segment, Stage, parse_dtype

log = logging.getLogger("bench_stage_weights")

SETTINGS = (("float32", "same"), ("bfloat16", "same"), ("bfloat16", "int8"), ("float32", "int8"))
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8")

PEAK_PROBE = textwrap.dedent("""
    import json, sys, torch
    from flowspec.model.stage import Stage
    def status():
        out = {}
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
        return out
    folder, start, end, dtype, weights = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    torch.set_num_threads(1)
    torch.zeros(1).to(getattr(torch, dtype))
    try:  # reset the high-water mark to the current RSS (Linux 4.0+)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = status()
    stage = Stage.load(folder, start, end, dtype=dtype, max_context=16, stage_weights=weights)
    after = status()
    print(json.dumps({"peak": after["VmHWM"] - min(before["VmRSS"], before["VmHWM"]),
                      "weights": stage.weight_bytes()}))
""")


def cpu_info() -> dict[str, Any]:
    """The CPU's model name and which of the flags that matter here it has."""
    name, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not name:
                name = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    name = name or platform.processor() or "?"
    return {"model": name, "flags": {f: f in flags for f in CPU_FLAGS}, "threads": torch.get_num_threads()}


def stage_memory(folder: Path, dtype: str, weights: str, start: int = 8, end: int = 16) -> dict[str, Any]:
    """Weight bytes and load peak of layers [start, end) in a fresh process."""
    r = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(folder), str(start), str(end), dtype, weights],
                       capture_output=True, text=True, timeout=300)
    if r.returncode:
        raise RuntimeError(r.stderr[-2000:])
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return {"dtype": dtype, "stage_weights": weights, "layers": f"{start}-{end - 1}", "weights_mb":
            round(d["weights"] / 1e6, 1), "peak_mb": round(d["peak"] / 1e6, 1),
            "ratio": round(d["peak"] / d["weights"], 2)}


def stage_speed(folder: Path, cfg: ModelConfig, sizes: list[int], repeats: int, warmup: int,
                start: int = 8, end: int = 16, prefix: int = 128, seed: int = 0) -> list[dict[str, Any]]:
    """Median Stage.forward time of layers [start, end) for each setting and segment size: a
    random tree of n nodes over a committed prefix of `prefix` tokens, dropped again outside
    the timing. The settings take turns run by run, so that a busy moment of a shared
    machine falls on all of them alike."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    stages = {s: Stage.load(folder, start, end, first=False, last=False, dtype=s[0], cfg=cfg, stage_weights=s[1],
                            max_context=prefix + max(sizes) + 8) for s in SETTINGS}
    ids = list(range(prefix))
    context = torch.randn(prefix, cfg.hidden_size, generator=gen)
    for (dtype, _), stage in stages.items():
        stage(Segment(ids, [i - 1 for i in ids], ids, hidden=context.to(parse_dtype(dtype))))
        stage.apply_update(ids, [])
    inputs = {n: torch.randn(n, cfg.hidden_size, generator=gen) for n in sizes}
    samples: dict[tuple[str, str, int], list[float]] = {(*s, n): [] for s in SETTINGS for n in sizes}
    next_id = prefix
    for r in range(warmup + repeats):
        for n in sizes:
            nids, parents, depths = random_tree_parents(rng, n, prefix - 1, next_id)
            next_id += n
            for (dtype, weights), stage in stages.items():
                seg = Segment(nids, parents, [prefix + d - 1 for d in depths], hidden=inputs[n].to(parse_dtype(dtype)))
                took = timed_pass(stage, seg)
                if r >= warmup:
                    samples[(dtype, weights, n)].append(took)
    return [{"dtype": d, "stage_weights": w, "layers": f"{start}-{end - 1}", "rows": n,
             "median_ms": round(statistics.median(v) * 1e3, 2), "min_ms": round(min(v) * 1e3, 2)}
            for (d, w, n), v in samples.items()]


def compare(a: list[int], b: list[int]) -> dict[str, Any]:
    """Tokens equal until the first divergence, and the share of equal positions."""
    n = min(len(a), len(b))
    first = next((i for i in range(n) if a[i] != b[i]), n)
    same = sum(1 for i in range(n) if a[i] == b[i])
    return {"tokens": n, "identical_prefix": first, "same_positions": same}


def forced_choices(pipe: LocalPipeline, prompt: list[int], answer: list[int]) -> list[int]:
    """The token `pipe` chooses (greedy) at each position of `answer` when it is given the
    prompt and the answer's own tokens before that position, one token a pass as in decoding."""
    pipe.reset()
    logits = prefill(pipe, prompt)
    chosen: list[int] = []
    for i, tok in enumerate(answer):
        chosen.append(int(torch.argmax(logits)))
        nid = len(prompt) + i
        logits = pipe.run(Segment([nid], [nid - 1], [nid], tokens=torch.tensor([tok]))).logits[0]
        pipe.apply_update([nid], [])
    return chosen


def agreement(folder: Path, prompts: list[list[int]], tokens: int, eos: tuple[int, ...]
              ) -> list[dict[str, Any]]:
    """Greedy answers of each setting, int8 against its dtype and bfloat16 against float32:
    free-running (until the first divergence; equal positions) and teacher-forced (the share
    of the reference answer's tokens that the other setting also chooses after the same
    context: how often the two models pick the same next token)."""
    pipes = {s: LocalPipeline.load(folder, 2, dtype=s[0], max_context=1024, stage_weights=s[1]) for s in SETTINGS}
    answers = {s: [greedy_generate(pipe, p, tokens, eos).token_ids for p in prompts] for s, pipe in pipes.items()}
    pairs = ((("bfloat16", "int8"), ("bfloat16", "same")), (("float32", "int8"), ("float32", "same")),
             (("bfloat16", "same"), ("float32", "same")))
    rows = []
    for x, y in pairs:
        per = [compare(a, b) for a, b in zip(answers[x], answers[y])]
        forced = [compare(forced_choices(pipes[x], p, ref), ref) for p, ref in zip(prompts, answers[y])]
        total = sum(p["tokens"] for p in per)
        rows.append({"setting": f"{x[0]}/{x[1]}", "against": f"{y[0]}/{y[1]}", "per_prompt": per,
                     "same_share": round(sum(p["same_positions"] for p in per) / max(1, total), 3),
                     "forced_same": [f["same_positions"] for f in forced],
                     "forced_share": round(sum(f["same_positions"] for f in forced) /
                                           max(1, sum(f["tokens"] for f in forced)), 3)})
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=3, help="MT-bench first turns to decode")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--repeats", type=int, default=200, help="timed passes per segment size")
    p.add_argument("--warmup", type=int, default=20, help="untimed passes first")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--skip", default="", help="comma list of parts to skip: memory,speed,agreement")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    folder = resolve_model("default")
    cfg = ModelConfig.from_file(str(folder / "config.json"))
    out: dict[str, Any] = {"cpu": cpu_info(), "torch": torch.__version__}
    log.info("cpu: %s", out["cpu"])
    if "memory" not in skip:
        out["memory"] = [stage_memory(folder, d, w) for d, w in SETTINGS]
        for row in out["memory"]:
            log.info("memory: %s", row)
    if "speed" not in skip:
        out["speed"] = stage_speed(folder, cfg, [1, 8], args.repeats, args.warmup)
        for row in out["speed"]:
            log.info("speed: %s", row)
    if "agreement" not in skip:
        from flowspec.bench.prompts import mtbench_first_turns
        from flowspec.model.tokenizer import Tokenizer

        tok = Tokenizer(folder)
        prompts = [tok.encode_prompt(t) for t in mtbench_first_turns()[: args.prompts]]
        out["agreement"] = agreement(folder, prompts, args.tokens, tok.eos_ids)
        for row in out["agreement"]:
            log.info("agreement: %s", row)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
