"""Training, evaluation and export of the EAGLE-style head (driven by train_drafter.py)."""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from flowspec.model.config import ModelConfig
from flowspec.model.dtypes import dtype_name
from flowspec.model.loader import EMBED, WeightStore, layer_tensor_names, lm_head_name, resolve_model
from flowspec.speculative.drafters.eagle import EagleHead
from flowspec.speculative.drafters.eagle_checkpoint import LAYER, checkpoint_tensors

from .eagle_pass import forward_unrolled

log = logging.getLogger("train_drafter")


def shard_finished(shard: Path) -> bool:
    """Whether the data tool finished writing `shard`: it writes the shard's .json last."""
    return shard.exists() and shard.with_suffix(".json").exists()


def load_shards(data: Path, features: bool = True, finished: bool = False
                ) -> list[tuple[torch.Tensor, torch.Tensor | None, int]]:
    """(tokens [n], features [n-1, H] or None without `features`, prompt length) per recorded sequence;
    with `finished`, only shards whose .json the data tool has written (it writes it last)."""
    seqs = []
    for f in sorted(data.glob("shard-*.safetensors")):
        if finished and not shard_finished(f):
            log.warning("skipping %s: unfinished (the data run stopped while writing it; resuming redoes it)", f.name)
            continue
        with safe_open(str(f), "pt") as d:
            toks = d.get_tensor("tokens").long()
            hid = d.get_tensor("hidden") if features else None
            lengths, prompt_lengths = d.get_tensor("lengths").tolist(), d.get_tensor("prompt_lengths").tolist()
        off = hoff = 0
        for n, pl in zip(lengths, prompt_lengths):
            seqs.append((toks[off : off + n], hid[hoff : hoff + n - 1] if hid is not None else None, pl))
            off += n
            hoff += n - 1
    return seqs


def init_head(folder: Path, draft_vocab: torch.Tensor | None, init_layer: int) -> EagleHead:
    """A head whose layer starts as a copy of one target layer and whose fc passes the feature through."""
    cfg = ModelConfig.from_file(str(folder / "config.json"))
    store = WeightStore.open(folder)
    names = layer_tensor_names(cfg, init_layer)
    w = store.load(names + [EMBED, lm_head_name(cfg, store)], torch.float32)
    p = f"model.layers.{init_layer}."
    hw = {LAYER + k[len(p):]: v for k, v in w.items() if k.startswith(p)}
    # the layer starts as the identity (its output projections are zero): pred = fused input
    hw[LAYER + "self_attn.o_proj.weight"] = torch.zeros_like(hw[LAYER + "self_attn.o_proj.weight"])
    hw[LAYER + "mlp.down_proj.weight"] = torch.zeros_like(hw[LAYER + "mlp.down_proj.weight"])
    h = cfg.hidden_size
    fc = torch.zeros(h, 2 * h)
    fc[:, h:] = torch.eye(h)
    fc[:, :h] = torch.randn(h, h) * 0.01
    hw["fc.weight"] = fc
    hw["fc.bias"] = torch.zeros(h)
    head_cfg = ModelConfig(**{**cfg.__dict__, "num_layers": 1})
    return EagleHead(head_cfg, hw, w[EMBED], w[lm_head_name(cfg, store)], draft_vocab)


def draft_vocabulary(seqs: list[tuple[torch.Tensor, torch.Tensor | None, int]], size: int, vocab: int) -> torch.Tensor:
    """The `size` most frequent answer tokens of the training set (EOS and specials included if used)."""
    counts = torch.zeros(vocab, dtype=torch.long)
    for toks, _, pl in seqs:
        counts += torch.bincount(toks[pl:], minlength=vocab)
    return torch.sort(torch.topk(counts, size).indices).values


def batches(seqs: list, max_tokens: int, max_len: int, rng: random.Random) -> list[list[int]]:
    order = sorted(range(len(seqs)), key=lambda i: min(len(seqs[i][0]), max_len))
    out, cur, longest = [], [], 0
    for i in order:
        n = min(len(seqs[i][0]), max_len)
        if cur and max(longest, n) * (len(cur) + 1) > max_tokens:
            out.append(cur)
            cur, longest = [], 0
        cur.append(i)
        longest = max(longest, n)
    if cur:
        out.append(cur)
    rng.shuffle(out)
    return out


