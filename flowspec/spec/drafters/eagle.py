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
from pathlib import Path

import torch
from torch import nn

from ...errors import ModelError
from ...model.blocks import DecoderLayer, rope_cos_sin, rope_inv_freq
from ...model.config import ModelConfig
from ...model.kvcache import KVCache
from ..tree import Node
from .base import Drafter, DraftView, uncomputed_path
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
        save_file({k: v.contiguous() for k, v in t.items()}, str(folder / "model.safetensors"))

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

    @torch.inference_mode()
    def _run(self, hids: list[int], parents: list[int], positions: list[int], tokens: list[int],
             feats: list[torch.Tensor]) -> None:
        plan = self.cache.plan(hids, parents)
        if not plan.keep:
            return
        keep = plan.keep
        x = self.head.fuse(torch.tensor([tokens[i] for i in keep]), torch.stack([feats[i] for i in keep]))
        cos, sin = rope_cos_sin(self.head.inv_freq, torch.tensor([positions[i] for i in keep]))
        out = self.head.layer(x, cos, sin, self.cache.keys[0], self.cache.values[0], plan.slots, plan.span,
                              plan.mask)
        for j, i in enumerate(keep):
            self._pred[hids[i]] = out[j]

    def _sync(self, view: DraftView) -> None:
        chain, toks = view.chain_ids, view.chain_tokens
        tree = view.tree
        in_chain = set(chain)
        stale = [h for h in self.cache.parent_of if h % 2 == 1 and ((h // 2) not in tree or (h // 2) in in_chain)]
        if stale:
            self.cache.drop(stale)
            for h in stale:
                self._pred.pop(h, None)
        new = []
        for j in range(self._chain_done + 1, len(chain)):
            f = view.hidden.get(chain[j - 1])
            if f is None:
                break
            new.append(j)
        if not new:
            return
        ids = [2 * chain[j] for j in new]
        self._run(ids, [2 * chain[j - 1] if j >= 2 else -1 for j in new], new, [toks[j] for j in new],
                  [view.hidden[chain[j - 1]] for j in new])
        self.cache.commit(ids)
        for j in new[:-1]:
            self._pred.pop(2 * chain[j], None)
        if self._chain_done >= 1:
            self._pred.pop(2 * chain[self._chain_done], None)
        self._chain_done = new[-1]

    def _entry(self, view: DraftView, n: Node) -> int:
        return 2 * n.id if n.id == view.tree.root else 2 * n.id + 1

    def _parent_feature(self, view: DraftView, n: Node) -> torch.Tensor:
        p = view.tree[n.parent]
        if p.hidden is not None:
            return p.hidden
        return self._pred[self._entry(view, p)]

    def propose(self, view: DraftView, frontier: list[Node], k: int) -> list[list[tuple[int, float]]]:
        self._sync(view)
        tree = view.tree
        need = uncomputed_path(tree, frontier, lambda n: n.id == tree.root or (2 * n.id + 1) in self._pred)
        by_depth: dict[int, list[Node]] = {}
        for n in need:
            by_depth.setdefault(n.position, []).append(n)
        for pos in sorted(by_depth):  # one head pass per level: a level only needs its parents'
            nodes = by_depth[pos]
            self._run([2 * n.id + 1 for n in nodes], [self._entry(view, tree[n.parent]) for n in nodes],
                      [n.position for n in nodes], [n.token for n in nodes],
                      [self._parent_feature(view, n) for n in nodes])
        out: list[list[tuple[int, float]]] = []
        entries = [self._entry(view, f) for f in frontier]
        have = [e for e in entries if e in self._pred]
        if not have:
            return [[] for _ in frontier]
        logits = self.head.logits(torch.stack([self._pred[e] for e in have]))
        lp = torch.log_softmax(logits, dim=-1)
        kk = min(k, lp.shape[-1])
        vals, idx = torch.topk(lp, kk, dim=-1)
        if self.head.draft_vocab is not None:
            idx = self.head.draft_vocab[idx]
        row = {e: r for r, e in enumerate(have)}
        for e in entries:
            r = row.get(e)
            out.append([] if r is None else [(int(t), float(s)) for t, s in zip(idx[r], vals[r])])
        return out
