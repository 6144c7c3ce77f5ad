"""Weight dtypes: what ``auto`` picks, that every node plans the same split whatever it
picks, and that nodes of one ring may run different dtypes (activations are cast on arrival)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowspec.config import Topology
from flowspec.errors import ModelError
from flowspec.model import dtypes
from flowspec.model.config import ModelConfig
from flowspec.model.pipeline import LocalPipeline
from flowspec.model.stage import LMHead, Stage

from test_engine import chain_segment


@pytest.mark.parametrize("native", [True, False])
def test_auto_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    monkeypatch.setattr(dtypes, "native_bfloat16", lambda: native)
    want = torch.bfloat16 if native else torch.float32
    assert dtypes.parse_dtype("auto") is want
    assert dtypes.dtype_name("auto") == ("bfloat16" if native else "float32")
    assert dtypes.describe("auto").startswith(("bfloat16" if native else "float32") + " (auto: ")
    assert dtypes.describe("float32") == "float32"  # a fixed choice is reported as given
    assert dtypes.planning_bytes("auto") == 4  # the largest auto may pick, on every CPU


def test_native_bfloat16_is_torchs_own_answer() -> None:
    assert dtypes.native_bfloat16() is bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def test_fixed_dtypes_and_unknown_names() -> None:
    assert dtypes.parse_dtype("bfloat16") is torch.bfloat16 and dtypes.planning_bytes("bfloat16") == 2
    assert dtypes.parse_dtype("float32") is torch.float32 and dtypes.planning_bytes("float32") == 4
    with pytest.raises(ModelError, match="unknown dtype 'fp8'; use one of auto, float32, bfloat16"):
        dtypes.parse_dtype("fp8")


def test_auto_plans_one_split_on_every_cpu(monkeypatch: pytest.MonkeyPatch, tiny_llama: Path) -> None:
    """Nodes of one ring each resolve `layers: auto` themselves: with memory limits the split
    depends on the bytes per weight, so `auto` must plan with the same figure everywhere."""
    cfg = ModelConfig.from_file(str(tiny_llama / "config.json"))
    per_layer_mib = cfg.layer_params() * 4 / (1 << 20)
    topo = Topology.from_dict({
        "cluster": "t", "model": {"target": str(tiny_llama), "dtype": "auto"},
        "nodes": [{"name": "src", "host": "127.0.0.1", "port": 7001, "role": "source"},
                  # room for one float32 layer on `a` (two in bfloat16), the rest on `b`
                  {"name": "a", "host": "127.0.0.1", "port": 7002, "role": "stage", "layers": "auto",
                   "memory_gb": 1.5 * per_layer_mib / 1024},
                  {"name": "b", "host": "127.0.0.1", "port": 7003, "role": "stage", "layers": "auto"}]})
    splits = []
    for native in (True, False):
        monkeypatch.setattr(dtypes, "native_bfloat16", lambda native=native: native)
        splits.append(topo.resolve_layers(cfg.num_layers, cfg.layer_params() * dtypes.planning_bytes("auto")))
    assert splits[0] == splits[1] and splits[0]["a"] == (0, 1)


def test_nodes_of_one_ring_may_differ_in_dtype(tiny_llama: Path) -> None:
    """A float32 stage feeding a bfloat16 one (and back to a float32 lm_head): the
    activations are cast on arrival, and the logits stay within bfloat16's rounding of an
    all-float32 run."""
    cfg = ModelConfig.from_file(str(tiny_llama / "config.json"))
    half = cfg.num_layers // 2
    tokens = [3, 17, 42, 7, 99, 5]
    ref = LocalPipeline.load(tiny_llama, 2, dtype="float32", max_context=64).run(chain_segment(tokens)).logits
    first = Stage.load(tiny_llama, 0, half, dtype="float32", max_context=64, cfg=cfg)
    second = Stage.load(tiny_llama, half, cfg.num_layers, dtype="bfloat16", max_context=64, cfg=cfg)
    mixed = LocalPipeline(cfg, [first, second], LMHead.load(tiny_llama, dtype="float32", cfg=cfg))
    out = mixed.run(chain_segment(tokens))
    assert out.hidden.dtype == torch.bfloat16 and out.logits.dtype == torch.float32
    assert torch.isfinite(out.logits).all()
    scale = float(ref.abs().max())
    assert float((out.logits - ref).abs().max()) <= 0.05 * scale
