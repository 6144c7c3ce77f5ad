"""Models as users have them: GGUF files read tensor by tensor, and the Hugging Face cache.

* The default GGUF read directly equals transformers' whole-model conversion of it, tensor
  for tensor and in the hidden states of a stage; one 8-layer stage's memory peak stays
  under twice its weights (measured in a fresh process).
* Tiny random models written in llama.cpp's layout (Q/K rows reordered for the llama
  family, quantized blocks) read back exactly.
* A model id resolves through a hub cache layout in a temporary folder; nothing is
  downloaded, and a missing id says where it looked.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from flowspec.errors import ModelError
from flowspec.model import gguf as fgguf
from flowspec.model.config import ModelConfig
from flowspec.model.loader import (EMBED, WeightStore, layer_tensor_names, locate_model, resolve_model,
                                   weight_files, weights_digest)
from flowspec.model.stage import Segment, Stage

from conftest import TINY_VOCAB

ROOT = Path(__file__).resolve().parents[1]


def chain(tokens: list[int]) -> Segment:
    ids = list(range(len(tokens)))
    return Segment(ids, [i - 1 for i in ids], ids, tokens=torch.tensor(tokens, dtype=torch.long))


def run_chain(stages: list[Stage], tokens: list[int]) -> list[torch.Tensor]:
    """Hidden states after each stage for one chain of tokens."""
    seg, outs = chain(tokens), []
    for st in stages:
        out = st(seg)
        outs.append(out.hidden)
        seg = out.as_segment()
    return outs


# ------------------------------------------------------------ the default model, direct
@pytest.fixture(scope="module")
def converted() -> Path:
    from gguf_reference import converted_default

    return converted_default()


@pytest.mark.slow
def test_default_gguf_folder_matches_transformers_conversion(default_model_dir: Path, converted: Path) -> None:
    assert (default_model_dir / fgguf.GGUF_INDEX).is_file()
    assert not list(default_model_dir.glob("*.safetensors"))  # no weights copied out of the GGUF file
    cfg = ModelConfig.from_file(str(default_model_dir / "config.json"))
    assert cfg == ModelConfig.from_file(str(converted / "config.json"))
    for f in ("tokenizer.json", "tokenizer_config.json"):
        assert (default_model_dir / f).read_text() == (converted / f).read_text()
    # the fingerprint still hashes the GGUF file itself
    assert weight_files("default") == [fgguf.GGUFWeights.open(default_model_dir).path]
    assert len(weights_digest("default")) == 64


@pytest.mark.slow
def test_default_stage_from_gguf_equals_converted(default_model_dir: Path, converted: Path) -> None:
    """The embedding + layers 0-7 and the last 8 layers + norm: same tensors, same hidden states."""
    cfg = ModelConfig.from_file(str(default_model_dir / "config.json"))
    ranges = [(0, 8), (cfg.num_layers - 8, cfg.num_layers)]
    direct = [Stage.load(default_model_dir, a, b, dtype="float32", max_context=64, cfg=cfg) for a, b in ranges]
    ref = [Stage.load(converted, a, b, dtype="float32", max_context=64, cfg=cfg) for a, b in ranges]
    for d, r in zip(direct, ref):
        sd, sr = d.state_dict(), r.state_dict()
        assert sd.keys() == sr.keys()
        assert all(torch.equal(sd[k], sr[k]) for k in sd), [k for k in sd if not torch.equal(sd[k], sr[k])]
    tokens = [1, 504, 3458, 314, 253, 1345, 30, 2115, 28, 17, 44, 9147, 2]
    hd, hr = run_chain(direct, tokens), run_chain(ref, tokens)
    assert all(torch.equal(a, b) for a, b in zip(hd, hr))
    assert all(a.abs().max() > 0 and a.isfinite().all() for a in hd)


PEAK_PROBE = textwrap.dedent("""
    import json, sys, torch
    from flowspec.model.stage import Stage
    def status():
        out = {}
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = int(v.split()[0]) * 1024
        return out
    folder, start, end, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.zeros(1).to(getattr(torch, dtype))
    try:  # reset the high-water mark to the current RSS (Linux 4.0+)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    before = status()
    stage = Stage.load(folder, start, end, dtype=dtype, max_context=16)
    after = status()
    print(json.dumps({"peak": after["VmHWM"] - min(before["VmRSS"], before["VmHWM"]),
                      "weights": stage.weight_bytes()}))