def make_batch(seqs: list, idx: list[int], max_len: int, vocab_map: torch.Tensor, noise: float,
               gen: torch.Generator, prompt_weight: float = 0.5) -> dict[str, torch.Tensor]:
    """Head inputs (token k, feature k-1) and targets (feature k, token k+1) for k = 1 .. n-2."""
    T = max(min(len(seqs[i][0]), max_len) - 2 for i in idx)
    B = len(idx)
    H = seqs[idx[0]][1].shape[1]
    tokens = torch.zeros(B, T, dtype=torch.long)
    feats = torch.zeros(B, T, H)
    target = torch.zeros(B, T, H)
    nxt = torch.full((B, T), -100, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    weight = torch.zeros(B, T)
    pos = torch.zeros(B, T, dtype=torch.long)
    for b, i in enumerate(idx):
        toks, hid, pl = seqs[i]
        n = min(len(toks), max_len)
        t = n - 2
        tokens[b, :t] = toks[1 : n - 1]
        feats[b, :t] = hid[: n - 2].float()
        target[b, :t] = hid[1 : n - 1].float()
        pos[b, :t] = torch.arange(1, n - 1)
        valid[b, :t] = True
        # every position teaches the head (EAGLE trains on teacher-forced text too); positions
        # whose next token is the target's own answer count fully, prompt positions half
        k = torch.arange(1, n - 1)
        ans = (k + 1) >= pl
        weight[b, :t] = torch.where(ans, 1.0, prompt_weight)
        nxt[b, :t] = vocab_map[toks[2:n]]
    if noise > 0 and gen is not None:
        feats = feats + (torch.rand(feats.shape, generator=gen) - 0.5) * 2 * noise
    return {"tokens": tokens, "feats": feats, "target": target, "next": nxt, "valid": valid,
            "weight": weight, "pos": pos}


def train(args: argparse.Namespace, extra: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=float, default=6.0)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-tokens", type=int, default=8192)
    p.add_argument("--max-len", type=int, default=640)
    p.add_argument("--draft-vocab", type=int, default=8192)
    p.add_argument("--init-layer", type=int, default=-1,
                   help="target layer the head's layer starts from (output projections zeroed)")
    p.add_argument("--init-head", default=None,
                   help="start from this head folder's fc and layer instead (fine-tuning a trained head)")
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--ce-weight", type=float, default=0.5)
    p.add_argument("--reg-weight", type=float, default=1.0, help="weight of the feature regression loss")
    p.add_argument("--soft", type=int, default=0,
                   help="1: cross-entropy against the target's own distribution (its lm_head on the recorded "
                        "feature, drafting vocabulary); 0: against the recorded next token")
    p.add_argument("--ttt", type=int, default=2,
                   help="passes per batch: 1 = teacher forcing; n > 1 also trains depths 2..n on the head's own features")
    p.add_argument("--ttt-decay", type=float, default=0.8, help="loss weight factor per extra pass")
    p.add_argument("--prompt-weight", type=float, default=0.5, help="loss weight of prompt positions")
    p.add_argument("--val-every", type=int, default=0, help="held-out agreement every n steps (0: at the end)")
    p.add_argument("--save-every", type=int, default=200)
    o, _ = p.parse_known_args(extra)
    out = Path(args.out)
    folder = resolve_model(args.model)
    cfg = ModelConfig.from_file(str(folder / "config.json"))
    seqs = load_shards(out / "data", finished=True)
    if not seqs:
        raise SystemExit(f"no data in {out / 'data'}; run `train_drafter.py data` first")
    rng = random.Random(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    dv = draft_vocabulary(seqs, o.draft_vocab, cfg.vocab_size)
    vocab_map = torch.full((cfg.vocab_size,), -100, dtype=torch.long)
    vocab_map[dv] = torch.arange(dv.numel())
    head = init_head(folder, dv, o.init_layer % cfg.num_layers)
    ckpt = out / "ckpt.pt"
    if o.init_head and not ckpt.exists():  # a checkpoint, when there is one, is resumed instead
        src = EagleHead.load(o.init_head, head.embed.weight, head.lm_head, dtype=torch.float32)
        head.fc.load_state_dict(src.fc.state_dict())
        head.layer.load_state_dict(src.layer.state_dict())
        log.info("starting from the head in %s", o.init_head)
    params = head.trainable()
    for p_ in params:
        p_.data = p_.data.float()
    opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=0.0, betas=(0.9, 0.95))
    ans_tokens = sum(max(0, len(t) - pl) for t, _, pl in seqs)
    plan = batches(seqs, o.batch_tokens, o.max_len, rng)
    total_steps = int(len(plan) * o.epochs)
    step = 0
    if ckpt.exists():
        st = torch.load(str(ckpt), map_location="cpu", weights_only=True)
        head.load_state_dict(st["head"], strict=False)
        opt.load_state_dict(st["opt"])
        step = int(st["step"])
        log.info("resumed from step %d", step)
    log.info("%d sequences, %d answer tokens, %d batches per epoch, %d steps, draft vocab %d",
             len(seqs), ans_tokens, len(plan), total_steps, dv.numel())
    warm = min(200, total_steps // 10 + 1)
    step0 = step
    t0 = time.time()
    seen = 0
    head.train()
    ema = None
    while step < total_steps:
        epoch, j = divmod(step, len(plan))
        if j == 0 and step > 0:
            rng.shuffle(plan)
        b = make_batch(seqs, plan[j], o.max_len, vocab_map, o.noise, gen, o.prompt_weight)
        lr = o.lr * min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, step / total_steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        w = b["weight"]
        T = w.shape[1]
        autocast = _autocast(args.dtype)
        with autocast:
            outs = forward_unrolled(head, b["tokens"], b["feats"], b["pos"], b["valid"], o.ttt)
            if o.soft:
                with torch.no_grad():
                    soft = torch.softmax(head.logits(b["target"]), dim=-1)
        has_label = b["next"] != -100
        n_labelled = (w * has_label).sum().clamp(min=1)
        reg = ce = torch.zeros(())
        for si, pred in enumerate(outs):
            ws = w * (torch.arange(T)[None] >= si) * (o.ttt_decay ** si)
            with autocast:
                logits = head.logits(pred)
            reg_s = F.smooth_l1_loss(pred.float(), b["target"], reduction="none").mean(-1)
            reg = reg + (reg_s * ws).sum() / w.sum().clamp(min=1)
            if o.soft:
                ce_s = -(soft * torch.log_softmax(logits, dim=-1)).sum(-1)
                cw = ws
            else:
                ce_s = F.cross_entropy(logits.view(-1, logits.shape[-1]), b["next"].view(-1),
                                       ignore_index=-100, reduction="none").view_as(w)
                cw = ws * has_label
            ce = ce + (ce_s * cw).sum() / n_labelled
            if si == 0:
                logits0 = logits
        loss = o.reg_weight * reg + o.ce_weight * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        with torch.no_grad():
            m = b["next"] != -100
            acc = float((logits0.argmax(-1)[m] == b["next"][m]).float().mean()) if m.any() else 0.0
        seen += int(b["valid"].sum())
        ema = (reg.item(), ce.item(), acc) if ema is None else tuple(0.95 * e + 0.05 * v for e, v in zip(ema, (reg.item(), ce.item(), acc)))
        step += 1
        if step % 20 == 0 or step == total_steps:
            el = time.time() - t0
            log.info("step %d/%d epoch %d: reg %.4f ce %.3f top1 %.3f lr %.2e (%.0f tokens/s, ~%.0f min left)",
                     step, total_steps, epoch, ema[0], ema[1], ema[2], lr, seen / el,
                     (total_steps - step) / max(step - step0, 1) * el / 60)
        if step % o.save_every == 0 or step == total_steps:
            torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step}, str(ckpt))
            export(head, out / "head", args, {"steps": step, "answer_tokens": ans_tokens, "sequences": len(seqs),
                                               "train_seconds": round(time.time() - t0)})
        if (o.val_every and step % o.val_every == 0) or step == total_steps:
            validate(head, out, vocab_map, max(o.ttt, 4), args.dtype)
            head.train()


