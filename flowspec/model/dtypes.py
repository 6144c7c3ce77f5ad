"""Weight dtypes, and what ``auto`` means on this machine.

bfloat16 halves the weights' memory and their traffic from memory, but a CPU without a
native bfloat16 matrix path (x86 without AVX-512, ARM without the BF16 extension) falls
back to a slow generic kernel whose cost grows with every row: on an AVX2-only EPYC an
8-layer stage took 104 ms for a segment of 8 rows in bfloat16 against 51 ms in float32
(22 ms for one row in either; ``tools/bench_engine.py --stage 8 --stage-sizes 1,8,16``).
Speculative decoding sends many rows per step, so there float32 is the faster choice.
``auto`` picks, per node, bfloat16 where the CPU computes it natively and float32
elsewhere; the hidden states on the wire carry their dtype, so nodes may differ.

The names are declared here once, as plain strings: torch is imported only by the functions
that compute with it, so that the topology (:mod:`flowspec.config`) and the command lines
read :data:`NODE_DTYPES` without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import ModelError

if TYPE_CHECKING:
    import torch

AUTO = "auto"
WEIGHT_DTYPES = ("float32", "bfloat16", "float16")  # the names parse_dtype turns into torch dtypes (and auto)
# what a node may be told to run (a topology's model.dtype, every command line's --dtype); float16
# is parse_dtype's only for callers that name it themselves, never a node's choice
NODE_DTYPES = (AUTO, "bfloat16", "float32")


def native_bfloat16() -> bool:
    """Whether torch multiplies bfloat16 matrices through oneDNN on this CPU (AVX-512 or
    AMX on x86, the BF16 extension on ARM) rather than its generic fallback."""
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without oneDNN: assume the fallback
        return False


def auto_dtype() -> str:
    """The dtype ``auto`` stands for on this machine."""
    return "bfloat16" if native_bfloat16() else "float32"


def dtype_name(name: str) -> str:
    """A dtype name with ``auto`` resolved for this machine."""
    return auto_dtype() if name == AUTO else name


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """The torch dtype of a name (``auto`` resolved for this machine)."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    resolved = dtype_name(name)
    if resolved not in WEIGHT_DTYPES:
        raise ModelError(f"unknown dtype {name!r}; use one of {AUTO}, {', '.join(WEIGHT_DTYPES)}")
    return getattr(torch, resolved)


def planning_bytes(name: str) -> int:
    """Bytes per weight the layer planner assumes: for ``auto`` the largest it may choose
    (float32), so that every node of a ring computes the same split whatever its CPU."""
    import torch

    return torch.empty((), dtype=parse_dtype("float32" if name == AUTO else name)).element_size()


def describe(name: str) -> str:
    """For a node's log: the dtype it runs and, for ``auto``, why."""
    if name != AUTO:
        return name
    got = auto_dtype()
    why = "native bfloat16 matrix path" if got == "bfloat16" else "no native bfloat16 matrix path on this CPU"
    return f"{got} (auto: {why})"
