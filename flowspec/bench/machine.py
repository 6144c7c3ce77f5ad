"""What the bench ran on: a figure measured on one CPU says little about another.

The same ring can be twice as fast or half as fast depending on whether the CPU has a
native bfloat16 matrix path, how many cores it has and which torch ran it, so every
report records them next to its numbers.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

# the instruction-set extensions that decide the engine's speed here (x86, then ARM names in /proc/cpuinfo)
_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "asimd", "bf16")


def cpuinfo_fields(text: str) -> tuple[str | None, set[str]]:
    """The CPU model and flag set from the text of /proc/cpuinfo (the first processor's)."""
    model: str | None = None
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if model is None and key in ("model name", "hardware", "cpu model"):
            model = value.strip() or None
        elif not flags and key in ("flags", "features"):  # x86 / ARM
            flags = set(value.split())
    return model, flags


def machine_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """The machine this process runs on, as the bench's JSON records it."""
    import torch

    from ..model.dtypes import native_bfloat16

    try:
        model, flags = cpuinfo_fields(cpuinfo.read_text(errors="replace"))
    except OSError:  # not Linux: the platform's own words
        model, flags = None, set()
    return {"cpu": model or platform.processor() or platform.machine(),
            "arch": platform.machine(),
            "cores": os.cpu_count(),
            "flags": [f for f in _FLAGS if f in flags],
            "native_bfloat16": native_bfloat16(),
            "torch": torch.__version__,
            "python": platform.python_version()}
