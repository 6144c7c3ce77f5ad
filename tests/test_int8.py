"""Weight-only int8 stages (``model.stage_weights: int8``): what they compute, what they hold,
how they load (safetensors and GGUF), the setting in a topology, and the handshake."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from flowspec.config import Topology
from flowspec.errors import ModelError, TopologyError
from flowspec.footprint import layer_bytes
from flowspec.model.config import ModelConfig
from flowspec.model.int8 import PACK_MAX_ROWS, Int8Linear, is_projection, quantize, scale_name
from flowspec.model.loader import WeightStore, layer_tensor_names, model_fingerprint, weights_digest
from flowspec.model.pipeline import LocalPipeline, greedy_generate
from flowspec.model.stage import LMHead, Segment, Stage
from flowspec.runtime.transport import HandshakeError, check_hello, hello_meta
from flowspec.speculative.drafters import LookupDrafter
from flowspec.speculative.local_ring import generate_local

PROMPT = [5, 17, 99, 3, 42, 5, 17, 99, 3, 42, 5, 17, 99, 7, 8, 9, 5, 17]


def dequantized(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float32 weights an int8 stage multiplies by: q * scale, scales removed."""
    out = {}
    for k, v in weights.items():
        if k.endswith("_scale"):
            continue
        s = weights.get(scale_name(k))
        out[k] = v.float() * s.float()[:, None] if s is not None else v.float()
    return out


def int8_weights(folder: Path, cfg: ModelConfig, start: int, end: int, dtype: torch.dtype) -> dict[str, Any]:
    from flowspec.model.int8 import load_int8

    names = [n for i in range(start, end) for n in layer_tensor_names(cfg, i)]
    names += ["model.embed_tokens.weight"] if start == 0 else []
    names += ["model.norm.weight"] if end == cfg.num_layers else []
    return load_int8(WeightStore.open(folder), names, dtype)


def chain(stages: list[Stage], tokens: list[int]) -> torch.Tensor:
    ids = list(range(len(tokens)))
    out = None
    for s in stages:
        s.reset()
        seg = Segment(ids, [i - 1 for i in ids], ids, tokens=torch.tensor(tokens)) if out is None else out.as_segment()
        out = s(seg)
    assert out is not None
    return out.hidden.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------ numerics
def test_quantize_is_symmetric_per_row_and_within_half_a_step() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * torch.linspace(0.01, 3.0, 48)[:, None]
    w[5] = 0.0
    q, s = quantize(w, torch.float32)
    assert q.dtype == torch.int8 and s.shape == (48,) and int(q.abs().max()) == 127
    assert float(s[5]) == 1.0 and not q[5].any()  # an all-zero row
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err <= s[:, None] / 2 + 1e-7).all())  # rounding: at most half a step of its own row


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_qwen2"])
def test_int8_stage_computes_its_dequantized_weights_and_stays_close_to_float(
        kind: str, tiny_model_dir: Any) -> None:
    """An int8 stage computes exactly (to float rounding) the model whose weights are q * scale,
    in float32 (int8 weight converted per matmul) and in bfloat16 (torch's int8 kernel below
    PACK_MAX_ROWS rows, the converted weight above); and that model stays near the float one."""
    folder = tiny_model_dir(kind)
    cfg = ModelConfig.from_file(str(folder / "config.json"))
    n = cfg.num_layers
    ref = [Stage.load(folder, 0, 2, dtype="float32", cfg=cfg), Stage.load(folder, 2, n, dtype="float32", cfg=cfg)]
    deq = [Stage(cfg, dequantized(int8_weights(folder, cfg, a, b, torch.float32)), a, b, a == 0, b == n, 2048)
           for a, b in ((0, 2), (2, n))]
    tokens = PROMPT[:12]
    want, float_out = chain(deq, tokens), chain(ref, tokens)
    for dtype, tol in (("float32", 1e-5), ("bfloat16", 3e-2)):
        q8 = [Stage.load(folder, 0, 2, dtype=dtype, cfg=cfg, stage_weights="int8"),
              Stage.load(folder, 2, n, dtype=dtype, cfg=cfg, stage_weights="int8")]
        assert isinstance(q8[1].layers[0].q_proj, Int8Linear)
        assert q8[0].embed is not None and q8[0].embed.weight.dtype == getattr(torch, dtype)  # embedding untouched
        # tol: float32 rounding in another order; bfloat16 activations carry 8 significant bits
        # (2^-8 relative per rounding, a few roundings per layer)
        assert rel(chain(q8, tokens), want) < tol, dtype
        assert rel(chain(q8, tokens[:PACK_MAX_ROWS + 4]), chain(deq, tokens[:PACK_MAX_ROWS + 4])) < tol
    # int8 against the float model. A step is 1/127 of a row's largest weight, about 2.4 standard
    # deviations for 64 Gaussian weights: the rounding error (step / sqrt(12)) is ~0.55% of a
    # weight's size, and so of a matmul's output; about 3 matmuls a layer lie in series, adding
    # up like a random walk: ~0.55% * sqrt(3 * layers) (1.9% for 4 layers, 2.3% for 6; measured
    # 1.8% and 3.0%). Twice that estimate still tells a sound quantization from a broken one
    # (a wrong scale or row order is off by 100% or more).
    assert 0 < rel(want, float_out) < 2 * 0.0055 * (3 * n) ** 0.5


