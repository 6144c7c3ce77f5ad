"""EAGLE-style feature drafter: one decoder layer over [token embedding ; target feature].

The head reads the target's final (normed) hidden state f at position p-1 and the
embedding of the token at position p, predicts the target's feature at p, and the
target's frozen lm_head turns that into draft log-probabilities for position p+1. Deeper
tree levels feed the head its own predicted features (or the target's, once a node has
been through the ring).

The checkpoint layout (a folder, shared by the project's own heads and published EAGLE-1/2
heads) is :mod:`.eagle_checkpoint`; the head's training pass lives with the training code
(``flowspec.training.eagle_pass``). Verification always uses the full vocabulary, whatever
vocabulary the head drafts from.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Generator, Sequence

import torch
from torch import nn

from ...errors import ModelError
from ...model.blocks import CacheRows, DecoderLayer, rope_cos_sin, rope_inv_freq
from ...model.config import ModelConfig
from ...model.kvcache import KVCache, SegmentPlan
from ..tree import Node
from .base import Drafter, DraftCall, DraftView, PassCount, Proposals, uncomputed_path
from .eagle_checkpoint import LAYER, checkpoint_config, checkpoint_tensors, head_weights

__all__ = ["LAYER", "EagleDrafter", "EagleHead"]  # LAYER: re-exported (the checkpoint prefix)

log = logging.getLogger(__name__)


class EagleHead(nn.Module):
    """fc(2H -> H) + one decoder layer; embedding and lm_head are the target's (frozen)."""

    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], embed: torch.Tensor,
                 lm_head: torch.Tensor, draft_vocab: torch.Tensor | None = None) -> None:
        super().__init__()
        h = cfg.hidden_size
        if w["fc.weight"].shape != (h, 2 * h):
            raise ModelError(f"EAGLE head: fc.weight has shape {tuple(w['fc.weight'].shape)}, expected ({h}, {2 * h})")
        if embed.shape[1] != h or lm_head.shape[1] != h:
            raise ModelError(f"EAGLE head of width {h} does not fit a target of width {embed.shape[1]}")
        self.cfg = cfg
        dtype = w["fc.weight"].dtype
        self.fc = nn.Linear(2 * h, h, bias="fc.bias" in w, dtype=dtype)
        self.fc.weight = nn.Parameter(w["fc.weight"])
        if "fc.bias" in w:
            self.fc.bias = nn.Parameter(w["fc.bias"])
        self.layer = DecoderLayer(cfg, w, LAYER)
        own = w.get("embed_tokens.weight")
        self.embed = nn.Embedding.from_pretrained((own if own is not None else embed).to(dtype), freeze=True)
        self.lm_head = nn.Parameter(lm_head.to(dtype), requires_grad=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        if draft_vocab is not None:
            draft_vocab = draft_vocab.to(torch.long)
            if draft_vocab.numel() == 0 or int(draft_vocab.max()) >= lm_head.shape[0] or int(draft_vocab.min()) < 0:
                raise ModelError("EAGLE head: draft_vocab holds token ids outside the target's vocabulary")
        self.register_buffer("draft_vocab", draft_vocab, persistent=False)
        self._draft_rows = lm_head[draft_vocab].to(dtype).contiguous() if draft_vocab is not None else None

    # ------------------------------------------------------------------- loading
    @classmethod
    def load(cls, folder: str | Path, embed: torch.Tensor, lm_head: torch.Tensor,
             dtype: torch.dtype = torch.bfloat16) -> "EagleHead":
        folder = Path(folder)
        cfg_path = folder / "config.json"
        if not cfg_path.is_file():
            raise ModelError(f"{folder}: an EAGLE head folder needs config.json")
        d = json.loads(cfg_path.read_text())
        d.setdefault("model_type", "llama")
        cfg = ModelConfig.from_hf_dict(d, source=str(cfg_path))
        w, dv = head_weights(folder)
        w = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in w.items()}
        return cls(cfg, w, embed, lm_head, dv)

    def save(self, folder: str | Path, extra_config: dict | None = None) -> None:
        """Write the head in the project's format (EAGLE layout + draft_vocab)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = checkpoint_config(self.cfg, self.fc.bias is not None)
        config.update(extra_config or {})
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        t = checkpoint_tensors(self.fc, self.layer)
        if self.draft_vocab is not None:
            t["draft_vocab"] = self.draft_vocab
        # copies: the layer's projections may be views of one fused matrix (model/blocks.py)
        save_file({k: v.detach().clone() for k, v in t.items()}, str(folder / "model.safetensors"))

    def trainable(self) -> list[nn.Parameter]:
        """The parameters training updates: fc and the whole decoder layer (the layer's weights
        load frozen, like a target stage's); the embedding and lm_head stay the target's."""
        params = list(self.fc.parameters()) + list(self.layer.parameters())
        for p in params:
            p.requires_grad_(True)
        return params

    # ------------------------------------------------------------------- compute
    def fuse(self, tokens: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """fc([embedding ; feature]) for token ids [..] and features [.., H]."""
        e = self.embed(tokens)
        return self.fc(torch.cat((e, feats.to(e.dtype)), dim=-1))

    def logits(self, pred: torch.Tensor, full: bool = False) -> torch.Tensor:
        """Draft logits (float32) over the drafting vocabulary, or all tokens with full=True."""
        w = self.lm_head if full or self._draft_rows is None else self._draft_rows
        return (pred.to(w.dtype) @ w.T).float()


class EagleDrafter(Drafter):
    """Drafts with an EagleHead, keeping the head's own tree-addressed KV cache.

    Head cache ids: 2*id for an accepted token (computed with the target's true feature of
    its predecessor), 2*id+1 for a tree node (computed with whatever feature its parent had
    when it was drafted). Pruned tree entries are dropped; accepted ones are committed."""

    name = "eagle"
    needs_hidden = True

    def __init__(self, head: EagleHead, max_context: int = 2048) -> None:
        self.head = head
        c = head.cfg
        self.cache = KVCache(1, c.num_kv_heads, c.head_dim, max_context, torch.float32)
        self.begin([])

    def spawn(self) -> "EagleDrafter":
        return EagleDrafter(self.head, self.cache.capacity)

    def begin(self, prompt: list[int]) -> None:
        self.cache.reset()
        self._chain_done = 0  # chain entries 1.._chain_done are committed in the head cache
        self._pred: dict[int, torch.Tensor] = {}  # head id -> predicted feature

    def ready(self, view: DraftView, node: Node) -> bool:
        if node.id != view.tree.root:
            return True
        return len(view.chain_ids) >= 2 and view.chain_ids[-2] in view.hidden

    def _sync_rows(self, view: DraftView) -> _Rows | None:
        """Drop stale tree entries; the accepted tokens not yet in the head cache (with the
        target's true features), or None when there are none."""
        chain, toks = view.chain_ids, view.chain_tokens
        tree = view.tree
        in_chain = set(chain)
        stale = [h for h in self.cache.parent_of if h % 2 == 1 and ((h // 2) not in tree or (h // 2) in in_chain)]
        if stale:
            # a node that joined the chain has a chain entry (2 * id) now: its children in the
            # tree hang from that entry, rows and predictions kept. Dropped, they took their
            # subtrees out of the cache while their predictions stayed, and the children of
            # such an orphan were never drafted (no row, no proposals).
            for h in stale:
                if h // 2 in in_chain:
                    self.cache.reparent(h, h - 1)
            cached = set(self.cache.parent_of)
            self.cache.drop(stale)
            for h in cached - set(self.cache.parent_of):
                self._pred.pop(h, None)
        new = []
        for j in range(self._chain_done + 1, len(chain)):
            f = view.hidden.get(chain[j - 1])
            if f is None:
                break
            new.append(j)
        if not new:
            return None
        return _Rows([2 * chain[j] for j in new], [2 * chain[j - 1] if j >= 2 else -1 for j in new], new,
                     [toks[j] for j in new], [view.hidden[chain[j - 1]] for j in new])

    def _synced(self, view: DraftView, rows: _Rows) -> None:
        """The accepted rows have run: commit them and forget predictions no one reads."""
        chain = view.chain_ids
        self.cache.commit(rows.hids)
        for h in rows.hids[:-1]:
            self._pred.pop(h, None)
        if self._chain_done >= 1:
            self._pred.pop(2 * chain[self._chain_done], None)
        self._chain_done = rows.positions[-1]

    def _passes(self, view: DraftView, frontier: list[Node]) -> Generator[_Rows, None, list[int]]:
        """The layer passes a ``propose`` needs, one at a time (each reads the features the
        previous one predicted): the accepted tokens not cached yet, then one pass per level
        of uncomputed ancestors of the frontier. Returns the frontier's head cache ids."""
        sync = self._sync_rows(view)
        if sync is not None:
            yield sync
            self._synced(view, sync)
        tree = view.tree
        need = uncomputed_path(tree, frontier, lambda n: n.id == tree.root or (2 * n.id + 1) in self._pred)
        by_depth: dict[int, list[Node]] = {}
        for n in need:
            by_depth.setdefault(n.position, []).append(n)
        for pos in sorted(by_depth):  # one head pass per level: a level only needs its parents'
            nodes = by_depth[pos]
            yield _Rows([2 * n.id + 1 for n in nodes], [self._entry(view, tree[n.parent]) for n in nodes],
                        [n.position for n in nodes], [n.token for n in nodes],
                        [self._parent_feature(view, n) for n in nodes])
        return [self._entry(view, f) for f in frontier]

    def _entry(self, view: DraftView, n: Node) -> int:
        return 2 * n.id if n.id == view.tree.root else 2 * n.id + 1

    def _parent_feature(self, view: DraftView, n: Node) -> torch.Tensor:
        p = view.tree[n.parent]
        if p.hidden is not None:
            return p.hidden
        return self._pred[self._entry(view, p)]

    def propose(self, view: DraftView, frontier: list[Node], k: int) -> list[list[tuple[int, float]]]:
        (got,), _ = self.propose_together([DraftCall(self, view, frontier, k)])
        if isinstance(got, Exception):
            raise got
        return got

    def batch_key(self) -> object | None:
        return self.head  # every request's drafter over these weights can share a pass

    @classmethod
    @torch.inference_mode()
    def propose_together(cls, calls: Sequence[DraftCall]) -> tuple[list[Proposals | Exception], PassCount]:
        """Several requests' calls (drafters over one head, each with its own cache) in shared
        passes: round r runs the r-th layer pass of every call in one grouped layer pass
        (each call's rows attend only to its own cache), and one draft-logits pass ranks
        every call's frontier. Alone, the calls would run one pass each."""
        drafters = [c.drafter for c in calls]
        if not all(isinstance(d, EagleDrafter) and d.head is drafters[0].head for d in drafters):
            raise ValueError("propose_together needs EAGLE drafters over one head")
        head = drafters[0].head
        count = PassCount()
        errors: list[Exception | None] = [None] * len(calls)
        entries: list[list[int]] = [[] for _ in calls]
        gens = [d._passes(c.view, c.frontier) for d, c in zip(drafters, calls)]  # type: ignore[union-attr]
        waiting: dict[int, _Rows] = {}

        def advance(i: int, first: bool) -> None:
            try:
                waiting[i] = next(gens[i]) if first else gens[i].send(None)
            except StopIteration as stop:
                entries[i] = stop.value
                waiting.pop(i, None)
            except Exception as e:  # noqa: BLE001 -- it stays with its own call
                errors[i] = e
                waiting.pop(i, None)

        for i in range(len(calls)):
            advance(i, True)
        while waiting:
            order = list(waiting)
            failed = _run_together(head, [(drafters[i], waiting[i]) for i in order], count)  # type: ignore[misc]
            for i, err in zip(order, failed):
                if err is not None:
                    errors[i] = err
                    waiting.pop(i)
                    gens[i].close()
                else:
                    advance(i, False)
        out: list[Proposals | Exception] = [e if e is not None else [] for e in errors]
        rows = [(i, e) for i in range(len(calls)) if errors[i] is None
                for e in entries[i] if e in drafters[i]._pred]  # type: ignore[union-attr]
        if rows:
            logits = head.logits(torch.stack([drafters[i]._pred[e] for i, e in rows]))  # type: ignore[union-attr]
            lp = torch.log_softmax(logits, dim=-1)
            count.run += 1
            count.alone += len({i for i, _ in rows})
            props: dict[tuple[int, int], list[tuple[int, float]]] = {}
            for k in sorted({calls[i].k for i, _ in rows}):
                at = [r for r, (i, _) in enumerate(rows) if calls[i].k == k]
                vals, idx = torch.topk(lp[at], min(k, lp.shape[-1]), dim=-1)
                if head.draft_vocab is not None:
                    idx = head.draft_vocab[idx]
                for r, v, t in zip(at, vals.tolist(), idx.tolist()):
                    props[rows[r]] = list(zip(t, v))
            for i in range(len(calls)):
                if errors[i] is None:
                    out[i] = [props.get((i, e), []) for e in entries[i]]
        else:
            out = [e if e is not None else [[] for _ in calls[i].frontier] for i, e in enumerate(errors)]
        return out, count


@dataclass
class _Rows:
    """Rows one drafter needs run through the head's layer, into its own cache."""

    hids: list[int]  # head cache ids of the rows
    parents: list[int]  # head cache ids of their parents
    positions: list[int]  # sequence positions
    tokens: list[int]  # token ids
    feats: list[torch.Tensor]  # the feature each row reads (its predecessor's)


def _run_together(head: EagleHead, work: list[tuple[EagleDrafter, _Rows]], count: PassCount) -> list[Exception | None]:
    """One grouped layer pass over the rows of several drafters, each into its own cache;
    the predicted features land in each drafter's ``_pred``. Returns per drafter the
    exception its rows met (a full cache, a broken parent), or None."""
    parts: list[tuple[EagleDrafter, _Rows, SegmentPlan]] = []
    failed: list[Exception | None] = []
    for d, rows in work:
        try:
            plan = d.cache.plan(rows.hids, rows.parents)
        except Exception as e:  # noqa: BLE001 -- it stays with its own drafter
            failed.append(e)
            continue
        failed.append(None)
        if plan.keep:
            parts.append((d, rows, plan))
    if not parts:
        return failed
    pick = [(rows, i) for _, rows, plan in parts for i in plan.keep]
    x = head.fuse(torch.tensor([rows.tokens[i] for rows, i in pick]), torch.stack([rows.feats[i] for rows, i in pick]))
    cos, sin = rope_cos_sin(head.inv_freq, torch.tensor([rows.positions[i] for rows, i in pick]))
    groups = [CacheRows(len(plan.keep), d.cache.keys[0], d.cache.values[0], plan.slots, plan.span, plan.mask)
              for d, _, plan in parts]
    out = head.layer.forward_groups(x, cos, sin, groups)
    a = 0
    for d, rows, plan in parts:
        for j, i in enumerate(plan.keep):
            d._pred[rows.hids[i]] = out[a + j]
        a += len(plan.keep)
    count.run += 1
    count.alone += len(parts)
    return failed
