"""The reference conversion of a GGUF file: transformers' own GGUF loader, whole model.

FlowSpec reads GGUF tensors itself (``flowspec/model/gguf.py``); the tests compare it
with what ``transformers`` builds from the same file, saved once as a safetensors folder in
the cache (the folder FlowSpec used before it read GGUF files directly). This needs
``accelerate`` (transformers refuses to load GGUF weights without it): a dev dependency.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from flowspec.model.loader import LM_HEAD, file_lock, cache_root, default_gguf_path

log = logging.getLogger(__name__)


def converted_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF checkpoint once, through transformers, into a safetensors folder."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:10]
    out = cache_root() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    with file_lock(cache_root() / "models" / ".convert.lock"):
        if (out / "config.json").is_file():
            return out
        log.info("converting %s to safetensors in %s (once, reference)", gguf, out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            tied = bool(getattr(model.config, "tie_word_embeddings", False))
            tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()
                       if not (tied and k == LM_HEAD)}
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            cfg = model.config.to_dict()
            cfg.pop("quantization_config", None)
            cfg["_name_or_path"] = gguf.stem
            cfg["architectures"] = [type(model).__name__]
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
            model.generation_config.to_json_file(str(tmp / "generation_config.json"))
            tok.save_pretrained(str(tmp))
            tmp.chmod(0o755)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def converted_default() -> Path:
    """The default model (SmolLM2-135M-Instruct, Q4_1) as transformers converts it."""
    return converted_gguf(default_gguf_path())
