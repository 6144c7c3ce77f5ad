"""Weight-only int8 for a stage's decoder layers (opt-in: ``model.stage_weights: int8``).

A stage short of memory may keep the weights of its seven linear projections per layer
(q, k, v, o, gate, up, down) as int8 with one scale per output channel (symmetric:
``w ~ q * scale``, ``q`` in -127..127, ``scale = max|w_row| / 127``). Everything else stays
as the stage's dtype has it: the embedding, the norms, biases, the KV cache and the
activations (the stage *computes* in its dtype; only the stored weights are int8). The
source's lm_head and drafter are not touched.

This changes the target model: an int8 ring does not produce the text of a bfloat16 or
float32 ring (speculation stays lossless with respect to the int8 model). How far the two
agree is measured, not assumed (README, "Models as users have them").

Loading quantizes each projection as it is read (from safetensors, or dequantized from a
GGUF file), a block of rows at a time: a projection is never whole in float, and the load
of an 8-layer stage of the default model peaks at 1.65x its int8 weights (47 MB, below the
73 MB of a bfloat16 stage; ``tools/bench_stage_weights.py``).

How a projection is computed (measured on an AMD EPYC with AVX-512 BF16/VNNI, one thread,
an 8-layer stage as a node runs it): with bfloat16 activations and rows fewer than
``PACK_MAX_ROWS`` torch's own kernel (``torch._weight_int8pack_mm``, float32 accumulation);
it reads half the bytes of bfloat16 weights, and the stage took 6.8 ms against 11.5 for one
row, 12.3 against 13.8 for 8 (it loses from about 12 rows on). From ``PACK_MAX_ROWS`` rows
on, and always with float32 activations (torch has no vectorised float32 path for that
kernel), the int8 weight is converted to the activations' dtype for one matmul and the
scale applied to its output (float32: 8.1 ms against 12.4 for one row, 14.1 against 19.6
for 8). The private kernel reads its inputs
with aligned vector loads and without a tail loop, so it is used only where the shapes
and alignment fit (``K % 16 == 0``) and after it reproduced the plain computation on the
projection's own first rows.
"""

from __future__ import annotations

from typing import Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelError
from .config import ModelConfig
from .gguf import Convert

