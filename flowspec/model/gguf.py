"""Read a stage's tensors straight from a GGUF file, one tensor (and row block) at a time.

Preparing a GGUF file (once per file and machine) parses its header with ``gguf.GGUFReader``
and writes a small folder: ``config.json`` built from the GGUF metadata, the tokenizer
files (``transformers`` converts the GGUF tokenizer; it loads no weights) and
``gguf.json``, an index of where each tensor lies in the file under its Hugging Face name.
A stage then reads and dequantizes only its own tensors, in blocks of rows written into
the final tensor, so that memory holds its weights plus one block.

The index spares every stage the GGUFReader parse: the reader makes a numpy view of every
tokenizer entry, which for the default model costs 2.3 s and 160 MB of memory, more than
an 8-layer stage's weights in bfloat16 (57 MB).

llama.cpp stores the rows of each head of the llama family's Q and K projections in
another order (pairs interleaved for its rotary kernel); reading undoes it. Qwen2 files
keep the Hugging Face order.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

import numpy as np
import torch

from ..errors import ModelError

log = logging.getLogger(__name__)

# a loader's hook on each tensor as soon as it is read: (name, rows of it in float32, the
# hook's to overwrite) -> the entries to keep, row for row (a conversion of each row on its own)
Convert = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]
GGUF_INDEX = "gguf.json"  # the index file in a prepared folder
INDEX_VERSION = 1  # bumped when the index format changes
# GGUF architecture -> (Hugging Face model_type, architectures entry, Q/K rows reordered)
GGUF_ARCHS: dict[str, tuple[str, str, bool]] = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
}
BLOCK_BYTES = 2 << 20  # float32 bytes dequantized at once (bounds the transient memory)
PROGRESS_S = 5.0  # a long read logs its progress this often
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)$")


def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, None for tensors the engine does not use."""
    m = _BLK.match(gguf_name)
    if m:
        part = _LAYER.get(m.group(2))
        return f"model.layers.{m.group(1)}.{part}.{m.group(3)}" if part else None
    stem, _, kind = gguf_name.rpartition(".")
    return f"{_TOP[stem]}.{kind}" if stem in _TOP and kind in ("weight", "bias") else None


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lies in a GGUF file and how to decode it."""

    gguf_name: str  # the name in the file, e.g. blk.3.attn_q.weight
    qtype: int  # ggml type (GGMLQuantizationType value)
    shape: tuple[int, ...]  # Hugging Face shape: (rows, columns) or (n,)
    offset: int  # absolute byte offset of the data in the file
    nbytes: int  # bytes of the data in the file
    heads: int  # heads whose rows llama.cpp reordered (Q and K of the llama family), else 0


def _value(reader: Any, key: str, default: Any = KeyError) -> Any:
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise ModelError(f"GGUF metadata {key!r} is missing; the file is incomplete or not a language model")
        return default
    part = field.parts[field.data[0]]
    if part.dtype == np.uint8 and len(field.types) == 1 and field.types[0].name == "STRING":
        return bytes(part).decode("utf-8")
    return part[0].item()


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, TensorRef]]:
    """The Hugging Face config dict and the tensor index of a GGUF file (header only)."""
    try:
        from gguf import GGUFReader
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise ModelError(f"reading GGUF needs the gguf package: {e}") from None
    try:
        reader = GGUFReader(str(path))
    except (ValueError, KeyError, IndexError, OSError) as e:
        raise ModelError(f"{path}: not a readable GGUF file ({e}); check the download") from None
    arch = _value(reader, "general.architecture")
    if arch not in GGUF_ARCHS:
        raise ModelError(
            f"{path}: GGUF architecture {arch!r} is not supported; FlowSpec reads "
            f"{', '.join(GGUF_ARCHS)} GGUF files (Llama 2/3, Mistral, SmolLM, TinyLlama, Qwen2/2.5)"
        )
    model_type, arch_class, reordered = GGUF_ARCHS[arch]
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ModelError(
            f"{path}: this GGUF file scales RoPE by a rope_freqs table (Llama 3.1 and later), "
            "which FlowSpec does not read from GGUF yet; use the model's Hugging Face folder"
        )

    def meta(key: str, default: Any = KeyError) -> Any:
        return _value(reader, f"{arch}.{key}", default)

    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    kv_heads = int(meta("attention.head_count_kv", heads))
    head_dim = int(meta("attention.key_length", hidden // heads))
    if int(meta("rope.dimension_count", head_dim)) != head_dim:
        raise ModelError(f"{path}: partial rotary embeddings are not supported")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise ModelError(f"{path}: the GGUF file has no token_embd.weight tensor")
    cfg: dict[str, Any] = {
        "architectures": [arch_class],
        "model_type": model_type,
        "vocab_size": int(embd.shape[-1]),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(meta("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": "blk.0.ffn_gate.bias" in names,
        "bos_token_id": _value(reader, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _value(reader, "tokenizer.ggml.eos_token_id", None),
        "pad_token_id": _value(reader, "tokenizer.ggml.padding_token_id", None),
        "_name_or_path": path.stem,
    }
    scaling = meta("rope.scaling.type", None)
    if scaling == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": float(meta("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ModelError(f"{path}: RoPE scaling {scaling!r} is not supported (supported: linear)")
    index: dict[str, TensorRef] = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            log.debug("%s: tensor %s is not used", path, t.name)
            continue
        h = 0
        if reordered and ".attn_q." in t.name:
            h = heads
        elif reordered and ".attn_k." in t.name:
            h = kv_heads
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        index[name] = TensorRef(t.name, int(t.tensor_type), shape, int(t.data_offset), int(t.n_bytes), h)
    return cfg, index


def write_model_files(gguf: Path, out: Path) -> None:
    """config.json, generation_config.json and the tensor index of a GGUF file, into out."""
    cfg, index = read_gguf(gguf)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    gen = {k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if cfg[k] is not None}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    doc = {
        "version": INDEX_VERSION,
        "gguf": str(gguf.resolve()),
        "size": gguf.stat().st_size,
        "tensors": {k: [r.gguf_name, r.qtype, list(r.shape), r.offset, r.nbytes, r.heads] for k, r in index.items()},
    }
    (out / GGUF_INDEX).write_text(json.dumps(doc))


def write_tokenizer(gguf: Path, out: Path) -> None:
    """The tokenizer files, converted by transformers from the GGUF metadata (no weights)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise ModelError(f"converting a GGUF tokenizer needs transformers: {e}") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as e:
        raise ModelError(f"{gguf}: could not convert the GGUF tokenizer: {e}") from None
    tok.save_pretrained(str(out))


