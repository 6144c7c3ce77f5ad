"""The EAGLE head's training pass: whole sequences at once, causal, over an
:class:`~flowspec.speculative.drafters.eagle.EagleHead` (its fc and the parts of its decoder layer:
``qkv``, ``attend``, ``output``, ``mlp``).

Drafting runs the head node by node against its tree-addressed cache (the drafter); training
runs it over a batch of recorded sequences, teacher-forced and then fed its own predictions
("training-time test"), with masks that reproduce what the drafter's cache holds at each
depth. Both compute the same numbers (tests/test_eagle.py checks it).
"""

from __future__ import annotations

import torch

from flowspec.model.blocks import rope_cos_sin
from flowspec.speculative.drafters.eagle import EagleHead


def forward_train(head: EagleHead, tokens: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor,
                  valid: torch.Tensor) -> torch.Tensor:
    """Causal full-sequence pass: tokens/positions [B, T], feats [B, T, H], valid [B, T]
    (False = padding). Returns predicted features [B, T, H]."""
    return forward_unrolled(head, tokens, feats, positions, valid, 1)[0]


def forward_unrolled(head: EagleHead, tokens: torch.Tensor, feats: torch.Tensor, positions: torch.Tensor,
                     valid: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Teacher-forced pass followed by `steps - 1` passes that feed the head its own
    predictions, as drafting deeper tree levels does ("training-time test").

    Pass s (0-based) at position t is the entry a draft chain of depth s+1 writes there:
    its feature is pass s-1's output at t-1, and it attends to the teacher-forced keys at
    positions <= t-s plus, for each earlier pass r >= 1, the single key pass r wrote at
    t-(s-r) -- exactly the head cache a drafter holds at that depth. Its output is only
    meaningful where t >= s. Returns one [B, T, H] tensor per pass."""
    layer = head.layer
    B, T = tokens.shape
    cos, sin = rope_cos_sin(head.inv_freq, positions.reshape(-1))
    cos, sin = cos.view(B, T, -1), sin.view(B, T, -1)
    keys: list[torch.Tensor] = []
    values: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    f = feats
    for s in range(steps):
        x = head.fuse(tokens, f)
        q, k, v = layer.qkv(x, cos, sin)
        keys.append(k)
        values.append(v)
        first = torch.ones(T, T, dtype=torch.bool).tril(-s)[None] & valid[:, None, :]
        parts = [first] + [torch.eye(T, dtype=torch.bool).roll(-(s - r), dims=1).tril()[None].expand(B, T, T)
                           for r in range(1, s + 1)]
        if s == 0:
            parts[0] = parts[0] | torch.eye(T, dtype=torch.bool)[None]  # padded rows see themselves
        mask = torch.cat(parts, dim=-1)
        att = layer.attend(q, torch.cat(keys, dim=-2), torch.cat(values, dim=-2), mask)
        out = layer.mlp(layer.output(x, att))
        outs.append(out)
        f = torch.cat((torch.zeros_like(out[:, :1]), out[:, :-1]), dim=1)
    return outs
