"""Compact Llama-family blocks: RMSNorm, rotary embeddings, attention over a slot cache, MLP.

Weights are kept in the model dtype (bfloat16 by default); keys, values, rotary
embeddings and attention run in the cache dtype (float32 by default), which on CPU is
both faster and more exact for the short queries of decoding.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .int8 import Int8Linear, scale_name


class RMSNorm(nn.Module):
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies of the rotary embedding, with llama3 or linear scaling applied."""
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = cfg.rope_scaling
    if not sc:
        return inv
    factor = float(sc.get("factor", 1.0))
    if sc["rope_type"] == "linear":
        return inv / factor
    # llama3: long wavelengths are slowed down by `factor`, short ones kept, the band between smoothed.
    low = float(sc.get("low_freq_factor", 1.0))
    high = float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_cos_sin(inv_freq: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [n, head_dim] for integer positions of shape [n]."""
    ang = positions.to(torch.float32)[:, None] * inv_freq[None, :]
    emb = torch.cat((ang, ang), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [heads, n, head_dim]; cos/sin: [n, head_dim]."""
    return x * cos + _rotate_half(x) * sin


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer; attention reads and writes a slot-addressed KV cache."""

    def __init__(self, cfg: ModelConfig, w: dict[str, torch.Tensor], prefix: str) -> None:
        super().__init__()
        self.cfg = cfg

        def lin(name: str, bias: bool = False) -> nn.Module:
            weight = w[prefix + name + ".weight"]
            scale = w.get(scale_name(prefix + name + ".weight"))
            if scale is not None:  # model.stage_weights: int8 (opt-in; see int8.py)
                return Int8Linear(weight, scale, w[prefix + name + ".bias"] if bias else None)
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias, dtype=weight.dtype)
            layer.weight = nn.Parameter(weight, requires_grad=False)
            if bias:
                layer.bias = nn.Parameter(w[prefix + name + ".bias"], requires_grad=False)
            return layer

        # EAGLE heads have no input norm in their single layer: identity when the weight is absent
        norm_w = w.get(prefix + "input_layernorm.weight")
        self.input_norm: nn.Module = RMSNorm(norm_w, cfg.rms_norm_eps) if norm_w is not None else nn.Identity()
        self.post_norm = RMSNorm(w[prefix + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
        self.q_proj = lin("self_attn.q_proj", cfg.qkv_bias)
        self.k_proj = lin("self_attn.k_proj", cfg.qkv_bias)
        self.v_proj = lin("self_attn.v_proj", cfg.qkv_bias)
        self.o_proj = lin("self_attn.o_proj", cfg.o_bias)
        self.gate_proj = lin("mlp.gate_proj", cfg.mlp_bias)
        self.up_proj = lin("mlp.up_proj", cfg.mlp_bias)
        self.down_proj = lin("mlp.down_proj", cfg.mlp_bias)
        # q, k and v read as one matrix, and gate and up as another (bfloat16; see _Fused); the
        # entries of w they were copied from are taken out, so that a stage's load (w holds
        # every layer of the stage) does not keep both copies until its last layer is made
        self._qkv = _Fused.of(self.q_proj, self.k_proj, self.v_proj)
        self._gate_up = _Fused.of(self.gate_proj, self.up_proj)
        for fused, names in ((self._qkv, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                             (self._gate_up, ("mlp.gate_proj", "mlp.up_proj"))):
            for name in names if fused is not None else ():
                w.pop(prefix + name + ".weight", None)
                w.pop(prefix + name + ".bias", None)
        if self._qkv is not None or self._gate_up is not None:
            _give_back_freed()

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slots: torch.Tensor,
        span: int,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """x: [n, hidden]. Writes the new keys/values at `slots`, attends over cache[:span]
        with the boolean `mask` [n, span] (True = may attend)."""
        return self.forward_groups(x, cos, sin, [CacheRows(x.shape[0], k_cache, v_cache, slots, span, mask)])

    def forward_groups(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       groups: "list[CacheRows]") -> torch.Tensor:
        """Rows of several sequences at once: x [n, hidden] is the groups' rows one after
        another; every group attends over its own cache. The projections and the MLP (the
        weights, which dominate a step's memory traffic) run once for all rows."""
        q, k, v = self.qkv(x, cos, sin, groups[0].k_cache.dtype)
        outs: list[torch.Tensor] = []
        a = 0
        for grp in groups:
            b = a + grp.rows
            qi, ki, vi = (q, k, v) if len(groups) == 1 else (q[:, a:b], k[:, a:b], v[:, a:b])
            grp.k_cache[:, grp.slots] = ki
            grp.v_cache[:, grp.slots] = vi
            outs.append(self.attend(qi, grp.k_cache[:, :grp.span], grp.v_cache[:, :grp.span], grp.mask))
            a = b
        return self.mlp(self.output(x, outs[0] if len(outs) == 1 else torch.cat(outs)))

    # The parts of a layer pass, for callers that keep keys and values their own way (the
    # offline batched decoder, the EAGLE head's training pass). Leading batch dimensions
    # ("...") are allowed everywhere.

    def qkv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input norm, q/k/v projections (cast to `dtype` when given) and the rotary embedding
        of q and k. x [..., n, hidden], cos/sin [..., n, head_dim] -> q [..., heads, n, head_dim],
        k and v [..., kv_heads, n, head_dim]."""
        cfg = self.cfg
        h = self.input_norm(x)
        lead = x.shape[:-1]

        def heads(t: torch.Tensor, count: int) -> torch.Tensor:
            t = t if dtype is None else t.to(dtype)
            return t.view(*lead, count, cfg.head_dim).transpose(-3, -2)

        qp, kp, vp = _project(self._qkv, (self.q_proj, self.k_proj, self.v_proj), h)
        q = heads(qp, cfg.num_heads)
        k = heads(kp, cfg.num_kv_heads)
        v = heads(vp, cfg.num_kv_heads)
        c, s = cos.unsqueeze(-3).to(q.dtype), sin.unsqueeze(-3).to(q.dtype)
        return apply_rope(q, c, s), apply_rope(k, c, s), v

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
               float32_scores: bool = False) -> torch.Tensor:
        """Grouped-query attention of q [..., heads, m, head_dim] over keys/values
        [..., kv_heads, span, head_dim] with the boolean mask [..., m, span] (True = may
        attend). Returns [..., m, heads * head_dim]. `float32_scores`: scores and softmax in
        float32 whatever the keys' dtype (for low-precision caches); else one fused kernel."""
        cfg = self.cfg
        g = cfg.num_heads // cfg.num_kv_heads
        lead, m = q.shape[:-3], q.shape[-2]
        # the g query heads that share a kv head are stacked as extra query rows of that head,
        # so keys are never copied
        qg = q.reshape(*lead, cfg.num_kv_heads, g * m, cfg.head_dim)
        mk = (mask.repeat(*([1] * (mask.dim() - 2)), g, 1) if g > 1 else mask).unsqueeze(-3)
        if float32_scores:
            scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * cfg.head_dim ** -0.5
            scores = scores.masked_fill(~mk, float("-inf"))
            att = torch.matmul(torch.softmax(scores, dim=-1).to(values.dtype), values)
        else:
            att = F.scaled_dot_product_attention(qg, keys, values, attn_mask=mk)
        att = att.view(*lead, cfg.num_heads, m, cfg.head_dim).transpose(-3, -2)
        return att.reshape(*lead, m, cfg.num_heads * cfg.head_dim)

    def output(self, x: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
        """The residual stream after attention: x + o_proj(att), in x's dtype."""
        return x + self.o_proj(att.to(x.dtype))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The post-attention norm and gated MLP, added to the residual stream x."""
        h = self.post_norm(x)
        gate, up = _project(self._gate_up, (self.gate_proj, self.up_proj), h)
        return x + self.down_proj(F.silu(gate) * up)


class _Fused:
    """Projections that read the same input, kept as one matrix (bfloat16 weights only).

    One product over the concatenated weights costs less than one per projection: at the
    few rows of decoding each product is bound by reading its weights plus a fixed cost per
    call, and an 8-layer bfloat16 stage of the default model took 10.5 instead of 11.1 ms at
    one row, 13.3 instead of 14.0 at 8 and 16.6 instead of 17.4 at 16 (medians of four
    alternated runs of ``tools/bench_engine.py --stage 8``, one thread, AVX-512 BF16), with
    outputs equal bit for bit. In float32 it gained nothing and rounded differently in the last bits, so
    float32 (and int8) layers keep one product per projection. The projections' own weights
    become views of the fused matrix (nothing is stored twice) and keep working alone
    (checkpoints, the training pass); the fused product is used only while those views are
    intact and nothing asks for their gradients."""

    def __init__(self, parts: tuple[nn.Linear, ...], weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.parts = parts  # the projections, in the fused matrix's row order
        self.weight = weight  # [sum of their outputs, in]
        self.bias = bias
        self.sizes = [p.out_features for p in parts]
        self._ptrs = self._now()  # where each part's weight (and bias) must stay

    @classmethod
    def of(cls, *parts: nn.Module) -> "_Fused | None":
        lins = [p for p in parts if type(p) is nn.Linear]
        if len(lins) != len(parts) or any(p.weight.dtype != torch.bfloat16 for p in lins):
            return None
        if len({p.bias is None for p in lins}) > 1 or len({p.in_features for p in lins}) > 1:
            return None
        weight = torch.cat([p.weight.detach() for p in lins])
        bias = None if lins[0].bias is None else torch.cat([p.bias.detach() for p in lins])
        a = 0
        for p in lins:
            b = a + p.out_features
            p.weight = nn.Parameter(weight[a:b], requires_grad=p.weight.requires_grad)
            if bias is not None:
                p.bias = nn.Parameter(bias[a:b], requires_grad=p.bias.requires_grad)
            a = b
        return cls(tuple(lins), weight, bias)

    def _now(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for p in self.parts for t in (p.weight, p.bias) if t is not None)

    def usable(self) -> bool:
        """The parts still read the fused matrix (no ``.to()`` or reload replaced them), and
        no gradient is asked for (the fused matrix is outside autograd)."""
        if torch.is_grad_enabled() and any(p.weight.requires_grad for p in self.parts):
            return False
        return self._now() == self._ptrs


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def _give_back_freed() -> None:
    """Return the pages of freed heap blocks to the system. The projections a layer copied
    into its fused matrices were freed between blocks still in use, where the allocator
    keeps them: an 8-layer bfloat16 stage of the default model peaked at 86.7 MB while
    loading (54 MB of weights) instead of 69.3 with one product per projection; trimmed
    after each layer, 68.8."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _project(fused: _Fused | None, parts: tuple[nn.Module, ...], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Each projection of x: one product over the fused matrix where it is usable."""
    if fused is not None and fused.usable():
        return F.linear(x, fused.weight, fused.bias).split(fused.sizes, dim=-1)
    return tuple(p(x) for p in parts)


@dataclass
class CacheRows:
    """One sequence's rows in a grouped layer pass: where they go in its cache, whom they see."""

    rows: int  # how many consecutive rows of the batch are this sequence's
    k_cache: torch.Tensor  # [kv_heads, capacity, head_dim] of this layer
    v_cache: torch.Tensor
    slots: torch.Tensor  # long [rows]: cache slot of each row
    span: int  # attention runs over slots [0, span)
    mask: torch.Tensor  # bool [rows, span]: True where a row may attend
