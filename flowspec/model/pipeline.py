"""All stages of a model in one process, and plain greedy decoding through them.

This is the reference the distributed strategies are compared against, and the
single-process mode of `flowspec generate --model`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .config import ModelConfig
from .stage import LMHead, Segment, Stage, StageOutput, split_layers


@dataclass
class PipelineOutput:
    node_ids: list[int]  # rows that came out of the last stage
    hidden: torch.Tensor  # final (normed) hidden states of those rows
    logits: torch.Tensor  # float32 [rows, vocab]


class LocalPipeline:
    """Stages run one after another in this process, followed by the lm_head."""

    def __init__(self, cfg: ModelConfig, stages: Sequence[Stage], head: LMHead) -> None:
        self.cfg, self.stages, self.head = cfg, list(stages), head

    @classmethod
    def load(cls, folder: str | Path, num_stages: int = 1, dtype: str = "bfloat16",
             max_context: int = 2048, stage_weights: str = "same") -> "LocalPipeline":
        """The model's stages (`stage_weights`: see Stage.load) and its lm_head (in dtype)."""
        folder = Path(folder)
        cfg = ModelConfig.from_file(str(folder / "config.json"))
        stages = [
            Stage.load(folder, a, b, dtype=dtype, max_context=max_context, cfg=cfg, stage_weights=stage_weights)
            for a, b in split_layers(cfg.num_layers, num_stages)
        ]
        return cls(cfg, stages, LMHead.load(folder, dtype=dtype, cfg=cfg))

    def fork(self) -> "LocalPipeline":
        """The same model (weights shared) with KV caches of its own: another sequence."""
        return LocalPipeline(self.cfg, [s.fork() for s in self.stages], self.head)

    def reset(self) -> None:
        for s in self.stages:
            s.reset()

    def apply_update(self, commit: list[int], drop: list[int]) -> None:
        for s in self.stages:
            s.apply_update(commit, drop)

    def run_stages(self, seg: Segment) -> StageOutput:
        """The segment through every stage: final hidden states of the computed rows."""
        out = None
        for s in self.stages:
            out = s(seg if out is None else out.as_segment())
        assert out is not None
        return out

    def run(self, seg: Segment) -> PipelineOutput:
        out = self.run_stages(seg)
        return PipelineOutput(out.node_ids, out.hidden, self.head(out.hidden))


@dataclass
class GenerationResult:
    token_ids: list[int]  # generated ids (the stop token included when one was produced)
    stats: dict[str, float] = field(default_factory=dict)  # timings and counts


def prefill(pipe: LocalPipeline, prompt: list[int], chunk: int = 256) -> torch.Tensor:
    """Run the prompt as a chain of nodes 0..P-1, committing each chunk; logits of the last token."""
    logits = None
    for a in range(0, len(prompt), chunk):
        ids = list(range(a, min(a + chunk, len(prompt))))
        seg = Segment(ids, [i - 1 for i in ids], ids, tokens=torch.tensor(prompt[a : a + chunk]))
        out = pipe.run(seg)
        pipe.apply_update(ids, [])
        logits = out.logits[-1]
    assert logits is not None
    return logits


def greedy_generate(pipe: LocalPipeline, prompt: list[int], max_new_tokens: int,
                    eos_ids: Sequence[int] = (), prefill_chunk: int = 256) -> GenerationResult:
    """Plain autoregressive greedy decoding: the ground truth of every strategy."""
    if not prompt:
        raise ValueError("the prompt is empty")
    pipe.reset()
    t0 = time.perf_counter()
    logits = prefill(pipe, prompt, prefill_chunk)
    t1 = time.perf_counter()
    out: list[int] = []
    stop = set(eos_ids)
    while len(out) < max_new_tokens:
        tok = int(torch.argmax(logits))
        out.append(tok)
        if tok in stop or len(out) == max_new_tokens:
            break
        nid = len(prompt) + len(out) - 1
        res = pipe.run(Segment([nid], [nid - 1], [nid], tokens=torch.tensor([tok])))
        pipe.apply_update([nid], [])
        logits = res.logits[0]
    t2 = time.perf_counter()
    decode_s = t2 - t1
    return GenerationResult(out, {
        "prompt_tokens": len(prompt),
        "new_tokens": len(out),
        "prefill_s": round(t1 - t0, 4),
        "decode_s": round(decode_s, 4),
        "total_s": round(t2 - t0, 4),
        "tokens_per_s": round((len(out) - 1) / decode_s, 2) if len(out) > 1 and decode_s > 0 else 0.0,
    })
