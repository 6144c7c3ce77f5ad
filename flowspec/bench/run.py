"""Running the requests: prompt by prompt, every strategy, over one RingClient connection."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from ..config import Topology
from ..errors import FlowSpecError
from .options import BenchOptions
from .prompts import split_variant

log = logging.getLogger(__name__)


def request_for(opts: BenchOptions, prompt: str, strategy: str) -> dict[str, Any]:
    """The request for one prompt; `strategy` is a --strategies label (a variant carries its
    own tree settings)."""
    name, tree, other = split_variant(strategy)
    req = {"prompt": prompt, "max_new_tokens": opts.max_new_tokens, "strategy": name,
           "temperature": opts.temperature, "seed": opts.seed, "trace": True, **other}
    if tree:
        req["tree"] = tree
    return req


def schedule(opts: BenchOptions) -> list[tuple[int, str]]:
    """(prompt index, strategy) in run order: prompt by prompt, strategies rotating."""
    k = len(opts.strategies)
    out = []
    for i in range(len(opts.prompts)):
        order = opts.strategies[i % k:] + opts.strategies[:i % k]
        out += [(i, s) for s in order]
    return out


ProgressFn = Callable[[str, int], None]  # (what runs now, requests finished by this call: 0 or 1)


async def run_requests(topo: Topology, key: bytes, opts: BenchOptions, progress: ProgressFn = lambda what, n: None
                       ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Warm up, then run the schedule on one connection; (ring status, one record per request)."""
    from ..runtime.client import RingClient

    client = await RingClient.connect(topo, key)
    try:
        status = await client.status()

        async def one(i: int, strategy: str) -> dict[str, Any]:
            req = request_for(opts, opts.prompts[i], strategy)
            try:
                return await asyncio.wait_for(client.generate(req), opts.request_timeout)
            finally:
                progress(f"prompt {i + 1} {strategy}", 1)

        for w in range(opts.warmup):
            for s in opts.strategies:
                progress(f"warm-up {w + 1}/{opts.warmup} {s}", 0)
                await one(w % len(opts.prompts), s)
        records: list[dict[str, Any]] = []
        skipped: set[int] = set()
        for i, s in schedule(opts):
            if i in skipped:
                progress(f"prompt {i + 1} skipped", 1)
                continue
            progress(f"prompt {i + 1}/{len(opts.prompts)} {s}", 0)
            try:
                done = await one(i, s)
            except asyncio.TimeoutError:
                raise FlowSpecError(f"prompt {i + 1} with {s} took longer than {opts.request_timeout:.0f} s") from None
            except FlowSpecError as e:
                if not str(e).startswith("bad request"):
                    raise
                log.warning("prompt %d skipped for every strategy: %s", i + 1, e)
                skipped.add(i)
                records = [r for r in records if r["prompt_index"] != i]
                continue
            records.append({"prompt_index": i, "strategy": s, "text": done.get("text", ""),
                            "token_ids": list(done.get("token_ids", [])),
                            "finish_reason": done.get("finish_reason"), "stats": done.get("stats", {})})
        return status, records
    finally:
        await client.close()
