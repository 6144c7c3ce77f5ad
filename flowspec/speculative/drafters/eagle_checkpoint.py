"""The EAGLE head's checkpoint layout: tensor names, reading a head folder, and the tensors
and config a head is written with.

A head folder holds ``config.json`` (a Llama config of the single layer) and
``model.safetensors`` or ``pytorch_model.bin`` with ``fc.weight`` [H, 2H] (+ optional
``fc.bias``), ``layers.0.self_attn.{q,k,v,o}_proj.weight``,
``layers.0.mlp.{gate,up,down}_proj.weight``, ``layers.0.post_attention_layernorm.weight``,
optional ``layers.0.input_layernorm.weight`` (EAGLE has none: identity), optional
``embed_tokens.weight`` (else the target's is used), and, in the project's format only,
``draft_vocab`` (int64 token ids the drafter ranks). Published EAGLE-1/2 heads and the
project's own share it: the drafter reads it (:mod:`.eagle`), the training exports it
(``flowspec.training``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import ModelError
from ...model.config import ModelConfig

LAYER = "layers.0."  # prefix of the decoder layer's tensors in a checkpoint
# names some published heads put before every tensor name, dropped when reading
PREFIXES = ("ea_layer.", "model.")
# tensors a head folder must hold (the input norm, biases and an own embedding are optional)
REQUIRED = ("fc.weight",) + tuple(LAYER + n for n in (
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "post_attention_layernorm.weight"))
# DecoderLayer's state-dict names -> the Hugging Face names a checkpoint uses (below LAYER)
HF_NAMES: dict[str, str] = {
    "input_norm.weight": "input_layernorm.weight", "post_norm.weight": "post_attention_layernorm.weight",
    "q_proj.weight": "self_attn.q_proj.weight", "k_proj.weight": "self_attn.k_proj.weight",
    "v_proj.weight": "self_attn.v_proj.weight", "o_proj.weight": "self_attn.o_proj.weight",
    "q_proj.bias": "self_attn.q_proj.bias", "k_proj.bias": "self_attn.k_proj.bias",
    "v_proj.bias": "self_attn.v_proj.bias", "o_proj.bias": "self_attn.o_proj.bias",
    "gate_proj.weight": "mlp.gate_proj.weight", "up_proj.weight": "mlp.up_proj.weight",
    "down_proj.weight": "mlp.down_proj.weight",
}


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Tensors of a head folder: safetensors, or a .bin read with weights_only=True (no pickle code)."""
    st = sorted(folder.glob("*.safetensors"))
    if st:
        from safetensors.torch import load_file

        out: dict[str, torch.Tensor] = {}
        for f in st:
            out.update(load_file(str(f)))
        return out
    bins = sorted(folder.glob("*.bin"))
    if bins:
        out = {}
        for f in bins:
            out.update(torch.load(str(f), map_location="cpu", weights_only=True))
        return out
    raise ModelError(f"{folder}: no model.safetensors or pytorch_model.bin in the EAGLE head folder")


def head_weights(folder: Path) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """A head folder's tensors under the project's names (published prefixes dropped), checked
    for the required ones, and its draft vocabulary (None when it has none)."""
    w: dict[str, torch.Tensor] = {}
    for k, v in read_checkpoint(folder).items():
        for pre in PREFIXES:
            if k.startswith(pre):
                k = k[len(pre):]
        w[k] = v
    missing = [n for n in REQUIRED if n not in w]
    if missing:
        raise ModelError(f"{folder}: not an EAGLE head: missing {', '.join(missing)}")
    return w, w.pop("draft_vocab", None)


def checkpoint_tensors(fc: nn.Linear, layer: nn.Module) -> dict[str, torch.Tensor]:
    """The head's trained tensors (fc and the decoder layer) under their checkpoint names:
    detached views of the parameters, not copies."""
    t = {"fc.weight": fc.weight.detach()}
    if fc.bias is not None:
        t["fc.bias"] = fc.bias.detach()
    for name, p in layer.state_dict().items():
        t[LAYER + HF_NAMES.get(name, name)] = p
    return t


def checkpoint_config(cfg: ModelConfig, bias: bool) -> dict[str, Any]:
    """config.json of a head: a one-layer Llama config of the head's width; `bias`: fc has one."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size, "num_hidden_layers": 1,
            "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
            "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "rope_scaling": cfg.rope_scaling, "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings, "bias": bias}
