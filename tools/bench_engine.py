#!/usr/bin/env python
"""Micro-benchmark of the model engine: one decoder layer and the lm_head, by segment size.

For each weight dtype (float32, bfloat16) one middle decoder layer of the model is loaded
on its own (``Stage.load`` of a one-layer range). A committed prefix of ``--prefix`` tokens
is cached first; then, for each segment size n, every timed run plans a random draft tree
of n new nodes through the real ``KVCache`` (so the attention mask is a tree mask over
prefix + tree), runs the layer on it, and drops the nodes again (then compacts, outside the
timing), so that every run sees the same cache. The lm_head is timed for 1, 16 and 64 rows.

A single layer's weights stay hot in the CPU caches from run to run, which flatters it.
``--stage K`` times a real stage instead, the way a ring node runs one: K consecutive
decoder layers (``Stage.load``, from the middle of the model), every run a whole
``Stage.forward`` (plan, rotary, all K layers in sequence) on a random tree of n nodes over
the cached prefix, for n in ``--stage-sizes`` (default 1, 8, 16); with ``--gap-ms`` of
sleep before each run (a node idles between segments while the other stages compute).

Times are medians over ``--repeats`` runs after ``--warmup`` runs, with one torch thread
unless ``--threads`` says otherwise. The KV cache and attention run in float32 whatever the
weight dtype (the engine's default).

    python tools/bench_engine.py                 # default model, one thread
    python tools/bench_engine.py --threads 2 --json bench.json
    python tools/bench_engine.py --stage 8 --dtypes bfloat16 --gap-ms 20    # an edge-5 stage only
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import random
import statistics
import sys
import time
from typing import Any

import torch

from flowspec.model.blocks import rope_cos_sin
from flowspec.model.config import ModelConfig
from flowspec.model.loader import resolve_model
from flowspec.model.stage import LMHead, Segment, Stage, parse_dtype

log = logging.getLogger("bench_engine")

LAYER_SIZES = (1, 4, 8, 16, 32, 64, 128)
HEAD_SIZES = (1, 16, 64)
STAGE_SIZES = (1, 8, 16)


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def timed_pass(stage: Any, seg: Any) -> float:
    """Seconds one pass of `seg` through `stage` takes; its nodes are dropped afterwards, so the
    cache holds only the committed prefix again."""
    t0 = time.perf_counter()
    stage(seg)
    t1 = time.perf_counter()
    stage.cache.drop(seg.node_ids)
    stage.cache.compact()
    return t1 - t0


def random_tree_parents(rng: random.Random, n: int, root: int, first_id: int) -> tuple[list[int], list[int], list[int]]:
    """Ids, parents and depths (1 = child of `root`) of a random tree of n nodes."""
    ids = list(range(first_id, first_id + n))
    parents: list[int] = []
    depths: list[int] = []
    for i in range(n):
        k = rng.randrange(i + 1)  # 0: hang off the committed prefix, else off node k-1
        parents.append(root if k == 0 else ids[k - 1])
        depths.append(1 if k == 0 else depths[k - 1] + 1)
    return ids, parents, depths


def bench_layer(folder: Any, cfg: ModelConfig, dtype: str, prefix: int, sizes: list[int],
                repeats: int, warmup: int, seed: int) -> list[dict[str, Any]]:
    layer_idx = cfg.num_layers // 2
    stage = Stage.load(folder, layer_idx, layer_idx + 1, first=False, last=False, dtype=dtype,
                       max_context=prefix + max(sizes) + 8, cfg=cfg)
    wdt = parse_dtype(dtype)
    layer, cache = stage.layers[0], stage.cache
    gen = torch.Generator().manual_seed(seed)
    # the committed prefix, through the real stage (plan + rope + layer), then committed
    ids = list(range(prefix))
    hidden = torch.randn(prefix, cfg.hidden_size, generator=gen).to(wdt)
    stage(Segment(ids, [i - 1 for i in ids], ids, hidden=hidden))
    stage.apply_update(ids, [])
    root = prefix - 1
    next_id = prefix
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for n in sizes:
            x = torch.randn(n, cfg.hidden_size, generator=gen).to(wdt)
            layer_s: list[float] = []
            plan_s: list[float] = []
            for r in range(warmup + repeats):
                nids, parents, depths = random_tree_parents(rng, n, root, next_id)
                next_id += n
                t0 = time.perf_counter()
                plan = cache.plan(nids, parents)
                t1 = time.perf_counter()
                cos, sin = rope_cos_sin(stage.inv_freq, torch.tensor([prefix + d - 1 for d in depths]))
                t2 = time.perf_counter()
                layer(x, cos, sin, cache.keys[0], cache.values[0], plan.slots, plan.span, plan.mask)
                t3 = time.perf_counter()
                cache.drop(nids)
                cache.compact()
                assert cache.span == prefix
                if r >= warmup:
                    layer_s.append(t3 - t2)
                    plan_s.append(t1 - t0)
            med = _median_ms(layer_s)
            rows.append({
                "dtype": dtype, "n": n, "span": prefix + n, "layer_ms": round(med, 4),
                "layer_min_ms": round(min(layer_s) * 1e3, 4), "us_per_token": round(med * 1e3 / n, 2),
                "plan_ms": round(_median_ms(plan_s), 4),
            })
            log.debug("layer %s n=%d: %.3f ms (plan %.3f ms)", dtype, n, med, rows[-1]["plan_ms"])
    return rows


def bench_stage(folder: Any, cfg: ModelConfig, dtype: str, layers: int, prefix: int, sizes: list[int],
                repeats: int, warmup: int, seed: int, gap_s: float = 0.0,
                stage_weights: str = "same") -> list[dict[str, Any]]:
    """A stage of `layers` consecutive layers as a node runs it: Stage.forward on a random
    tree of n new nodes over a committed prefix (then dropped, outside the timing).
    stage_weights: "int8" for int8 projections (model.stage_weights)."""
    start = max(0, (cfg.num_layers - layers) // 2)
    stage = Stage.load(folder, start, start + layers, first=False, last=False, dtype=dtype,
                       max_context=prefix + max(sizes) + 8, cfg=cfg, stage_weights=stage_weights)
    wdt = parse_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    ids = list(range(prefix))
    stage(Segment(ids, [i - 1 for i in ids], ids, hidden=torch.randn(prefix, cfg.hidden_size, generator=gen).to(wdt)))
    stage.apply_update(ids, [])
    root, next_id = prefix - 1, prefix
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        x = torch.randn(n, cfg.hidden_size, generator=gen).to(wdt)
        samples: list[float] = []
        for r in range(warmup + repeats):
            nids, parents, depths = random_tree_parents(rng, n, root, next_id)
            next_id += n
            seg = Segment(nids, parents, [prefix + d - 1 for d in depths], hidden=x)
            if gap_s:
                time.sleep(gap_s)
            took = timed_pass(stage, seg)
            if r >= warmup:
                samples.append(took)
        med = _median_ms(samples)
        rows.append({"dtype": dtype, "stage_weights": stage_weights, "n": n, "layers": layers,
                     "stage_ms": round(med, 4),
                     "stage_min_ms": round(min(samples) * 1e3, 4), "ms_per_layer": round(med / layers, 4),
                     "us_per_token": round(med * 1e3 / n, 2)})
        log.debug("stage of %d layers %s n=%d: %.3f ms", layers, dtype, n, med)
    return rows


def bench_head(folder: Any, cfg: ModelConfig, dtype: str, sizes: list[int], repeats: int,
               warmup: int, seed: int) -> list[dict[str, Any]]:
    head = LMHead.load(folder, dtype=dtype, cfg=cfg)
    gen = torch.Generator().manual_seed(seed)
    rows: list[dict[str, Any]] = []
    for n in sizes:
        h = torch.randn(n, cfg.hidden_size, generator=gen).to(parse_dtype(dtype))
        samples: list[float] = []
        for r in range(warmup + repeats):
            t0 = time.perf_counter()
            head(h)
            t1 = time.perf_counter()
            if r >= warmup:
                samples.append(t1 - t0)
        med = _median_ms(samples)
        rows.append({"dtype": dtype, "n": n, "head_ms": round(med, 4),
                     "head_min_ms": round(min(samples) * 1e3, 4)})
        log.debug("lm_head %s n=%d: %.3f ms", dtype, n, med)
    return rows


def render(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=120)
    dtypes = result["dtypes"]
    m = result["model"]
    console.print(
        f"[bold]FlowSpec engine micro-benchmark[/bold]: {m['name']}\n"
        f"{m['layers']} layers, hidden {m['hidden']}, {m['heads']}/{m['kv_heads']} heads, "
        f"{m['layer_params'] / 1e6:.2f} M params per layer, vocab {m['vocab']}\n"
        f"torch {result['torch']} on {result['machine']}, {result['threads']} thread(s); median of "
        f"{result['repeats']} runs after {result['warmup']} warm-up; KV cache and attention in float32"
    )
    if result.get("stage"):
        render_stage(result, console)
        return
    t = Table(title=f"one decoder layer: n new tree nodes over a committed prefix of {result['prefix']}")
    t.add_column("n", justify="right")
    for dt in dtypes:
        t.add_column(f"{dt} ms", justify="right")
        t.add_column(f"{dt} µs/token", justify="right")
    t.add_column("KVCache.plan ms", justify="right")
    by = {(r["dtype"], r["n"]): r for r in result["layer"]}
    for n in result["layer_sizes"]:
        cells = [str(n)]
        for dt in dtypes:
            r = by[(dt, n)]
            cells += [f"{r['layer_ms']:.3f}", f"{r['us_per_token']:.1f}"]
        cells.append(f"{by[(dtypes[0], n)]['plan_ms']:.3f}")
        t.add_row(*cells)
    console.print(t)
    h = Table(title=f"lm_head {m['vocab']} x {m['hidden']} (float32 logits)", min_width=60)
    h.add_column("n", justify="right")
    for dt in dtypes:
        h.add_column(f"{dt} ms", justify="right")
    byh = {(r["dtype"], r["n"]): r for r in result["lm_head"]}
    for n in result["head_sizes"]:
        h.add_row(str(n), *[f"{byh[(dt, n)]['head_ms']:.3f}" for dt in dtypes])
    console.print(h)


def render_stage(result: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    k = result["stage_layers"]
    gap = f", {result['gap_ms']:g} ms idle before each run" if result.get("gap_ms") else ", back to back"
    t = Table(title=f"one stage of {k} layers (Stage.forward): n new tree nodes over a committed prefix of "
                    f"{result['prefix']}{gap}")
    t.add_column("n", justify="right")
    for dt in result["dtypes"]:
        t.add_column(f"{dt} ms", justify="right")
        t.add_column(f"{dt} ms/layer", justify="right")
    by = {(r["dtype"], r["n"]): r for r in result["stage"]}
    for n in result["stage_sizes"]:
        cells = [str(n)]
        for dt in result["dtypes"]:
            r = by[(dt, n)]
            cells += [f"{r['stage_ms']:.3f}", f"{r['ms_per_layer']:.3f}"]
        t.add_row(*cells)
    console.print(t)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="model folder, .gguf or 'default'")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated weight dtypes")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    p.add_argument("--prefix", type=int, default=256, help="committed tokens in the KV cache")
    p.add_argument("--sizes", default=",".join(map(str, LAYER_SIZES)), help="segment sizes for the layer")
    p.add_argument("--head-sizes", default=",".join(map(str, HEAD_SIZES)), help="rows for the lm_head")
    p.add_argument("--stage", type=int, default=0, metavar="K",
                   help="time a stage of K layers as a node runs it, instead of one layer and the lm_head")
    p.add_argument("--stage-sizes", default=",".join(map(str, STAGE_SIZES)), help="segment sizes for --stage")
    p.add_argument("--gap-ms", type=float, default=0.0, help="--stage: idle time before each run")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    p.add_argument("-v", "--verbose", action="store_true", help="log each measurement (debug level)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.repeats < 1 or args.warmup < 0 or args.prefix < 1 or args.threads < 1:
        p.error("--repeats, --prefix and --threads must be >= 1, --warmup >= 0")
    if args.stage < 0 or args.gap_ms < 0:
        p.error("--stage and --gap-ms must be >= 0")
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    head_sizes = [int(s) for s in args.head_sizes.split(",") if s]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        parse_dtype(d)

    stage_sizes = [int(s) for s in args.stage_sizes.split(",") if s]
    folder = resolve_model(args.model)
    cfg = ModelConfig.from_file(str(folder / "config.json"))
    if args.stage > cfg.num_layers:
        p.error(f"--stage {args.stage}: the model has {cfg.num_layers} layers")
    log.info("benchmarking %s with %d thread(s)", folder.name, args.threads)
    layer_rows: list[dict[str, Any]] = []
    head_rows: list[dict[str, Any]] = []
    stage_rows: list[dict[str, Any]] = []
    for dt in dtypes:
        if args.stage:
            stage_rows += bench_stage(folder, cfg, dt, args.stage, args.prefix, stage_sizes, args.repeats,
                                      args.warmup, args.seed, args.gap_ms / 1e3)
            continue
        layer_rows += bench_layer(folder, cfg, dt, args.prefix, sizes, args.repeats, args.warmup, args.seed)
        head_rows += bench_head(folder, cfg, dt, head_sizes, args.repeats, args.warmup, args.seed)
    result = {
        "model": {"name": folder.name, "layers": cfg.num_layers, "hidden": cfg.hidden_size,
                  "heads": cfg.num_heads, "kv_heads": cfg.num_kv_heads, "vocab": cfg.vocab_size,
                  "layer_params": cfg.layer_params()},
        "torch": torch.__version__, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": args.threads, "prefix": args.prefix, "repeats": args.repeats, "warmup": args.warmup,
        "dtypes": dtypes, "layer_sizes": sizes, "head_sizes": head_sizes,
        "layer": layer_rows, "lm_head": head_rows,
    }
    if args.stage:
        result.update({"stage_layers": args.stage, "stage_sizes": stage_sizes, "gap_ms": args.gap_ms,
                       "stage": stage_rows})
    render(result)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