def validate(head: EagleHead, out: Path, vocab_map: torch.Tensor, steps: int, dtype: str = "auto") -> dict:
    """Held-out agreement per depth on every data set under OUT/val/ (folders of shards)."""
    head.eval()
    res = {}
    for d in sorted((out / "val").glob("*")) if (out / "val").is_dir() else []:
        seqs = load_shards(d)
        if seqs:
            res[d.name] = answer_agreement(head, seqs, steps, vocab_map, dtype=dtype)
            log.info("held-out %s: %s", d.name, "  ".join(
                f"d{r['depth']} top1 {r['top1']:.3f} top8 {r['top8']:.3f}" for r in res[d.name]))
    return res


@torch.no_grad()
def answer_agreement(head: EagleHead, seqs: list, steps: int, vocab_map: torch.Tensor, max_len: int = 640,
                     batch_tokens: int = 8192, k: int = 8, dtype: str = "auto") -> list[dict[str, float]]:
    """Held-out agreement with the target on answer positions, per draft depth: the share of
    positions where the head's top-1 (and top-k) drafting token is the target's greedy token,
    feeding the head its own features for depths > 1 (as a draft chain does)."""
    hits1 = [0] * steps
    hitsk = [0] * steps
    count = [0] * steps
    for idx in batches(seqs, batch_tokens, max_len, random.Random(0)):
        b = make_batch(seqs, idx, max_len, vocab_map, 0.0, None)
        with _autocast(dtype):
            outs = forward_unrolled(head, b["tokens"], b["feats"], b["pos"], b["valid"], steps)
        ans = b["weight"] == 1.0
        T = ans.shape[1]
        for s, out in enumerate(outs):
            m = ans & b["valid"] & (torch.arange(T)[None] >= s)
            top = head.logits(out[m]).topk(k, dim=-1).indices
            lab = b["next"][m][:, None]
            hits1[s] += int((top[:, :1] == lab).sum())
            hitsk[s] += int((top == lab).any(-1).sum())
            count[s] += int(m.sum())
    return [{"depth": s + 1, "top1": round(hits1[s] / max(count[s], 1), 4),
             f"top{k}": round(hitsk[s] / max(count[s], 1), 4), "positions": count[s]} for s in range(steps)]


