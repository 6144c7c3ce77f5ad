"""Fused projections (model/blocks.py ``_Fused``): in bfloat16 a layer reads q, k and v as
one matrix and gate and up as another. The outputs must equal one product per projection
bit for bit, nothing may be stored twice, and every other use of a layer (float32, int8,
training, conversion, checkpoints) must keep working."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from flowspec.model import blocks
from flowspec.model.pipeline import LocalPipeline
from flowspec.model.stage import Segment

from test_engine import chain_segment

KINDS = ["tiny_llama", "tiny_qwen2"]  # without and with q/k/v biases


def layers(pipe: LocalPipeline) -> list[blocks.DecoderLayer]:
    return [m for st in pipe.stages for m in st.modules() if isinstance(m, blocks.DecoderLayer)]


def unfused(folder: Path, dtype: str, monkeypatch: pytest.MonkeyPatch) -> LocalPipeline:
    """The same model loaded with one product per projection."""
    with monkeypatch.context() as m:
        m.setattr(blocks._Fused, "of", classmethod(lambda cls, *parts: None))
        return LocalPipeline.load(folder, 2, dtype, max_context=128)


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_layers_fuse_and_compute_the_same_bits(kind: str, tiny_model_dir: Callable[[str], Path],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tiny_model_dir(kind)
    fused = LocalPipeline.load(folder, 2, "bfloat16", max_context=128)
    plain = unfused(folder, "bfloat16", monkeypatch)
    assert all(lay._qkv is not None and lay._gate_up is not None for lay in layers(fused))
    assert all(lay._qkv is None for lay in layers(plain))
    for lay in layers(fused):  # the projections' weights are views of the fused matrix
        assert lay.q_proj.weight.data_ptr() == lay._qkv.weight.data_ptr()
        assert lay.up_proj.weight.untyped_storage().data_ptr() == lay._gate_up.weight.untyped_storage().data_ptr()
        assert (lay.q_proj.bias is None) == (lay._qkv.bias is None)
    assert [st.num_params() for st in fused.stages] == [st.num_params() for st in plain.stages]
    tokens = list(range(3, 40))
    n = len(tokens)
    a, b = fused.run(chain_segment(tokens)), plain.run(chain_segment(tokens))
    assert torch.equal(a.logits, b.logits)
    for pipe in (fused, plain):
        pipe.apply_update(list(range(n)), [])
    for i in range(n, n + 6):  # one token at a time, as decoding runs
        got = fused.run(chain_segment([i % 50], start=i)).logits
        assert torch.equal(got, plain.run(chain_segment([i % 50], start=i)).logits)
        for pipe in (fused, plain):
            pipe.apply_update([i], [])


def test_a_fused_layer_takes_its_copied_tensors_out_of_the_loaded_ones(tiny_model_dir: Callable[[str], Path]) -> None:
    """A stage's load holds every tensor of the stage in one dict while its layers are made:
    the projections a layer copied into its fused matrices leave the dict at once."""
    from flowspec.model.config import ModelConfig
    from flowspec.model.loader import WeightStore, layer_tensor_names

    folder = tiny_model_dir("tiny_qwen2")
    cfg = ModelConfig.from_file(str(folder / "config.json"))
    names = layer_tensor_names(cfg, 1)
    for dtype, fused in ((torch.bfloat16, True), (torch.float32, False)):
        w = WeightStore.open(folder).load(names, dtype)
        lay = blocks.DecoderLayer(cfg, w, "model.layers.1.")
        gone = {n for n in names if n not in w}
        moved = {n for n in names if any(p in n for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))}
        assert gone == (moved if fused else set()), (dtype, gone)
        assert "model.layers.1.self_attn.q_proj.bias" in moved  # (qwen2: q, k and v have biases)
        assert torch.equal(lay.k_proj.bias, WeightStore.open(folder).load(
            ["model.layers.1.self_attn.k_proj.bias"], dtype)["model.layers.1.self_attn.k_proj.bias"])


def test_float32_and_int8_layers_keep_one_product_per_projection(tiny_model_dir: Callable[[str], Path]) -> None:
    pipe = LocalPipeline.load(tiny_model_dir("tiny_llama"), 2, "float32", max_context=128)
    assert all(lay._qkv is None and lay._gate_up is None for lay in layers(pipe))
    q = blocks.Int8Linear(torch.ones(8, 16, dtype=torch.int8), torch.ones(8, dtype=torch.bfloat16))
    lin = torch.nn.Linear(16, 8, bias=False, dtype=torch.bfloat16)
    assert blocks._Fused.of(q, lin) is None


def test_a_converted_or_trained_layer_falls_back_to_its_own_projections(tiny_model_dir: Callable[[str], Path]) -> None:
    pipe = LocalPipeline.load(tiny_model_dir("tiny_llama"), 1, "bfloat16", max_context=128)
    lay = layers(pipe)[0]
    x = torch.randn(3, lay.cfg.hidden_size).to(torch.bfloat16)
    parts = (lay.q_proj, lay.k_proj, lay.v_proj)
    assert lay._qkv is not None and lay._qkv.usable()
    got = blocks._project(lay._qkv, parts, x)
    assert all(torch.equal(g, p(x)) for g, p in zip(got, parts))

    # training: gradients reach the projections' own weights
    for p in parts:
        p.weight.requires_grad_(True)
    assert not lay._qkv.usable()
    sum(t.float().sum() for t in blocks._project(lay._qkv, parts, x)).backward()
    assert all(p.weight.grad is not None and p.weight.grad.abs().sum() > 0 for p in parts)
    with torch.no_grad():  # inference again: the fused matrix is the trained weights' storage
        parts[0].weight.add_(1.0)
        assert lay._qkv.usable()
        assert torch.equal(blocks._project(lay._qkv, parts, x)[0], parts[0](x))
    for p in parts:
        p.weight.requires_grad_(False)

    # converted (a new storage for every weight): the stale fused matrix is not used
    lay.float()
    assert not lay._qkv.usable()
    xf = x.float()
    assert all(torch.equal(g, p(xf)) for g, p in zip(blocks._project(lay._qkv, parts, xf), parts))


def test_a_fused_eagle_head_saves_and_loads(tmp_path: Path, default_model_dir: Path) -> None:
    from flowspec.speculative.drafters import make_drafter
    from flowspec.speculative.drafters.eagle import EagleHead

    head = make_drafter("eagle", None, 49152, "bfloat16", 256, target_folder=default_model_dir).head
    assert head.layer._qkv is not None  # the bundled head's layer is bfloat16: fused
    head.save(tmp_path / "head")  # safetensors refuses tensors that share memory: saved as copies
    again = EagleHead.load(tmp_path / "head", head.embed.weight, head.lm_head, dtype=torch.bfloat16)
    for name, p in head.layer.state_dict().items():
        assert torch.equal(p, again.layer.state_dict()[name]), name
    x = torch.randn(2, head.cfg.hidden_size).to(torch.bfloat16)
    assert torch.equal(head.fuse(torch.tensor([5, 7]), x), again.fuse(torch.tensor([5, 7]), x))


def test_segment_of_the_fused_stage_is_the_plain_stages(tiny_model_dir: Callable[[str], Path],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A tree segment (several branches, the rows of a batched pass) gives the same bits too."""
    folder = tiny_model_dir("tiny_llama")
    fused = LocalPipeline.load(folder, 2, "bfloat16", max_context=128)
    plain = unfused(folder, "bfloat16", monkeypatch)
    seg = Segment([0, 1, 2, 3, 4], [-1, 0, 0, 1, 2], [0, 1, 1, 2, 2], tokens=torch.tensor([3, 9, 11, 4, 8]))
    assert torch.equal(fused.run(seg).logits, plain.run(seg).logits)
