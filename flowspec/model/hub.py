"""Find a model that the Hugging Face tools already downloaded, by its id; never download.

``HuggingFaceTB/SmolLM2-135M-Instruct`` names ``models--HuggingFaceTB--SmolLM2-135M-Instruct``
in the hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``~/.cache/huggingface/hub``), whose ``refs/main`` names the snapshot to use.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import ModelError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_like_repo_id(name: str) -> bool:
    """Whether a model name has the shape of a hub id (``org/name``)."""
    return bool(_REPO_ID.match(name)) and ".." not in name and not name.endswith((".gguf", ".json"))


def hub_cache_dir() -> Path:
    """The hub cache folder the Hugging Face tools use, read from the environment now."""
    env = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if env:
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface" / "hub"


def find_cached_snapshot(repo_id: str) -> Path:
    """The snapshot folder of repo_id's main revision in the local hub cache."""
    cache = hub_cache_dir()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap: Path | None = None
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        snap = _walk_layout(repo)
    else:
        try:
            snap = Path(snapshot_download(repo_id, cache_dir=str(cache), local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            snap = None
    if snap is None or not snap.is_dir():
        raise ModelError(
            f"model {repo_id!r} is not a file or folder here and not in the Hugging Face cache "
            f"(looked for {repo}/snapshots/<revision of refs/main>; the cache is $HF_HUB_CACHE, "
            "$HF_HOME/hub or ~/.cache/huggingface/hub); FlowSpec never downloads: fetch it first "
            f"with `huggingface-cli download {repo_id}` or give a local path"
        )
    return snap


def _walk_layout(repo: Path) -> Path | None:
    """refs/main -> snapshots/<commit>, read without huggingface_hub."""
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except OSError:
        return None
    snap = repo / "snapshots" / commit
    return snap if snap.is_dir() else None


def gguf_in_snapshot(snap: Path, repo_id: str) -> Path | None:
    """The one GGUF file of a snapshot without safetensors weights (None when it has none)."""
    ggufs = sorted(snap.glob("*.gguf"))
    if len(ggufs) > 1:
        raise ModelError(
            f"{repo_id} holds {len(ggufs)} GGUF files; name one: "
            + ", ".join(str(g) for g in ggufs[:6]) + (" ..." if len(ggufs) > 6 else "")
        )
    return ggufs[0] if ggufs else None
