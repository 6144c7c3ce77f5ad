"""A separate, smaller causal LM with the same tokenizer, run on the source as the drafter.

It keeps its own tree-addressed KV cache (the same engine as the target's stages) under
the same node ids as the target's tree: accepted nodes are committed, pruned ones dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ...errors import ModelError
from ...model.pipeline import LocalPipeline
from ...model.stage import Segment
from ..tree import Node
from .base import Drafter, DraftView, uncomputed_path


class DraftModelDrafter(Drafter):
    name = "model"

    def __init__(self, pipe: LocalPipeline, target_vocab: int | None = None) -> None:
        if target_vocab is not None and pipe.cfg.vocab_size > target_vocab:
            raise ModelError(
                f"the draft model's vocabulary ({pipe.cfg.vocab_size}) is larger than the target's "
                f"({target_vocab}); a draft model must share the target's tokenizer"
            )
        self.pipe = pipe
        self._committed: list[int] = []  # node ids committed in the draft cache, in order
        self._live: set[int] = set()  # ids in the draft cache, committed or not
        self._logits: dict[int, torch.Tensor] = {}  # draft logits after each cached node

    @classmethod
    def load(cls, folder: str | Path, dtype: str = "bfloat16", max_context: int = 2048,
             target_vocab: int | None = None) -> "DraftModelDrafter":
        return cls(LocalPipeline.load(folder, 1, dtype=dtype, max_context=max_context), target_vocab)

    def spawn(self) -> "DraftModelDrafter":
        return DraftModelDrafter(self.pipe.fork())

    def begin(self, prompt: list[int]) -> None:
        self.pipe.reset()
        self._committed, self._live, self._logits = [], set(), {}

    def _sync(self, view: DraftView) -> None:
        """Bring the draft cache in line with the accepted chain; drop pruned branches."""
        chain = view.chain_ids
        n = len(self._committed)
        if chain[:n] != self._committed:
            raise AssertionError("the accepted chain changed under the drafter")
        keep = set(chain) | set(view.tree.nodes)
        dead = [i for i in self._live if i not in keep]
        if dead:
            self.pipe.apply_update([], dead)
            for i in dead:
                self._live.discard(i)
                self._logits.pop(i, None)
        missing = [j for j in range(n, len(chain)) if chain[j] not in self._live]
        if missing:
            ids = [chain[j] for j in missing]
            parents = [chain[j - 1] if j > 0 else -1 for j in missing]
            self._run(ids, parents, missing, [view.chain_tokens[j] for j in missing])
        new = chain[n:]
        if new:
            self.pipe.apply_update(new, [])
            self._committed.extend(new)
            for i in new[:-1]:
                self._logits.pop(i, None)

    def _run(self, ids: list[int], parents: list[int], positions: list[int], tokens: list[int]) -> None:
        out = self.pipe.run(Segment(ids, parents, positions, tokens=torch.tensor(tokens)))
        for i, nid in enumerate(out.node_ids):
            self._logits[nid] = out.logits[i]
            self._live.add(nid)

    def propose(self, view: DraftView, frontier: list[Node], k: int) -> list[list[tuple[int, float]]]:
        self._sync(view)
        need = uncomputed_path(view.tree, frontier, lambda n: n.id in self._live)
        if need:
            nodes = sorted(need, key=lambda n: n.position)
            self._run([n.id for n in nodes], [n.parent for n in nodes],
                      [n.position for n in nodes], [n.token for n in nodes])
        out = []
        for f in frontier:
            lp = torch.log_softmax(self._logits[f.id].float(), dim=-1)
            v, i = torch.topk(lp, min(k, lp.numel()))
            out.append([(int(t), float(s)) for t, s in zip(i, v)])
        return out
