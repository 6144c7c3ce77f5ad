"""A pipeline stage: optional embedding, decoder layers [start, end), optional final norm.

A stage runs *segments*: n new tree nodes with stable ids, parent ids and positions,
given as token ids (first stage) or hidden states (later stages). It returns the hidden
states of the rows it computed. Tree updates (commit, drop) are applied between
segments, in the order they arrive.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import FlowSpecError, ModelError
from .blocks import CacheRows, DecoderLayer, RMSNorm, rope_cos_sin, rope_inv_freq
from .config import ModelConfig
from .dtypes import parse_dtype  # noqa: F401 -- re-exported: callers import it from here
from .int8 import INT8, SAME, check_stage_weights, load_int8
from .kvcache import KVCache, SegmentPlan
from .loader import EMBED, NORM, WeightStore, layer_tensor_names, lm_head_name



@dataclass
class Segment:
    """New tree nodes sent through the pipeline together, in topological order."""

    node_ids: list[int]  # stable ids chosen by the source
    parent_ids: list[int]  # parent of each node (-1: first token of the sequence)
    positions: list[int]  # rotary position of each node (committed length + depth)
    tokens: torch.Tensor | None = None  # long [n]: token ids (input of the first stage)
    hidden: torch.Tensor | None = None  # [n, hidden]: activations (input of later stages)
    # first row whose next token the source needs (the rows before it are prompt context);
    # None: none. The stages ignore it, except a last stage that chooses the tokens itself
    score_from: int | None = None

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
        # the activations' dtype: that of the float weights (int8 projections keep their scales in it)
        self.dtype = next(v.dtype for v in weights.values() if v.is_floating_point())
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
        stage_weights: str = SAME,
    ) -> "Stage":
        """Load only the tensors of layers [start, end) (plus embedding / norm by role).
        stage_weights: ``same`` (the weights in dtype) or ``int8`` (the layers' projections
        quantized as they are read, computing in dtype; opt-in, it changes the model)."""
        check_stage_weights(stage_weights)
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
        if stage_weights == INT8:
            weights = load_int8(store, names, parse_dtype(dtype))
        else:
            weights = store.load(names, parse_dtype(dtype))
        return cls(cfg, weights, start, end, first, last, max_context)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def new_cache(self, max_context: int | None = None) -> KVCache:
        """An empty KV cache for this stage's layers (one per request the stage serves)."""
        c = self.cache
        return KVCache(self.end - self.start, self.cfg.num_kv_heads, self.cfg.head_dim,
                       max_context or c.capacity, c.keys[0].dtype)

    def fork(self) -> "Stage":
        """The same layers (weights shared, not copied) with a KV cache of its own."""
        clone = copy.copy(self)
        clone.cache = self.new_cache()
        return clone

    # ------------------------------------------------------------------ API
    def reset(self, cache: KVCache | None = None) -> None:
        (cache or self.cache).reset()

    def apply_update(self, commit: list[int], drop: list[int], cache: KVCache | None = None) -> None:
        """A tree update from the source: drop rejected nodes, then commit the accepted path."""
        cache = cache or self.cache
        if drop:
            cache.drop(drop)
        if commit:
            cache.commit(commit)

    def forward(self, seg: Segment, cache: KVCache | None = None) -> StageOutput:  # type: ignore[override]
        out = self.forward_many([(seg, cache or self.cache)])[0]
        if isinstance(out, FlowSpecError):
            raise out
        return out

    @torch.inference_mode()
    def forward_many(self, items: list[tuple[Segment, KVCache]]) -> list[StageOutput | FlowSpecError]:
        """Several segments in one pass: the weights are read once for all their rows.

        Segments of different requests (caches) attend only to their own cache; segments
        that share a cache are planned together, in order, as one segment (a later one may
        name parents in an earlier one). Returns one output per segment, or the error that
        made that segment (and the others of its cache in this batch) unusable."""
        results: list[StageOutput | FlowSpecError | None] = [None] * len(items)
        by_cache: dict[int, list[int]] = {}
        for i, (_, cache) in enumerate(items):
            by_cache.setdefault(id(cache), []).append(i)
        groups: list[tuple[KVCache, list[int], list[int], SegmentPlan]] = []  # cache, items, offsets, plan
        xs: list[torch.Tensor] = []
        positions: list[int] = []
        for idxs in by_cache.values():
            cache = items[idxs[0]][1]
            try:
                datas = [self._inputs(items[i][0]) for i in idxs]
                ids = [n for i in idxs for n in items[i][0].node_ids]
                parents = [p for i in idxs for p in items[i][0].parent_ids]
                plan = cache.plan(ids, parents)
            except FlowSpecError as e:
                for i in idxs:
                    results[i] = e
                continue
            offsets = [0]
            for i in idxs:
                offsets.append(offsets[-1] + len(items[i][0]))
            data = datas[0] if len(datas) == 1 else torch.cat(datas)
            keep = plan.keep
            xs.append(data[keep] if len(keep) != data.shape[0] else data)
            allpos = [p for i in idxs for p in items[i][0].positions]
            positions += [allpos[r] for r in keep]
            groups.append((cache, idxs, offsets, plan))
        if groups:
            x = xs[0] if len(xs) == 1 else torch.cat(xs)
            x = self.embed(x) if self.first else x
            live = [g for g in groups if g[3].keep]
            if live:
                cos, sin = rope_cos_sin(self.inv_freq, torch.tensor(positions, dtype=torch.long))
                for j, layer in enumerate(self.layers):
                    x = layer.forward_groups(x, cos, sin, [
                        CacheRows(len(p.keep), c.keys[j], c.values[j], p.slots, p.span, p.mask)
                        for c, _, _, p in live])
                if self.norm is not None:
                    x = self.norm(x)
            row = 0
            for _, idxs, offsets, plan in groups:
                keep = plan.keep
                for k, i in enumerate(idxs):
                    seg = items[i][0]
                    a, b = offsets[k], offsets[k + 1]
                    rows = [r for r, m in enumerate(keep) if a <= m < b]
                    local = [keep[r] - a for r in rows]
                    h = x[row + rows[0]: row + rows[-1] + 1] if rows else x[:0]
                    results[i] = StageOutput([seg.node_ids[m] for m in local], [seg.parent_ids[m] for m in local],
                                             [seg.positions[m] for m in local], h)
                row += len(keep)
        return results  # type: ignore[return-value]

    def _inputs(self, seg: Segment) -> torch.Tensor:
        """The segment's token ids (first stage) or activations, checked against its node count."""
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
        if self.first:
            if n and (int(data.min()) < 0 or int(data.max()) >= self.cfg.vocab_size):
                raise ModelError(f"token ids must lie in 0..{self.cfg.vocab_size - 1}")
            return data
        if data.dim() != 2 or data.shape[1] != self.cfg.hidden_size:
            raise ModelError(f"activations of shape {list(data.shape)} do not fit this stage, which "
                             f"expects [{n}, {self.cfg.hidden_size}]")
        return data.to(self.dtype)


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