""")


def stage_peak(folder: Path, start: int, end: int, dtype: str) -> tuple[int, int]:
    """(RSS high-water mark added by loading the stage, the stage's weight bytes), fresh process."""
    r = subprocess.run([sys.executable, "-c", PEAK_PROBE, str(folder), str(start), str(end), dtype],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout.strip().splitlines()[-1])
    return d["peak"], d["weights"]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmHWM from /proc")
def test_default_stage_peak_memory_under_twice_its_weights(default_model_dir: Path) -> None:
    cfg = ModelConfig.from_file(str(default_model_dir / "config.json"))
    peak, weights = stage_peak(default_model_dir, 8, 16, "bfloat16")
    assert weights == 8 * cfg.layer_params() * 2
    # measured 73 MB for 57 MB of weights (1.3x); the whole model in float32 would be 540 MB
    assert peak < 2 * weights, f"loading 8 layers peaked at {peak / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"


# --------------------------------------------------------- tiny models in llama.cpp's layout
_GGUF_NAMES = {v: k for k, v in fgguf._LAYER.items()}


def llama_cpp_reorder(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's conversion of Q/K rows for its rotary kernel (the inverse of the reader's)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        _, _, i, *part, kind = hf.split(".")
        return f"blk.{i}.{_GGUF_NAMES['.'.join(part)]}.{kind}"
    stem, _, kind = hf.rpartition(".")
    return {v: k for k, v in fgguf._TOP.items()}[stem] + "." + kind


def write_tiny_gguf(hf_folder: Path, path: Path, arch: str, quant: str | None = None) -> dict[str, torch.Tensor]:
    """Write a tiny HF model as llama.cpp would; return the weights a correct reader must give."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((hf_folder / "config.json").read_text())
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    qtype = getattr(gguf.GGMLQuantizationType, quant) if quant else None
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta") or cfg["rope_parameters"]["rope_theta"])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    expect: dict[str, torch.Tensor] = {}
    for name, t in sorted(load_file(str(hf_folder / "model.safetensors")).items()):
        a = t.float().numpy()
        if arch == "llama" and (".q_proj." in name or ".k_proj." in name):
            a = llama_cpp_reorder(a, heads if ".q_proj." in name else kv)
        if qtype is not None and a.ndim == 2:  # what a reader must find: the blocks' own values
            q = gguf.quants.quantize(np.ascontiguousarray(a), qtype)
            d = torch.from_numpy(gguf.quants.dequantize(q, qtype).copy())
            if arch == "llama" and (".q_proj." in name or ".k_proj." in name):  # back to HF order
                h = heads if ".q_proj." in name else kv
                d = d.reshape(h, d.shape[0] // h // 2, 2, -1).transpose(1, 2).reshape(d.shape)
            expect[name] = d
            w.add_tensor(gguf_name(name), q, raw_dtype=qtype)
        else:
            expect[name] = t.float()
            w.add_tensor(gguf_name(name), np.ascontiguousarray(a))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


@pytest.mark.parametrize("kind,arch", [("tiny_llama", "llama"), ("tiny_qwen2", "qwen2")])
def test_tiny_gguf_stage_equals_safetensors(kind: str, arch: str, tiny_model_dir, tmp_path: Path) -> None:
    """float32 GGUF: every tensor and the hidden states of two chained stages are exact."""
    hf = tiny_model_dir(kind)
    write_tiny_gguf(hf, tmp_path / "m.gguf", arch)
    out = tmp_path / "folder"
    out.mkdir()
    fgguf.write_model_files(tmp_path / "m.gguf", out)
    cfg, ref_cfg = (ModelConfig.from_file(str(p / "config.json")) for p in (out, hf))
    # GGUF stores epsilon as float32, which is also what the float32 norms add
    assert cfg == dataclasses.replace(ref_cfg, rms_norm_eps=float(np.float32(ref_cfg.rms_norm_eps)))
    n = cfg.num_layers
    tokens = [(i * 37 + 11) % TINY_VOCAB for i in range(40)]
    got = run_chain([Stage.load(out, 0, 2, dtype="float32"), Stage.load(out, 2, n, dtype="float32")], tokens)
    ref = run_chain([Stage.load(hf, 0, 2, dtype="float32"), Stage.load(hf, 2, n, dtype="float32")], tokens)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))
    assert WeightStore.open(out).has("lm_head.weight")  # untied models keep their own head


def test_tiny_quantized_gguf_reads_blocks_exactly(tiny_model_dir, tmp_path: Path, monkeypatch) -> None:
    """Q8_0 blocks, Q/K rows reordered with 4 query and 2 kv heads, read a few rows at a time."""
    hf = tiny_model_dir("tiny_llama")
    expect = write_tiny_gguf(hf, tmp_path / "q.gguf", "llama", quant="Q8_0")
    out = tmp_path / "folder"
    out.mkdir()
    fgguf.write_model_files(tmp_path / "q.gguf", out)
    monkeypatch.setattr(fgguf, "BLOCK_BYTES", 3 * 4 * 64)  # 3 rows of 64 columns per block
    store = WeightStore.open(out)
    assert set(store.files) == set(expect)
    got = store.load(sorted(expect), torch.float32)
    assert all(torch.equal(got[k], expect[k]) for k in expect), [k for k in expect if not torch.equal(got[k], expect[k])]
    # the reordering matters: without undoing it, Q differs
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(torch.from_numpy(llama_cpp_reorder(expect[q].numpy(), 4)), expect[q])
    bf = store.load([q], torch.bfloat16)[q]
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, expect[q].to(torch.bfloat16))


def test_only_named_tensors_are_read(tiny_model_dir, tmp_path: Path, monkeypatch) -> None:
    hf = tiny_model_dir("tiny_llama")
    write_tiny_gguf(hf, tmp_path / "m.gguf", "llama")
    out = tmp_path / "folder"
    out.mkdir()
    fgguf.write_model_files(tmp_path / "m.gguf", out)
    read: list[str] = []
    orig = fgguf.GGUFWeights._read

    def spy(self, fh, size, ref, dtype):
        read.append(ref.gguf_name)
        return orig(self, fh, size, ref, dtype)

    monkeypatch.setattr(fgguf.GGUFWeights, "_read", spy)
    cfg = ModelConfig.from_file(str(out / "config.json"))
    Stage.load(out, 1, 3, dtype="float32", cfg=cfg)
    want = {gguf_name(n) for i in (1, 2) for n in layer_tensor_names(cfg, i)}
    assert sorted(read) == sorted(want)
    read.clear()
    Stage.load(out, 3, 4, dtype="float32", cfg=cfg)
    assert "output_norm.weight" in read and gguf_name(EMBED) not in read


# ------------------------------------------------------------------------- bad GGUF input
def test_bad_gguf_files_give_one_line_errors(tiny_model_dir, tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelError, match="not a readable GGUF file") as e:
        fgguf.read_gguf(junk)
    assert "\n" not in str(e.value)
    write_tiny_gguf(tiny_model_dir("tiny_llama"), tmp_path / "g.gguf", "gpt2")
    with pytest.raises(ModelError, match="architecture 'gpt2' is not supported"):
        fgguf.read_gguf(tmp_path / "g.gguf")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="must be a .gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_prepared_folder_whose_gguf_changed(tiny_model_dir, tmp_path: Path) -> None:
    write_tiny_gguf(tiny_model_dir("tiny_llama"), tmp_path / "m.gguf", "llama")
    out = tmp_path / "folder"
    out.mkdir()
    fgguf.write_model_files(tmp_path / "m.gguf", out)
    with open(tmp_path / "m.gguf", "ab") as f:
        f.write(b"\0" * 64)
    with pytest.raises(ModelError, match="changed since"):
        WeightStore.open(out)
    (tmp_path / "m.gguf").unlink()
    with pytest.raises(ModelError, match="is gone"):
        WeightStore.open(out)


# ------------------------------------------------------------------ Hugging Face hub cache
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_hub(root: Path, repo_id: str, files: list[Path]) -> Path:
    """The hub cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for f in files:
        shutil.copy(f, snap / f.name)
    return snap


def test_model_id_resolves_from_the_hub_cache(tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:
    snap = fake_hub(tmp_path / "hub", "tinyorg/tiny-llama", sorted(tiny_llama.iterdir()))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("tinyorg/tiny-llama") == snap
    assert weight_files("tinyorg/tiny-llama") == [snap / "model.safetensors"]
    assert weights_digest("tinyorg/tiny-llama") == weights_digest(str(tiny_llama))
    stage = Stage.load(resolve_model("tinyorg/tiny-llama"), 0, 2, dtype="float32")
    assert stage.num_params() > 0
    # HF_HOME/hub is the cache when HF_HUB_CACHE is not set
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    assert resolve_model("tinyorg/tiny-llama") == snap


def test_model_id_not_in_cache_says_where_it_looked(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError) as e:
        resolve_model("nobody/absent-model")
    msg = str(e.value)
    assert str(tmp_path / "hub" / "models--nobody--absent-model") in msg and "never downloads" in msg
    assert "\n" not in msg


def test_hub_snapshot_with_gguf_files(tiny_model_dir, tmp_path: Path, monkeypatch) -> None:
    write_tiny_gguf(tiny_model_dir("tiny_llama"), tmp_path / "tiny.Q8_0.gguf", "llama")
    snap = fake_hub(tmp_path / "hub", "tinyorg/tiny-GGUF", [tmp_path / "tiny.Q8_0.gguf"])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert locate_model("tinyorg/tiny-GGUF") == snap / "tiny.Q8_0.gguf"
    assert weight_files("tinyorg/tiny-GGUF") == [snap / "tiny.Q8_0.gguf"]
    shutil.copy(tmp_path / "tiny.Q8_0.gguf", snap / "tiny.F32.gguf")
    with pytest.raises(ModelError, match="holds 2 GGUF files; name one"):
        locate_model("tinyorg/tiny-GGUF")
