"""Batched greedy decoding of many independent prompts through one full-model stage.

Used offline (drafter training data), never by the ring. Keys and values are kept in the
weights' dtype (with batches, attention is bound by reading the cache, and bfloat16 halves
that); scores and softmax are float32. Prompts are left-padded into one block; finished
sequences keep their slot until the batch ends.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .blocks import DecoderLayer, rope_cos_sin
from .stage import LMHead, Stage


def _attend(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            kc: torch.Tensor, vc: torch.Tensor, start: int, mask: torch.Tensor) -> torch.Tensor:
    """x: [B, n, H]; writes keys/values at slots [start, start+n); mask [B, n, span]."""
    n = x.shape[1]
    q, k, v = layer.qkv(x, cos, sin, torch.float32)
    kc[:, :, start : start + n] = k.to(kc.dtype)
    vc[:, :, start : start + n] = v.to(vc.dtype)
    span = mask.shape[-1]
    att = layer.attend(q.to(kc.dtype), kc[:, :, :span], vc[:, :, :span], mask, float32_scores=True)
    return layer.mlp(layer.output(x, att))


@torch.inference_mode()
def batched_greedy(stage: Stage, head: LMHead, prompts: Sequence[Sequence[int]], max_new: int,
                   eos: set[int]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy answers and, per sequence, the final hidden state of every position that has a
    successor (prompt and answer, the last token excepted)."""
    assert stage.first and stage.last and stage.norm is not None and stage.embed is not None
    cfg = stage.cfg
    B, L = len(prompts), max(len(p) for p in prompts)
    cap = L + max_new
    pad = torch.tensor([L - len(p) for p in prompts])
    ids = torch.zeros((B, L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - len(p):] = torch.tensor(list(p))
    kv_dtype = stage.dtype
    caches = [(torch.zeros(B, cfg.num_kv_heads, cap, cfg.head_dim, dtype=kv_dtype),
               torch.zeros(B, cfg.num_kv_heads, cap, cfg.head_dim, dtype=kv_dtype)) for _ in stage.layers]
    col = torch.arange(cap)
    valid = col[None, :] >= pad[:, None]  # [B, cap]: slot holds a real token of that sequence

    def run(x: torch.Tensor, start: int) -> torch.Tensor:
        n = x.shape[1]
        pos = (torch.arange(start, start + n)[None, :] - pad[:, None]).clamp(min=0)
        cos, sin = rope_cos_sin(stage.inv_freq, pos.reshape(-1))
        cos, sin = cos.view(B, n, -1), sin.view(B, n, -1)
        span = start + n
        causal = col[None, :span] <= torch.arange(start, span)[:, None]  # [n, span]
        mask = causal[None] & valid[:, None, :span]
        mask |= torch.eye(span, dtype=torch.bool)[start:span][None]  # padded rows see themselves
        for layer, (kc, vc) in zip(stage.layers, caches):
            x = _attend(layer, x, cos, sin, kc, vc, start, mask)
        return stage.norm(x)

    h = run(stage.embed(ids), 0)
    feats = [[h[i, L - len(p):]] for i, p in enumerate(prompts)]
    answers: list[list[int]] = [[] for _ in prompts]
    alive = [True] * B
    last = h[:, -1]
    for step in range(max_new):
        nxt = head(last).argmax(-1)
        for i in range(B):
            if alive[i]:
                t = int(nxt[i])
                answers[i].append(t)
                alive[i] = t not in eos
        if not any(alive) or step == max_new - 1:
            break
        h = run(stage.embed(nxt[:, None]), L + step)
        last = h[:, -1]
        for i in range(B):
            if alive[i]:
                feats[i].append(h[i])
    return answers, [torch.cat(f) for f in feats]
