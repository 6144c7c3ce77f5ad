"""A pipeline stage: optional embedding, decoder layers [start, end), optional final norm.

A stage runs *segments*: n new tree nodes with stable ids, parent ids and positions,
given as token ids (first stage) or hidden states (later stages). It returns the hidden
states of the rows it computed. Tree updates (commit, drop) are applied between
segments, in the order they arrive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelError
from .blocks import DecoderLayer, RMSNorm, rope_cos_sin, rope_inv_freq
from .config import ModelConfig
from .kvcache import KVCache
from .loader import EMBED, NORM, WeightStore, layer_tensor_names, lm_head_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


@dataclass
class Segment:
    """New tree nodes sent through the pipeline together, in topological order."""

    node_ids: list[int]  # stable ids chosen by the source
    parent_ids: list[int]  # parent of each node (-1: first token of the sequence)
    positions: list[int]  # rotary position of each node (committed length + depth)
    tokens: torch.Tensor | None = None  # long [n]: token ids (input of the first stage)
    hidden: torch.Tensor | None = None  # [n, hidden]: activations (input of later stages)

    def __len__(self) -> int:
        return len(self.node_ids)


@dataclass
class StageOutput:
    """Hidden states of the rows a stage computed (rows of dropped branches are skipped)."""

    node_ids: list[int]  # ids of the computed rows, in segment order
    parent_ids: list[int]  # their parents
    positions: list[int]  # their positions
    hidden: torch.Tensor  # [len(node_ids), hidden]
    stats: dict[str, float] = field(default_factory=dict)  # e.g. compute seconds

    def as_segment(self) -> Segment:
        """The input of the next stage."""
        return Segment(self.node_ids, self.parent_ids, self.positions, hidden=self.hidden)


def check_layer_range(cfg: ModelConfig, start: int, end: int) -> None:
    if not (0 <= start < end <= cfg.num_layers):
        raise ModelError(
            f"layer range [{start}, {end}) is outside the model, which has layers 0..{cfg.num_layers - 1} "
            f"({cfg.num_layers} layers); a stage needs 0 <= start < end <= {cfg.num_layers}"
        )


class Stage(nn.Module):
    """Layers [start, end) of the target, with their own KV cache."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, torch.Tensor],
        start: int,
        end: int,
        first: bool,
        last: bool,
        max_context: int,
        cache_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        check_layer_range(cfg, start, end)
        self.cfg, self.start, self.end, self.first, self.last = cfg, start, end, first, last
        self.embed = nn.Embedding.from_pretrained(weights[EMBED], freeze=True) if first else None
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, weights, f"model.layers.{i}.") for i in range(start, end)
        )
        self.norm = RMSNorm(weights[NORM], cfg.rms_norm_eps) if last else None
        self.dtype = next(iter(weights.values())).dtype
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        if cfg.sliding_window and max_context > cfg.sliding_window:
            raise ModelError(
                f"max_context {max_context} exceeds the model's sliding window {cfg.sliding_window}; "
                "FlowSpec attends to the full context, so keep max_context within the window"
            )
        self.cache = KVCache(end - start, cfg.num_kv_heads, cfg.head_dim, max_context, cache_dtype)

    @classmethod
    def load(
        cls,
        folder: str | Path,
        start: int,
        end: int,
        first: bool | None = None,
        last: bool | None = None,
        dtype: str | torch.dtype = "bfloat16",
        max_context: int = 2048,
        cfg: ModelConfig | None = None,
    ) -> "Stage":
        """Load only the tensors of layers [start, end) (plus embedding / norm by role)."""
        folder = Path(folder)
        cfg = cfg or ModelConfig.from_file(str(folder / "config.json"))
        check_layer_range(cfg, start, end)
        first = start == 0 if first is None else first
        last = end == cfg.num_layers if last is None else last
        names: list[str] = []
        for i in range(start, end):
            names += layer_tensor_names(cfg, i)
        if first:
            names.append(EMBED)
        if last:
            names.append(NORM)
        store = WeightStore.open(folder)
        weights = store.load(names, parse_dtype(dtype))
        return cls(cfg, weights, start, end, first, last, max_context)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    # ------------------------------------------------------------------ API
    def reset(self) -> None:
        self.cache.reset()

    def apply_update(self, commit: list[int], drop: list[int]) -> None:
        """A tree update from the source: drop rejected nodes, then commit the accepted path."""
        if drop:
            self.cache.drop(drop)
        if commit:
            self.cache.commit(commit)

    @torch.inference_mode()
    def forward(self, seg: Segment) -> StageOutput:  # type: ignore[override]
        if self.first and seg.tokens is None:
            raise ModelError("the first stage needs token ids")
        if not self.first and seg.hidden is None:
            raise ModelError("a later stage needs hidden states")
        n = len(seg)
        data = seg.tokens if self.first else seg.hidden
        assert data is not None
        if data.shape[0] != n or len(seg.positions) != n:
            raise ModelError(f"a segment of {n} nodes came with {data.shape[0]} inputs and "
                             f"{len(seg.positions)} positions")
        plan = self.cache.plan(seg.node_ids, seg.parent_ids)
        keep = plan.keep
        ids = [seg.node_ids[i] for i in keep]
        parents = [seg.parent_ids[i] for i in keep]
        positions = [seg.positions[i] for i in keep]
        x = data[keep] if len(keep) != n else data
        x = self.embed(x) if self.first else x.to(self.dtype)
        if not keep:
            return StageOutput(ids, parents, positions, x[:0])
        cos, sin = rope_cos_sin(self.inv_freq, torch.tensor(positions, dtype=torch.long))
        for j, layer in enumerate(self.layers):
            x = layer(x, cos, sin, self.cache.keys[j], self.cache.values[j], plan.slots, plan.span, plan.mask)
        if self.norm is not None:
            x = self.norm(x)
        return StageOutput(ids, parents, positions, x)


class LMHead(nn.Module):
    """The target's output projection (the embedding matrix when tied). Logits in float32."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)

    @classmethod
    def load(cls, folder: str | Path, dtype: str | torch.dtype = "bfloat16",
             cfg: ModelConfig | None = None) -> "LMHead":
        folder = Path(folder)
        cfg = cfg or ModelConfig.from_file(str(folder / "config.json"))
        store = WeightStore.open(folder)
        name = lm_head_name(cfg, store)
        return cls(store.load([name], parse_dtype(dtype))[name])

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return (hidden.to(self.weight.dtype) @ self.weight.T).float()


def split_layers(num_layers: int, parts: int) -> list[tuple[int, int]]:
    """Contiguous, near-equal layer ranges covering [0, num_layers)."""
    if not 1 <= parts <= num_layers:
        raise ModelError(f"cannot split {num_layers} layers into {parts} stages")
    bounds = [round(i * num_layers / parts) for i in range(parts + 1)]
    return [(bounds[i], bounds[i + 1]) for i in range(parts)]
