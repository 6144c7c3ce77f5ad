"""The `flowspec` command."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from . import __version__
from .config.schema import DTYPES
from .errors import FlowSpecError

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


def cmd_generate(args: argparse.Namespace) -> int:
    if args.topology:
        from .commands import generate_on_ring

        res = generate_on_ring(args)
        _emit(args, res["text"], res["token_ids"], res["stats"])
        return 0
    import torch

    from .model.loader import resolve_model
    from .model.pipeline import LocalPipeline, greedy_generate
    from .model.tokenizer import Tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    folder = resolve_model(args.model)
    tok = Tokenizer(folder)
    prompt = tok.encode_prompt(args.prompt, raw=args.raw)
    dtype = args.dtype or "auto"
    ctx = args.max_context or 2048
    pipe = LocalPipeline.load(folder, args.stages or 1, dtype=dtype, max_context=ctx)
    strategy = args.strategy or "autoregressive"
    if strategy == "autoregressive" and not args.temperature:
        res = greedy_generate(pipe, prompt, args.max_new_tokens, tok.eos_ids)
        ids, stats = res.token_ids, dict(res.stats)
    else:
        from .spec.drafters import make_drafter, parse_drafter
        from .spec.local_ring import generate_local
        from .spec.sampling import SamplingParams
        from .spec.strategies import STRATEGIES, TreeParams

        if strategy not in STRATEGIES:
            raise FlowSpecError(f"unknown strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}")
        kind, path = parse_drafter(args.drafter or "eagle")
        drafter = make_drafter(kind, path, pipe.cfg.vocab_size, dtype, ctx, target_folder=folder)
        sampling = SamplingParams(args.temperature or 0.0, args.top_p or 1.0, args.top_k or 0, args.seed or 0)
        tree = TreeParams(in_flight=max(1, len(pipe.stages)))
        res2 = generate_local(pipe, strategy, prompt, args.max_new_tokens, drafter, tok.eos_ids, sampling, tree)
        ids, stats = res2["token_ids"], dict(res2["stats"], drafter=args.drafter or "eagle")
    stats.update(strategy=strategy, stages=len(pipe.stages), dtype=dtype)
    _emit(args, tok.decode(ids), ids, stats)
    return 0


# ------------------------------------------------------------------------------ main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowspec", description=__doc__)
    p.add_argument("--version", action="version", version=f"flowspec {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-v info, -vv debug)")
    sub = p.add_subparsers(dest="cmd", required=True)

    sp = sub.add_parser("prepare", help="convert the default model into the cache (done by `make setup`)")
    sp.add_argument("--model", default="default")
    sp.set_defaults(func=cmd_prepare)

    g = sub.add_parser("generate", help="generate text: in this process (--model) or on a ring (--topology)")
    g.add_argument("--prompt", required=True, help="the user's message (chat template applied unless --raw)")
    g.add_argument("--model", default="default",
                   help="model folder, .gguf file or 'default' (single-process mode)")
    g.add_argument("--topology", help="YAML topology: generate on its ring instead of in this process")
    g.add_argument("--local", action="store_true", help="start the topology's nodes for this call, stop them after")
    g.add_argument("--stages", type=int, default=0, help="single-process mode: split the layers into K stages")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--dtype", choices=DTYPES, default=None,
                   help="override model.dtype (single-process mode: default auto)")
    g.add_argument("--max-context", type=int, default=0)
    g.add_argument("--strategy", default=None, help="autoregressive | chunked | pipedec | flowspec")
    g.add_argument("--drafter", default=None, help="lookup | model:PATH | eagle:PATH | none")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    g.add_argument("--raw", action="store_true", help="do not apply the chat template")
    g.add_argument("--json", action="store_true", help="print {text, token_ids, stats} as JSON")
    g.set_defaults(func=cmd_generate)

    _add_runtime_commands(sub)
    return p


def _add_runtime_commands(sub: Any) -> None:
    """Subcommands that live in the runtime (registered lazily so `generate --model` stays light)."""
    from .bench import add_bench_command
    from .chat import add_chat_command
    from .commands import add_commands

    add_commands(sub)
    add_chat_command(sub)
    add_bench_command(sub)


def run_reporting(prog: str, command: Callable[[], int]) -> int:
    """Run a command-line command: a FlowSpecError becomes one line on stderr (exit 2), Ctrl-C
    exit 130 -- never a traceback. Shared by `flowspec` and the tools/ scripts."""
    try:
        return command()
    except FlowSpecError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    return run_reporting("flowspec", lambda: func(args))


if __name__ == "__main__":
    sys.exit(main())