def test_int8_linear_misaligned_and_batched_inputs_agree_with_the_reference() -> None:
    g = torch.Generator().manual_seed(1)
    q, s = quantize(torch.randn(96, 64, generator=g), torch.bfloat16)
    lin = Int8Linear(q, s, torch.randn(96, generator=g).bfloat16())
    w = q.float() * s.float()[:, None]
    for rows in (1, 3, PACK_MAX_ROWS - 1, PACK_MAX_ROWS, 40):
        buf = torch.randn(rows * 64 + 1, generator=g).bfloat16()
        x = buf[1:].view(rows, 64)  # 2 bytes off any alignment
        want = x.float() @ w.T + lin.bias.float()
        got = lin(x).float()
        assert got.shape == (rows, 96) and rel(got, want) < 1e-2, rows
        assert torch.equal(lin(x.view(1, rows, 64)), lin(x).view(1, rows, 96))  # leading dimensions kept


# ------------------------------------------------------------------------ end to end, memory
def test_two_stage_int8_pipeline_decodes_greedy_and_speculation_keeps_its_text(tiny_llama: Path) -> None:
    cfg = ModelConfig.from_file(str(tiny_llama / "config.json"))
    pipe = LocalPipeline.load(tiny_llama, 2, dtype="float32", max_context=256, stage_weights="int8")
    assert all(isinstance(s.layers[0].down_proj, Int8Linear) for s in pipe.stages)
    greedy = greedy_generate(pipe, PROMPT, 24).token_ids
    # the same model written out in float32 (q * scale) decodes the same tokens
    n = cfg.num_layers
    deq = [Stage(cfg, dequantized(int8_weights(tiny_llama, cfg, a, b, torch.float32)), a, b, a == 0, b == n, 256)
           for a, b in ((0, n // 2), (n // 2, n))]
    ref = LocalPipeline(cfg, deq, LMHead.load(tiny_llama, dtype="float32", cfg=cfg))
    assert greedy == greedy_generate(ref, PROMPT, 24).token_ids and len(greedy) == 24
    # speculation on int8 stages is lossless with respect to the int8 model
    res = generate_local(pipe.fork(), "flowspec", PROMPT, 24, LookupDrafter())
    assert res["token_ids"] == greedy


def test_int8_stage_holds_a_quarter_of_float32_and_loads_from_gguf_block_by_block(
        default_model_dir: Path) -> None:
    """Layers 8-15 of the default model: the tensors' bytes (int8 about a quarter of float32:
    scales, norms stay float), equal to what `flowspec check` and the layer planner count;
    the GGUF file read and quantized block by block equals quantizing each whole tensor."""
    cfg = ModelConfig.from_file(str(default_model_dir / "config.json"))
    f32 = Stage.load(default_model_dir, 8, 16, dtype="float32", max_context=16, cfg=cfg)
    q8 = Stage.load(default_model_dir, 8, 16, dtype="float32", max_context=16, cfg=cfg, stage_weights="int8")

    def tensor_bytes(stage: Stage) -> int:
        return sum(t.numel() * t.element_size() for t in stage.state_dict().values())

    assert 0.25 < tensor_bytes(q8) / tensor_bytes(f32) < 0.26  # measured 0.2517
    topo = Topology.from_dict(topology(stage_weights="int8"))
    assert layer_bytes(topo, cfg) * 8 == q8.weight_bytes() == tensor_bytes(q8)
    for name, w in f32.layers[0].named_parameters():
        got = dict(q8.layers[0].named_parameters())
        if name.endswith("proj.weight"):
            q, s = quantize(w, torch.float32)
            assert torch.equal(got[name], q) and torch.equal(got[name.replace(".weight", ".scale")], s), name
        else:
            assert torch.equal(got[name], w), name


# ------------------------------------------------------------------------ settings, handshake
def topology(**model: Any) -> dict[str, Any]:
    return {"cluster": "t", "model": {"target": "default", "drafter": "lookup", **model}, "nodes": [
        {"name": "source", "host": "127.0.0.1", "port": 7700, "role": "source"},
        {"name": "stage1", "host": "127.0.0.1", "port": 7701, "role": "stage", "layers": "auto"}]}


def test_stage_weights_setting_parses_round_trips_and_rejects_bad_values() -> None:
    assert Topology.from_dict(topology()).model.stage_weights == "same"
    topo = Topology.from_dict(topology(stage_weights="int8"))
    assert topo.model.stage_weights == "int8"
    assert Topology.from_dict(copy.deepcopy(topo.to_dict())).model.stage_weights == "int8"
    assert topo.with_overrides(stage_weights="same").model.stage_weights == "same"
    for bad, said in (("int4", "'int4'"), (8, "8"), (None, "null"), ("INT8", "'INT8'")):  # as YAML says null
        with pytest.raises(TopologyError) as ei:
            Topology.from_dict(topology(stage_weights=bad))
        assert f"model.stage_weights: unknown stage weights {said}" in str(ei.value)
        assert "allowed: same, int8" in str(ei.value)
    with pytest.raises(ModelError, match="unknown stage weights 'int4'; use one of same, int8"):
        Stage.load("/nonexistent", 0, 1, stage_weights="int4")


def test_projection_names() -> None:
    assert is_projection("model.layers.3.mlp.down_proj.weight")
    assert not is_projection("model.layers.3.self_attn.q_proj.bias")
    assert not is_projection("model.layers.3.input_layernorm.weight") and not is_projection("lm_head.weight")


def test_fingerprint_covers_stage_weights_and_the_handshake_names_a_mismatch(default_model_dir: Path) -> None:
    import hashlib

    cfg = ModelConfig.from_file(str(default_model_dir / "config.json"))
    same = model_fingerprint("default", cfg)
    # the default fingerprint is what it always was: rings of older nodes still form
    assert same == hashlib.sha256(f"{cfg.fingerprint()}|{weights_digest('default')}".encode()).hexdigest()[:16]
    assert model_fingerprint("default", cfg, "int8") != same
    int8 = hello_meta("t", model_fingerprint("default", cfg, "int8"), "stage1", "stage", (0, 30), stage_weights="int8")
    check_hello(int8, dict(int8, name="source", role="source"))  # agreeing int8 nodes form a ring
    plain = hello_meta("t", same, "source", "source", None)  # an older node sends no stage_weights
    with pytest.raises(HandshakeError, match="model.stage_weights mismatch: node 'stage1' runs 'int8' but node "
                                             "'source' runs 'same'"):
        check_hello(int8, plain)


def test_safetensors_tensors_are_quantized_in_blocks_of_rows_like_a_whole() -> None:
    from flowspec.model.gguf import BLOCK_BYTES
    from flowspec.model.int8 import quantizer
    from flowspec.model.loader import convert_rows

    rows = BLOCK_BYTES // (4 * 64) * 2 + 5  # three blocks of float32 rows
    t = torch.randn(rows, 64, generator=torch.Generator().manual_seed(2)).bfloat16()
    got = convert_rows("model.layers.0.mlp.up_proj.weight", t, quantizer(torch.bfloat16))
    q, s = quantize(t, torch.bfloat16)
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight"], q)
    assert torch.equal(got["model.layers.0.mlp.up_proj.weight_scale"], s)


def test_check_and_the_layer_split_count_int8_layers(tiny_qwen2: Path, default_model_dir: Path) -> None:
    """`flowspec check`'s sizes are the int8 stages' own (Qwen2: biases and scales stay float),
    and a node's memory_gb holds about four times as many int8 layers as float32 ones."""
    from flowspec.footprint import layer_ranges, plan_ring

    d = topology(stage_weights="int8", dtype="float32")
    d["model"]["target"] = str(tiny_qwen2)
    d["nodes"].append({"name": "stage2", "host": "127.0.0.1", "port": 7702, "role": "stage", "layers": "auto"})
    cfg = ModelConfig.from_file(str(tiny_qwen2 / "config.json"))
    plans = plan_ring(Topology.from_dict(d), cfg)
    for p in plans[1:]:
        assert p.layers is not None
        stage = Stage.load(tiny_qwen2, *p.layers, dtype="float32", cfg=cfg, stage_weights="int8")
        assert p.weight_bytes == stage.weight_bytes(), p
    big = ModelConfig.from_file(str(default_model_dir / "config.json"))  # 14.2 MB a float32 layer, 3.6 MB int8
    d = topology(dtype="float32")
    d["nodes"][1]["memory_gb"] = 0.05  # 53.7 MB
    d["nodes"].append({"name": "stage2", "host": "127.0.0.1", "port": 7702, "role": "stage", "layers": "auto"})
    assert layer_ranges(Topology.from_dict(d), big)["stage1"] == (0, 3)
    d["model"]["stage_weights"] = "int8"
    assert layer_ranges(Topology.from_dict(d), big)["stage1"] == (0, 15)  # the speed split, now within memory


def test_a_stage_node_of_an_int8_ring_loads_int8_says_so_and_sends_the_setting(
        tiny_llama: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from flowspec.commands import build_node

    monkeypatch.setenv("FLOWSPEC_CLUSTER_KEY", "0123456789abcdef0123456789abcdef")
    d = topology(stage_weights="int8", dtype="float32")
    d["model"]["target"] = str(tiny_llama)
    with caplog.at_level(logging.INFO, logger="flowspec"):
        node = build_node(Topology.from_dict(d), "stage1")
    stage = node.member.stage
    assert isinstance(stage.layers[0].o_proj, Int8Linear) and stage.embed.weight.dtype == torch.float32
    assert node.member.links.hello["stage_weights"] == "int8"
    assert "linear projections in int8" in caplog.text and "this changes the target model" in caplog.text
    assert "projections in int8" in caplog.text  # the loaded line
