"""Batched greedy decoding of many independent prompts through one full-model stage.

Used offline (drafter training data), never by the ring. Keys and values are kept in the
weights' dtype (with batches, attention is bound by reading the cache, and bfloat16 halves
that); scores and softmax are float32. Prompts are left-padded into one block; finished
sequences keep their slot until the batch ends.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from .blocks import DecoderLayer, apply_rope, rope_cos_sin
from .stage import LMHead, Stage


def _attend(layer: DecoderLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            kc: torch.Tensor, vc: torch.Tensor, start: int, mask: torch.Tensor) -> torch.Tensor:
    """x: [B, n, H]; writes keys/values at slots [start, start+n); mask [B, n, span]."""
    cfg = layer.cfg
    B, n, _ = x.shape
    h = layer.input_norm(x)
    q = layer.q_proj(h).float().view(B, n, cfg.num_heads, cfg.head_dim).transpose(1, 2)
    k = layer.k_proj(h).float().view(B, n, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    v = layer.v_proj(h).view(B, n, cfg.num_kv_heads, cfg.head_dim).transpose(1, 2)
    q = apply_rope(q, cos[:, None], sin[:, None]).to(kc.dtype)
    k = apply_rope(k, cos[:, None], sin[:, None])
    kc[:, :, start : start + n] = k.to(kc.dtype)
    vc[:, :, start : start + n] = v.to(vc.dtype)
    span = mask.shape[-1]
    keys, vals = kc[:, :, :span], vc[:, :, :span]
    g = cfg.num_heads // cfg.num_kv_heads
    qg = q.reshape(B, cfg.num_kv_heads, g * n, cfg.head_dim)  # query heads sharing a kv head, stacked
    m = mask.repeat(1, g, 1) if g > 1 else mask
    scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * cfg.head_dim ** -0.5
    scores = scores.masked_fill(~m[:, None], float("-inf"))
    att = torch.matmul(torch.softmax(scores, dim=-1).to(vals.dtype), vals)
    att = att.view(B, cfg.num_heads, n, cfg.head_dim).transpose(1, 2).reshape(B, n, cfg.num_heads * cfg.head_dim)
    att = att.to(x.dtype)
    x = x + layer.o_proj(att)
    h = layer.post_norm(x)
    return x + layer.down_proj(F.silu(layer.gate_proj(h)) * layer.up_proj(h))


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