SAME = "same"  # the stages keep their weights in the node's dtype (the default)
INT8 = "int8"  # the stages' linear projections as int8 with per-output-channel scales
STAGE_WEIGHTS = (SAME, INT8)
# the projections that are quantized, by the end of their tensor name
PROJECTIONS = (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
SCALE_SUFFIX = "_scale"  # "<name>.weight" -> "<name>.weight_scale": the per-output-channel scales
PACK_MAX_ROWS = 16  # rows below which torch's int8 kernel beats a converted weight (bfloat16)
PACK_ALIGN = 64  # bytes: the int8 kernel's aligned loads need aligned rows
QMAX = 127  # symmetric: -127..127 (-128 unused, so that q and -q are both representable)


def check_stage_weights(value: str) -> str:
    """The value itself, or ModelError naming the allowed ones."""
    if value not in STAGE_WEIGHTS:
        raise ModelError(f"unknown stage weights {value!r}; use one of {', '.join(STAGE_WEIGHTS)}")
    return value


def is_projection(name: str) -> bool:
    """Whether the tensor `name` is a decoder layer's linear projection weight (quantized with int8)."""
    return name.startswith("model.layers.") and name.endswith(PROJECTIONS)


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def quantize(w: torch.Tensor, dtype: torch.dtype, consume: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of a 2-D weight: (q int8 [out, in], scale [out] in
    dtype). The scale is rounded to dtype first and q chosen for that rounded scale, so that
    q * scale is what the stage multiplies by; an all-zero row gets scale 1. consume: w is
    float32 and the caller's no more: it is overwritten, and no float temporary is made (a
    loader's freed temporaries would otherwise fragment the heap: measured 6.8x an int8
    stage's weights at peak instead of about 1.5x)."""
    if w.dim() != 2:
        raise ModelError(f"int8 weights are per row of a matrix; got a tensor of shape {list(w.shape)}")
    if not (consume and w.dtype == torch.float32 and w.is_contiguous()):
        w = w.float().clone()
    low, high = torch.aminmax(w, dim=1)
    amax = torch.maximum(-low, high)
    scale = torch.where(amax > 0, amax / QMAX, torch.ones_like(amax)).to(dtype)
    w.div_(scale.float()[:, None]).round_().clamp_(-QMAX, QMAX)
    return w.to(torch.int8), scale


def quantizer(dtype: torch.dtype) -> Convert:
    """The loader's hook: each projection read (float32, handed over) becomes its int8
    weight and its scales at once."""

    def convert(name: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = quantize(w, dtype, consume=True)
        return {name: q, scale_name(name): scale}

    return convert


class Loads(Protocol):
    """What reads tensors by name for a stage (the loader's WeightStore)."""

    def load(self, names: Iterable[str], dtype: torch.dtype, convert: Convert | None = None
             ) -> dict[str, torch.Tensor]: ...


def load_int8(store: Loads, names: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A stage's tensors with its projections in int8 (read in float32, quantized one by one)
    and the rest (embedding, norms, biases) in dtype."""
    rest = [n for n in names if not is_projection(n)]
    proj = [n for n in names if is_projection(n)]
    out = store.load(rest, dtype) if rest else {}
    out.update(store.load(proj, torch.float32, convert=quantizer(dtype)))
    return out


def _pack_matches(q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether torch's int8 kernel exists, fits this weight and reproduces the plain
    computation on a few of its rows (a probe of microseconds, once per projection)."""
    if not hasattr(torch, "_weight_int8pack_mm") or scale.dtype != torch.bfloat16:
        return False
    if q.shape[1] % 16 or q.data_ptr() % PACK_ALIGN or q.stride() != (q.shape[1], 1):
        return False
    rows = q[: min(4, q.shape[0])]
    x = torch.linspace(-1.0, 1.0, 3 * q.shape[1]).reshape(3, q.shape[1]).to(torch.bfloat16)
    try:
        got = torch._weight_int8pack_mm(x, rows, scale[: rows.shape[0]]).float()
    except RuntimeError:
        return False
    ref = x.float() @ (rows.float() * scale[: rows.shape[0]].float()[:, None]).T
    return bool(torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * float(ref.abs().max()) + 1e-6))


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T + bias, computed in x's dtype; q int8 [out, in], scale [out]."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if q.dtype != torch.int8 or q.dim() != 2 or scale.shape != (q.shape[0],):
            raise ModelError(f"an int8 projection needs an int8 matrix and one scale per row; got "
                             f"{q.dtype} {list(q.shape)} and scales {list(scale.shape)}")
        self.weight = nn.Parameter(q.contiguous(), requires_grad=False)  # int8 [out, in]
        self.scale = nn.Parameter(scale, requires_grad=False)  # [out], the activations' dtype
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.in_features, self.out_features = q.shape[1], q.shape[0]
        self.packed = _pack_matches(self.weight, self.scale)  # torch's int8 kernel is usable here

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.packed and x2.dtype == torch.bfloat16 and x2.shape[0] < PACK_MAX_ROWS:
            if not x2.is_contiguous() or x2.data_ptr() % PACK_ALIGN:
                x2 = x2.clone(memory_format=torch.contiguous_format)
            y = torch._weight_int8pack_mm(x2, self.weight, self.scale)
        else:
            y = F.linear(x2, self.weight.to(x2.dtype)) * self.scale.to(x2.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 kernel={self.packed}"


def describe(stage_weights: str, dtype_name: str) -> str:
    """For a node's log: what its stage weights are and what that means."""
    if stage_weights == SAME:
        return f"weights in {dtype_name}"
    return (f"linear projections in int8 (per-output-channel scales; model.stage_weights: int8), embedding, "
            f"norms and activations in {dtype_name}: this changes the target model, so answers differ from "
            f"those of {dtype_name} weights (their agreement is measured in the README)")


def layer_bytes(cfg: ModelConfig, dtype_bytes: int) -> int:
    """Bytes of one decoder layer with int8 projections: one per projection weight, dtype_bytes
    per scale (one per output channel), norm weight and bias."""
    h, kv, q, inter = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, cfg.num_heads * cfg.head_dim, \
        cfg.intermediate_size
    proj = h * q + 2 * h * kv + q * h + 3 * h * inter
    scales = q + 2 * kv + h + 2 * inter + h
    return proj + (cfg.layer_params() - proj + scales) * dtype_bytes
