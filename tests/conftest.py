"""Shared fixtures: tiny random Llama-family checkpoints and the default model.

Tiny models are built once per test session with ``transformers`` (a fixed seed, float32),
saved as safetensors into a temporary folder, and handed out as folder paths. Every test
file can use them:

* ``tiny_model_dir(kind)``: a session-scoped factory, ``kind`` one of ``TINY_MODEL_KINDS``;
* ``tiny_llama``, ``tiny_mistral``, ``tiny_qwen2``, ``tiny_llama3_tied``,
  ``tiny_llama_sharded``: one fixture per kind;
* ``tiny_hf_model(kind)``: the matching ``transformers`` model (float32, eval mode), the
  reference the engine is compared with;
* ``default_model_dir``: SmolLM2-135M-Instruct as ``resolve_model`` prepares it (config,
  tokenizer and an index of the GGUF file's tensors; ``gguf_reference`` has transformers'
  safetensors conversion).

Tiny models have no tokenizer: drive them with raw token ids (vocabulary of 256).
Their weights are drawn wider than the ``transformers`` default (``initializer_range``
0.1, random norm weights and biases) so that attention is far from uniform and a wrong
mask, bias or rotary embedding shows up in the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch

TINY_VOCAB = 256
TINY_SEED = 1234

_COMMON: dict[str, Any] = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    initializer_range=0.1,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
)

# kind -> (config class name, config overrides, save_pretrained kwargs)
TINY_MODEL_SPECS: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    # plain Llama, untied lm_head, 4 layers
    "tiny_llama": ("LlamaConfig", dict(num_hidden_layers=4, tie_word_embeddings=False), {}),
    # Mistral (sliding window larger than any context used in the tests), 5 layers
    "tiny_mistral": (
        "MistralConfig",
        dict(num_hidden_layers=5, sliding_window=4096, tie_word_embeddings=False),
        {},
    ),
    # Qwen2: q/k/v biases, 6 layers
    "tiny_qwen2": ("Qwen2Config", dict(num_hidden_layers=6, tie_word_embeddings=False), {}),
    # Llama 3 rotary scaling (old context 64, so the tests' positions cross all three bands),
    # lm_head tied to the embedding
    "tiny_llama3_tied": (
        "LlamaConfig",
        dict(
            num_hidden_layers=4,
            tie_word_embeddings=True,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
        {},
    ),
    # Llama saved in many small shards with a model.safetensors.index.json
    "tiny_llama_sharded": (
        "LlamaConfig",
        dict(num_hidden_layers=4, tie_word_embeddings=False),
        {"max_shard_size": "40KB"},
    ),
}
TINY_MODEL_KINDS: tuple[str, ...] = tuple(TINY_MODEL_SPECS)


def tiny_hf_config(kind: str, **overrides: Any) -> Any:
    """The ``transformers`` config object of a tiny model kind (extra fields override)."""
    import transformers

    cls_name, fields, _ = TINY_MODEL_SPECS[kind]
    return getattr(transformers, cls_name)(**{**_COMMON, **fields, **overrides})


def build_tiny_hf_model(config: Any, seed: int = TINY_SEED) -> torch.nn.Module:
    """A random float32 causal LM for `config`, with non-trivial norm weights and biases."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def save_tiny_model(model: torch.nn.Module, folder: Path, **save_kwargs: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True, **save_kwargs)
    return folder


@pytest.fixture(autouse=True)
def no_flowspec_env_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """$FLOWSPEC_TOPOLOGY / $FLOWSPEC_NODE stand in for --topology / --name: a developer's own
    must not steer the tests (nor the processes they start, which inherit os.environ)."""
    for name in ("FLOWSPEC_TOPOLOGY", "FLOWSPEC_NODE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: ``tiny_model_dir(kind) -> folder`` (built once per kind and session)."""
    built: dict[str, Path] = {}

    def make(kind: str) -> Path:
        if kind not in TINY_MODEL_SPECS:
            raise KeyError(f"unknown tiny model kind {kind!r}; known: {', '.join(TINY_MODEL_KINDS)}")
        if kind not in built:
            _, _, save_kw = TINY_MODEL_SPECS[kind]
            model = build_tiny_hf_model(tiny_hf_config(kind))
            built[kind] = save_tiny_model(model, tmp_path_factory.mktemp(kind), **save_kw)
        return built[kind]

    return make


@pytest.fixture(scope="session")
def tiny_hf_model(tiny_model_dir: Callable[[str], Path]) -> Callable[[str], torch.nn.Module]:
    """Factory: ``tiny_hf_model(kind)`` -> the saved tiny model reloaded by transformers."""
    from transformers import AutoModelForCausalLM

    loaded: dict[str, torch.nn.Module] = {}

    def get(kind: str) -> torch.nn.Module:
        if kind not in loaded:
            loaded[kind] = AutoModelForCausalLM.from_pretrained(
                str(tiny_model_dir(kind)), dtype=torch.float32
            ).eval()
        return loaded[kind]

    return get


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("tiny_llama")


@pytest.fixture(scope="session")
def tiny_mistral(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("tiny_mistral")


@pytest.fixture(scope="session")
def tiny_qwen2(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("tiny_qwen2")


@pytest.fixture(scope="session")
def tiny_llama3_tied(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("tiny_llama3_tied")


@pytest.fixture(scope="session")
def tiny_llama_sharded(tiny_model_dir: Callable[[str], Path]) -> Path:
    return tiny_model_dir("tiny_llama_sharded")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """SmolLM2-135M-Instruct: config, tokenizer and the GGUF tensor index (prepared once)."""
    from flowspec.model.loader import resolve_model

    return resolve_model("default")
