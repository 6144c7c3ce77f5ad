"""What each node of a topology holds: its layer range and the bytes of its weights and KV caches.

The layer split is the one every node computes when it starts (``layers: auto`` planned at
the largest dtype ``auto`` may choose, so that every node agrees whatever its CPU), so
``flowspec check`` prints exactly what the nodes will load. Sizes come from the model's
config.json and the dtype, without loading any weights. Imports config and model only.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from .config import Topology
from .errors import ModelError
from .model.config import ModelConfig
from .model.dtypes import planning_bytes
from .model.int8 import layer_bytes as int8_layer_bytes

KV_BYTES = 4  # keys and values are float32 whatever the weights' dtype (model/kvcache.py)
_FLOAT_DTYPES = {"F32", "F16", "BF16", "F64"}


@dataclass(frozen=True)
class NodePlan:
    """One node: where it listens, what it holds and how many bytes that takes."""

    name: str
    role: str
    address: str  # host:port of its ring link
    layers: tuple[int, int] | None  # half-open decoder layers; None for the source
    holds: str  # in words: "embedding + layers 0-14", "lm_head + drafter (eagle)"
    weight_bytes: int  # weights in the planning dtype
    kv_bytes: int  # KV caches: decoding.max_active of model.max_context slots


def lm_head_layers(cfg: ModelConfig) -> float:
    """The lm_head's size in decoder layers (what the last stage holds more with verify: last_stage)."""
    return cfg.vocab_size * cfg.hidden_size / cfg.layer_params()


def layer_bytes(topo: Topology, cfg: ModelConfig) -> int:
    """Bytes of one decoder layer on a stage: in the planning dtype, or with int8 projections
    (``model.stage_weights: int8``; scales, norms and biases in the planning dtype)."""
    if topo.model.stage_weights == "int8":
        return int8_layer_bytes(cfg, planning_bytes(topo.model.dtype))
    return cfg.layer_params() * planning_bytes(topo.model.dtype)


def layer_ranges(topo: Topology, cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Every stage's half-open layer range, as every node computes it (TopologyError when it cannot)."""
    per_layer = layer_bytes(topo, cfg)
    if topo.model.stage_weights == "int8":  # the lm_head stays in the planning dtype: more int8 layers' memory
        head_bytes = cfg.vocab_size * cfg.hidden_size * planning_bytes(topo.model.dtype)
        return topo.resolve_layers(cfg.num_layers, per_layer, head_bytes / per_layer, lm_head_layers(cfg))
    return topo.resolve_layers(cfg.num_layers, per_layer, lm_head_layers(cfg))


def plan_ring(topo: Topology, cfg: ModelConfig, drafter_params: int = 0) -> list[NodePlan]:
    """One NodePlan per node in ring order. drafter_params: what the source's drafter holds
    besides the target's lm_head (see drafter_params)."""
    size = planning_bytes(topo.model.dtype)
    per_layer = layer_bytes(topo, cfg)
    ranges = layer_ranges(topo, cfg)
    vh = cfg.vocab_size * cfg.hidden_size
    kv_per_layer = 2 * cfg.num_kv_heads * cfg.head_dim * topo.model.max_context * KV_BYTES
    last = topo.stages[-1].name
    out: list[NodePlan] = []
    for n in topo.nodes:
        address = f"{n.host}:{n.port}"
        if n.is_source:
            drafter = topo.model.drafter.kind
            holds = "lm_head" + ("" if drafter == "none" else f" + drafter ({drafter})")
            out.append(NodePlan(n.name, n.role, address, None, holds, (vh + drafter_params) * size, 0))
            continue
        if n.name not in ranges:  # a node the layer split does not place holds no layers of its own
            holds = "spare: the layers of the stage it replaces" if n.role == "spare" else "no layers of its own"
            out.append(NodePlan(n.name, n.role, address, None, holds, 0, 0))
            continue
        a, b = ranges[n.name]
        params = 0  # besides the layers: embedding, norm, lm_head (in the planning dtype)
        parts = [f"layers {a}-{b - 1}" if b - a > 1 else f"layer {a}"]
        if a == 0:
            params += vh
            parts.insert(0, "embedding")
        if b == cfg.num_layers:
            params += cfg.hidden_size
            parts.append("norm")
            if n.name == last and topo.decoding.lm_head_at_last_stage:
                params += vh
                parts.append("lm_head")
        kv = (b - a) * kv_per_layer * topo.decoding.max_active
        weights = (b - a) * per_layer + params * size
        out.append(NodePlan(n.name, n.role, address, (a, b), " + ".join(parts), weights, kv))
    return out


def model_params(cfg: ModelConfig) -> int:
    """Parameters of a whole model: embedding, layers, final norm and, when untied, the lm_head."""
    vh = cfg.vocab_size * cfg.hidden_size
    return vh + cfg.num_layers * cfg.layer_params() + cfg.hidden_size + (0 if cfg.tie_word_embeddings else vh)


def drafter_params(topo: Topology, cfg: ModelConfig) -> int:
    """Parameters the source's drafter holds besides the target's lm_head: an EAGLE head its
    floating tensors, the rows of its drafting vocabulary and its own copy of the target's
    embedding (and untied lm_head); a draft model all of its weights; lookup and none nothing.
    ModelError when the drafter's files cannot be read."""
    spec = topo.model.drafter
    if spec.kind in ("none", "lookup"):
        return 0
    if spec.kind == "model":
        from .model.loader import resolve_model

        folder = resolve_model(str(spec.path))
        return model_params(ModelConfig.from_file(str(folder / "config.json")))
    from .speculative.drafters import BUNDLED_EAGLE

    folder = Path(spec.path) if spec.path else BUNDLED_EAGLE
    vh = cfg.vocab_size * cfg.hidden_size
    total = vh if cfg.tie_word_embeddings else 2 * vh
    for f in sorted(folder.glob("*.safetensors")):
        for name, t in _safetensors_header(f).items():
            count = 1
            for d in t.get("shape", []):
                count *= int(d)
            if t.get("dtype") in _FLOAT_DTYPES:
                total += count
            elif name.endswith("draft_vocab"):
                total += count * cfg.hidden_size  # its rows of the lm_head, kept apart
    return total


def _safetensors_header(path: Path) -> dict[str, dict[str, object]]:
    """The tensor table of a .safetensors file (names, dtypes, shapes), without reading the tensors."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
    except (OSError, struct.error, ValueError) as e:
        raise ModelError(f"{path}: cannot read the safetensors header ({e})") from None
    return {k: v for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}
