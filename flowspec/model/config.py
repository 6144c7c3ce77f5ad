"""Architecture description of a Llama-family model, read from a Hugging Face config.json."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ModelError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelConfig:
    """What the engine needs to know about a Llama-family decoder."""

    model_type: str  # "llama", "mistral" or "qwen2" (SmolLM2, TinyLlama, Vicuna are "llama")
    vocab_size: int  # rows of the embedding and of the lm_head
    hidden_size: int  # width of the residual stream
    intermediate_size: int  # width of the MLP
    num_layers: int  # decoder layers
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query attention when < num_heads)
    head_dim: int  # width of one head
    rms_norm_eps: float  # epsilon of every RMSNorm
    rope_theta: float  # RoPE base
    rope_scaling: dict[str, Any] | None  # None, or {"rope_type": "llama3"|"linear", ...}
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2; Llama with attention_bias)
    tie_word_embeddings: bool  # lm_head shares the embedding matrix (SmolLM2)
    max_position_embeddings: int  # longest context the model was trained for
    o_bias: bool = False  # the attention output projection carries a bias (Llama attention_bias)
    mlp_bias: bool = False  # gate/up/down projections carry a bias (Llama mlp_bias)
    sliding_window: int | None = None  # Mistral's attention window; contexts beyond it are refused
    bos_token_id: int | None = None  # beginning-of-sequence token
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)  # tokens that end generation

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        mt = d.get("model_type")
        if mt not in SUPPORTED_MODEL_TYPES:
            archs = d.get("architectures") or []
            raise ModelError(
                f"{source}: unsupported architecture {mt!r}"
                + (f" ({', '.join(archs)})" if archs else "")
                + f"; FlowSpec supports the Llama family: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        try:
            hidden = int(d["hidden_size"])
            heads = int(d["num_attention_heads"])
            rope = d.get("rope_parameters") or {}
            theta = d.get("rope_theta") or rope.get("rope_theta") or 10000.0
            scaling = d.get("rope_scaling") or None
            if scaling is None and rope and rope.get("rope_type", "default") != "default":
                scaling = dict(rope)
            if scaling is not None:
                scaling = dict(scaling)
                kind = scaling.get("rope_type") or scaling.get("type") or "default"
                if kind not in ("default", "llama3", "linear"):
                    raise ModelError(
                        f"{source}: RoPE scaling {kind!r} is not supported (supported: llama3, linear)"
                    )
                scaling["rope_type"] = kind
                if kind == "default":
                    scaling = None
            if mt == "qwen2":
                qkv_bias, o_bias = True, False
            else:
                qkv_bias = o_bias = bool(d.get("attention_bias", False))
            mlp_bias = bool(d.get("mlp_bias", False)) if mt == "llama" else False
            eos = d.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
            window = d.get("sliding_window")
            if mt == "qwen2" and not d.get("use_sliding_window", False):
                window = None
            return cls(
                model_type=mt,
                vocab_size=int(d["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(d["intermediate_size"]),
                num_layers=int(d["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(d.get("num_key_value_heads") or heads),
                head_dim=int(d.get("head_dim") or hidden // heads),
                rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
                rope_theta=float(theta),
                rope_scaling=scaling,
                qkv_bias=qkv_bias,
                o_bias=o_bias,
                mlp_bias=mlp_bias,
                tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
                sliding_window=int(window) if window else None,
                bos_token_id=d.get("bos_token_id"),
                eos_token_ids=tuple(int(x) for x in eos_ids),
            )
        except KeyError as e:
            raise ModelError(f"{source}: missing field {e.args[0]!r}") from None

    @classmethod
    def from_file(cls, path: str) -> "ModelConfig":
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except FileNotFoundError:
            raise ModelError(f"{path}: no config.json; a model folder needs one") from None
        except json.JSONDecodeError as e:
            raise ModelError(f"{path}: not valid JSON ({e})") from None
        return cls.from_hf_dict(d, source=path)

    def fingerprint(self) -> str:
        """A short hash of the architecture, compared between nodes at handshake."""
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        h, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.qkv_bias else 0) + (h if self.o_bias else 0)
        mlp = 3 * h * self.intermediate_size + ((2 * self.intermediate_size + h) if self.mlp_bias else 0)
        return attn + mlp + 2 * h