def _autocast(dtype: str) -> torch.autocast:
    """The head's compute precision: bfloat16 autocast where ``dtype`` resolves to bfloat16
    (``auto``: only with native support), plain float32 otherwise."""
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype_name(dtype) == "bfloat16")


def export(head: EagleHead, folder: Path, args: argparse.Namespace, meta: dict) -> None:
    w = {k: v.to(torch.bfloat16) for k, v in checkpoint_tensors(head.fc, head.layer).items()}
    bf = EagleHead(head.cfg, w, head.embed.weight.detach(), head.lm_head.detach(), head.draft_vocab)
    bf.save(folder, {"flowspec": {"target": str(args.model), **meta}})


def evaluate(args: argparse.Namespace, extra: list[str]) -> dict:
    """tau on MT-bench first turns: single process, greedy, EAGLE-2 tree (chunked = one tree per round)."""
    from flowspec.model.pipeline import LocalPipeline
    from flowspec.model.tokenizer import Tokenizer
    from flowspec.speculative.drafters.eagle import EagleDrafter
    from flowspec.speculative.local_ring import generate_local
    from flowspec.speculative.strategies import TreeParams

    p = argparse.ArgumentParser()
    p.add_argument("--head", default=None)
    p.add_argument("--prompts", type=int, default=80)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--total", type=int, default=64)
    p.add_argument("--draft-vocab", type=int, default=0,
                   help="draft from this many of the training set's most frequent answer tokens (the data in "
                        "--out) instead of the head's own drafting vocabulary; 0: the head's own")
    p.add_argument("--write-head", default=None, help="also save the head as evaluated (its drafting vocabulary) here")
    o, _ = p.parse_known_args(extra)
    from flowspec.bench import mtbench_first_turns

    folder = resolve_model(args.model)
    tok = Tokenizer(folder)
    pipe = LocalPipeline.load(folder, 1, dtype=args.dtype, max_context=2048)
    emb = pipe.stages[0].embed.weight
    head_dir = Path(o.head or Path(args.out) / "head")
    head = EagleHead.load(head_dir, emb, pipe.head.weight)
    if o.draft_vocab:
        counted = load_shards(Path(args.out) / "data", features=False, finished=True)
        if not counted:
            raise SystemExit(f"--draft-vocab ranks the answer tokens in {Path(args.out) / 'data'}, which holds none; "
                             "run `train_drafter.py data` first or point --out at a folder that has data")
        dv = draft_vocabulary(counted, o.draft_vocab, pipe.cfg.vocab_size)
        head = EagleHead(head.cfg, checkpoint_tensors(head.fc, head.layer), emb, pipe.head.weight, dv)
    if o.write_head:
        meta = json.loads((head_dir / "config.json").read_text()).get("flowspec", {})
        if head.draft_vocab is not None:
            meta["draft_vocab"] = int(head.draft_vocab.numel())
        head.save(o.write_head, {"flowspec": meta})
    drafter = EagleDrafter(head, 2048)
    tree = TreeParams(depth=o.depth, top_k=o.top_k, total=o.total, segment=o.total, in_flight=1)
    prompts = mtbench_first_turns()[: o.prompts]
    tokens = rounds = 0
    t0 = time.time()
    draft_s = 0.0
    for i, q in enumerate(prompts):
        r = generate_local(pipe, "chunked", tok.encode_prompt(q), o.new_tokens, drafter, tok.eos_ids, tree=tree)
        s = r["stats"]
        tokens += s["new_tokens"]
        rounds += s["rounds"]
        draft_s += s["draft_s"]
        log.info("prompt %d: tau %.2f (running %.3f)", i, s["tau"], tokens / max(rounds, 1))
    res = {"tau": round(tokens / max(rounds, 1), 3), "prompts": len(prompts), "new_tokens": tokens,
           "rounds": rounds, "draft_ms_per_round": round(1000 * draft_s / max(rounds, 1), 2),
           "tree": {"depth": o.depth, "top_k": o.top_k, "total": o.total}, "seconds": round(time.time() - t0)}
    log.info("MT-bench: %s", res)
    (Path(args.out) / "eval.json").write_text(json.dumps(res, indent=2))
    return res


def main(args: argparse.Namespace, extra: list[str]) -> int:
    if args.cmd in ("train", "all"):
        train(args, extra)
    if args.cmd in ("eval", "all"):
        evaluate(args, extra)
    return 0