def undo_qk_reorder(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp stores each head's rows as pairs (r, r + d/2) side by side; restore the
    Hugging Face order (first halves of the head's rows, then second halves)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape).contiguous()


@dataclass
class GGUFWeights:
    """The tensors a prepared folder's index names, read from the GGUF file on demand."""

    path: Path  # the GGUF file
    tensors: dict[str, TensorRef]  # Hugging Face name -> where it lies in the file

    @classmethod
    def open(cls, folder: Path) -> "GGUFWeights":
        idx = folder / GGUF_INDEX
        try:
            doc = json.loads(idx.read_text())
            if doc.get("version") != INDEX_VERSION:
                raise ValueError(f"index version {doc.get('version')}, expected {INDEX_VERSION}")
            path = Path(doc["gguf"])
            tensors = {k: TensorRef(v[0], v[1], tuple(v[2]), v[3], v[4], v[5]) for k, v in doc["tensors"].items()}
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            raise ModelError(f"{idx}: unreadable GGUF index ({e}); delete {folder} and run again") from None
        try:
            size = path.stat().st_size
        except OSError:
            raise ModelError(f"{idx}: the GGUF file {path} is gone; delete {folder} and run again") from None
        if size != doc["size"]:
            raise ModelError(f"{path} changed since {folder} was prepared; delete {folder} and run again")
        return cls(path, tensors)

    def load(self, names: Iterable[str], dtype: torch.dtype, convert: Convert | None = None
             ) -> dict[str, torch.Tensor]:
        """Dequantize exactly these tensors into dtype, one block of rows at a time. `convert`
        (a conversion row by row, such as int8 with a scale per row) is applied to each block
        of float32 rows as soon as it is dequantized, and its entries are joined by rows: the
        tensor is never whole in float."""
        names = list(names)
        total = sum(self.tensors[n].nbytes for n in names)
        start = last = time.monotonic()
        out: dict[str, torch.Tensor] = {}
        with open(self.path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            for i, n in enumerate(names, 1):
                if convert is None:
                    out[n] = self._read(fh, size, self.tensors[n], dtype)
                else:
                    out.update(self._read_converted(fh, size, n, convert))
                if time.monotonic() - last >= PROGRESS_S and i < len(names):
                    last = time.monotonic()
                    log.info("reading %s: %d/%d tensors", self.path.name, i, len(names))
        log.info("read %d tensors (%.1f MB in the file) from %s in %.1f s",
                 len(names), total / 1e6, self.path.name, time.monotonic() - start)
        return out

    def _read(self, fh: BinaryIO, size: int, ref: TensorRef, dtype: torch.dtype) -> torch.Tensor:
        """One tensor in dtype, written block by block into the final tensor."""
        blocks = self._blocks(fh, size, ref)  # the layout checked before anything is allocated
        out = torch.empty((ref.shape[0] if len(ref.shape) > 1 else 1, ref.shape[-1]), dtype=dtype)
        for a, part in blocks:
            out[a:a + part.shape[0]].copy_(part)
        out = out.reshape(ref.shape)
        return undo_qk_reorder(out, ref.heads) if ref.heads else out

    def _read_converted(self, fh: BinaryIO, size: int, name: str, convert: Convert) -> dict[str, torch.Tensor]:
        """The entries `convert` makes of one tensor, block of rows by block, joined by rows."""
        ref = self.tensors[name]
        pieces: dict[str, list[torch.Tensor]] = {}
        for _, part in self._blocks(fh, size, ref):
            for k, v in convert(name, part).items():
                pieces.setdefault(k, []).append(v)
        got = {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in pieces.items()}
        return {k: undo_qk_reorder(v, ref.heads) if ref.heads else v for k, v in got.items()}

    def _blocks(self, fh: BinaryIO, size: int, ref: TensorRef) -> Iterator[tuple[int, torch.Tensor]]:
        """(first row, float32 rows [n, cols]) of a tensor, dequantized a block at a time (the
        rows are the caller's: writable, not kept). The tensor's layout is checked at once."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            qtype = GGMLQuantizationType(ref.qtype)
            block, type_size = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise ModelError(f"{self.path}: tensor {ref.gguf_name} has unknown ggml type {ref.qtype}") from None
        rows = ref.shape[0] if len(ref.shape) > 1 else 1
        cols = ref.shape[-1]
        row_bytes = cols // block * type_size
        if cols % block or rows * row_bytes != ref.nbytes or ref.offset + ref.nbytes > size:
            raise ModelError(f"{self.path}: tensor {ref.gguf_name} does not fit its shape; the file is damaged")
        if ref.heads and ref.shape[0] % (2 * ref.heads):
            raise ModelError(f"{self.path}: tensor {ref.gguf_name} has {ref.shape[0]} rows, not a whole number "
                             f"of {ref.heads} heads; the file does not match its metadata")
        return self._dequantized(fh, ref, qtype, rows, cols, row_bytes)

    def _dequantized(self, fh: BinaryIO, ref: TensorRef, qtype: Any, rows: int, cols: int, row_bytes: int
                     ) -> Iterator[tuple[int, torch.Tensor]]:
        from gguf.quants import dequantize

        per_block = max(1, BLOCK_BYTES // (4 * cols))
        for a in range(0, rows, per_block):
            n = min(per_block, rows - a)
            raw = np.empty((n, row_bytes), dtype=np.uint8)  # read, not mapped: only this block is resident
            fh.seek(ref.offset + a * row_bytes)
            if fh.readinto(memoryview(raw).cast("B")) != raw.nbytes:
                raise ModelError(f"{self.path}: the file ended inside tensor {ref.gguf_name}; it is damaged")
            try:
                part = dequantize(raw, qtype)
            except NotImplementedError:
                raise ModelError(
                    f"{self.path}: tensor {ref.gguf_name} uses ggml type {qtype.name}, which the gguf "
                    "package cannot dequantize; upgrade gguf or pick another quantization"
                ) from None
            if part.dtype != np.float32 or not part.flags.writeable:  # torch needs writable float32
                part = np.array(part, dtype=np.float32)
            yield a, torch.from_numpy(part.reshape(n, cols))
