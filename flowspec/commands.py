"""`flowspec node`, `flowspec up`, and `flowspec generate --topology`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from typing import Any, Awaitable, Callable, TypeVar

from .cli_common import TOPOLOGY_ENV, add_node_option, add_topology_option, drafter_arg, env_default, env_value
from .config import DTYPES, Topology
from .errors import FlowSpecError, UsageError

log = logging.getLogger(__name__)
T = TypeVar("T")


def run_async(main: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine on uvloop where it is installed, else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # only the import: an ImportError inside main() must not run it twice
        log.info("uvloop is not installed; running on asyncio's own event loop")
        return asyncio.run(main())  # type: ignore[arg-type]
    return uvloop.run(main())  # type: ignore[no-any-return]


def _node_overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {"dtype": getattr(args, "dtype", None), "drafter": getattr(args, "drafter", None),
            "max_context": getattr(args, "max_context", None) or None}


def load_topology(args: argparse.Namespace) -> Topology:
    topo = Topology.load(args.topology)
    over = _node_overrides(args)
    return topo.with_overrides(**over) if any(v is not None for v in over.values()) else topo


# ------------------------------------------------------------------------------- node
def build_node(topo: Topology, name: str) -> Any:
    """Load what node `name` needs (only its own layers) and return the node object."""
    from .footprint import layer_ranges
    from .model.config import ModelConfig
    from .model.dtypes import describe
    from .model.int8 import describe as describe_stage_weights
    from .model.loader import model_fingerprint, resolve_model
    from .model.stage import LMHead, Stage

    me = topo.node(name)
    key = topo.cluster_key()
    folder = resolve_model(topo.model.target)
    cfg = ModelConfig.from_file(str(folder / "config.json"))
    dtype, stage_weights = topo.model.dtype, topo.model.stage_weights
    log.info("%s: weights in %s", name, describe(dtype))
    if stage_weights != "same":
        log.warning("%s: the stages hold their %s", name, describe_stage_weights(stage_weights, describe(dtype)))
    # the same split on every node (and in `flowspec check`): `auto` is planned at its largest (float32),
    # whatever this CPU picks; with decoding.verify: last_stage the last stage holds the lm_head too
    ranges = layer_ranges(topo, cfg)
    fingerprint = model_fingerprint(str(topo.model.target), cfg, stage_weights)
    if me.is_source:
        from .model.tokenizer import Tokenizer
        from .speculative.drafters import make_drafter
        from .runtime.source_node import SourceNode

        drafter = make_drafter(topo.model.drafter.kind, topo.model.drafter.path, cfg.vocab_size, dtype,
                               topo.model.max_context, target_folder=folder)
        head = LMHead.load(folder, dtype=dtype, cfg=cfg)
        return SourceNode(topo, name, key, Tokenizer(folder), head, drafter, fingerprint,
                          cfg.num_layers, str(topo.model.target))
    from .runtime.spare_node import SpareNode
    from .runtime.stage_node import StageNode

    if me.is_spare:  # no layers until it takes a dead stage's place
        return SpareNode(topo, name, key, fingerprint)
    a, b = ranges[name]
    stage = Stage.load(folder, a, b, dtype=dtype, max_context=topo.model.max_context, cfg=cfg,
                       stage_weights=stage_weights)
    log.info("%s: layers %d-%d loaded (%d parameters, %.1f MB%s)", name, a, b - 1, stage.num_params(),
             stage.weight_bytes() / 1e6, "" if stage_weights == "same" else f", projections in {stage_weights}")
    head = None
    if topo.decoding.lm_head_at_last_stage and topo.stages[-1].name == name:
        head = LMHead.load(folder, dtype=dtype, cfg=cfg)
        log.info("%s: the lm_head loaded (decoding.verify: %s): this stage chooses the tokens%s", name,
                 topo.decoding.verify, " while requests share the ring" if topo.decoding.verify == "auto" else "")
    # a stage whose place a spare took (it came back too late) waits as a spare itself
    return SpareNode(topo, name, key, fingerprint, member=StageNode(topo, name, key, stage, fingerprint, head))


def cmd_node(args: argparse.Namespace) -> int:
    import torch

    if args.verbose == 0:
        logging.getLogger("flowspec").setLevel(logging.INFO)
    if args.threads:
        torch.set_num_threads(args.threads)
    topo = load_topology(args)
    serve_http = topo.node(args.name).is_source and not args.no_api
    if serve_http:
        topo.api_key()  # an unset api_key_env is an error now, not after the weights are loaded
    node = build_node(topo, args.name)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        runner = None
        if serve_http:
            from .api import start_api

            runner = await start_api(node, topo)  # FlowSpecError: the node does not start
        try:
            await node.run(stop)
        finally:
            if runner is not None:
                await runner.cleanup()

    run_async(main)
    log.info("%s stopped", args.name)
    return 0


# --------------------------------------------------------------------------------- up
def _summary_table(status: dict[str, Any], topo: Topology, procs: dict[str, Any]) -> Any:
    """The formed ring: one row per node, with its process and log when it runs here."""
    from rich.table import Table

    t = Table(title=f"ring {topo.cluster!r}: {status.get('model')}")
    for col in ("node", "address", "layers", "weights", "status", "pid", "log"):
        t.add_column(col)

    def proc(name: str) -> list[str]:
        p = procs.get(name)
        return [str(p.proc.pid), str(p.log_path)] if p is not None else ["", "(elsewhere)"]

    src = topo.source
    t.add_row(src.name, f"{src.host}:{src.port}", "lm_head + drafter", "", "source, ready", *proc(src.name))
    for r in status.get("ring", []):
        a, b = r["layers"]
        t.add_row(r["name"], r["address"], f"{a}-{b - 1}", f"{r['weight_bytes'] / 1e6:.1f} MB", "ready",
                  *proc(r["name"]))
    in_ring = {src.name} | {r["name"] for r in status.get("ring", [])}
    waiting = set(status.get("spares") or [])
    for n in topo.nodes:  # the spares: outside the ring until a stage stays dead (decoding.failover_after_s)
        if n.name not in in_ring:
            t.add_row(n.name, f"{n.host}:{n.port}", "-", "" if n.memory_gb is None else f"up to {n.memory_gb:g} GiB",
                      "spare, waiting" if n.name in waiting else "spare, not connected", *proc(n.name))
    return t


async def spares_announced(topo: Topology, key: bytes, status: dict[str, Any], local: set[str],
                           timeout: float) -> dict[str, Any]:
    """The source's status once the spares started here have announced themselves (they load
    no layers, so they are ready about when the ring forms), or as it is after `timeout`."""
    from .runtime.client import RingClient

    deadline = time.monotonic() + timeout
    while local - set(status.get("spares") or []) and time.monotonic() < deadline:
        await asyncio.sleep(0.3)
        try:
            c = await RingClient.connect(topo, key, timeout=2.0)
            try:
                status = await c.status()
            finally:
                await c.close()
        except (FlowSpecError, OSError, asyncio.TimeoutError) as e:
            log.debug("the status of the ring, for its spares: %s", e)
    return status


def wait_api(host: str, port: int, timeout: float, alive: Callable[[], None]) -> None:
    """Until GET /health answers (any HTTP status); FlowSpecError when it does not in time."""
    import urllib.error
    import urllib.request

    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/health"
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        alive()
        try:
            with urllib.request.urlopen(url, timeout=2.0):
                return
        except urllib.error.HTTPError:  # 503, 401, ...: it answers
            return
        except (urllib.error.URLError, OSError) as e:
            last = str(getattr(e, "reason", e))
        time.sleep(0.2)
    raise FlowSpecError(f"the ring formed, but the HTTP API at {url} does not answer ({last}); "
                        "see the source's log")


def cmd_up(args: argparse.Namespace) -> int:
    from rich.console import Console

    args.topology = args.topology_opt or args.topology_file
    if not args.topology:
        raise UsageError(f"flowspec up needs a topology file: flowspec up topologies/local.yaml (or set "
                         f"${TOPOLOGY_ENV})")

    from .testbed import Testbed, client_topology, local_ring_for
    from .runtime.client import wait_formed

    topo = load_topology(args)
    console = Console(stderr=False)
    ring = local_ring_for(args, topo, node_flags(args))  # a Testbed with --emulate / a testbed section

    def on_signal(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_signal)
    try:
        ring.start()
        console.print(f"started {len(ring.procs)} node(s); logs in {ring.log_dir}")
        st = run_async(lambda: wait_formed(client_topology(ring, topo), ring.key, args.timeout,
                                           ring.check_alive))
        api_line = ""
        if ring.serves_api:
            wait_api(topo.api.host, topo.api.port, 30.0, ring.check_alive)
            api_line = f"; API at http://{topo.api.host}:{topo.api.port}"
        local_spares = {p.name for p in ring.procs if topo.node(p.name).is_spare}
        st = run_async(lambda: spares_announced(client_topology(ring, topo), ring.key, st, local_spares, 10.0))
        console.print(_summary_table(st, topo, {p.name: p for p in ring.procs}))
        if isinstance(ring, Testbed):
            console.print("emulated: " + "; ".join(ring.describe()))
        console.print(f"ring formed{api_line} ; Ctrl-C stops every node")
        while True:  # a node that exits is started again (with backoff); the ring re-forms by itself
            for line in ring.restart_dead():
                console.print(line)
            time.sleep(0.5)
    except KeyboardInterrupt:
        console.print("stopping the ring ...")
        return 0
    finally:
        ring.stop()
        signal.signal(signal.SIGTERM, old)


def node_flags(args: argparse.Namespace) -> list[str]:
    """The `flowspec node` flags a launcher passes on to every node (--dtype, --drafter, --max-context)."""
    flags: list[str] = []
    if getattr(args, "dtype", None):
        flags += ["--dtype", args.dtype]
    if getattr(args, "drafter", None):
        flags += ["--drafter", args.drafter]
    if getattr(args, "max_context", None):
        flags += ["--max-context", str(args.max_context)]
    return flags


# --------------------------------------------------------------------------- generate
def request_meta(args: argparse.Namespace) -> dict[str, Any]:
    meta: dict[str, Any] = {"prompt": args.prompt, "raw": bool(args.raw), "max_new_tokens": args.max_new_tokens}
    for k in ("strategy", "temperature", "top_p", "top_k", "seed"):
        v = getattr(args, k, None)
        if v is not None:
            meta[k] = v
    return meta


def generate_on_ring(args: argparse.Namespace) -> dict[str, Any]:
    from .runtime.client import RingClient, wait_formed
    from .runtime.launcher import LocalRing

    topo = load_topology(args)

    async def ask(key: bytes) -> dict[str, Any]:
        c = await RingClient.connect(topo, key)
        try:
            return await c.generate(request_meta(args))
        finally:
            await c.close()

    if not args.local:
        key = topo.cluster_key()
        return run_async(lambda: ask(key))
    ring = LocalRing(args.topology, topo, node_flags(args), threads=args.threads or None)
    try:
        ring.start()

        async def go() -> dict[str, Any]:
            await wait_formed(topo, ring.key, 300, ring.check_alive)
            return await ask(ring.key)

        return run_async(go)
    finally:
        ring.stop()


def add_commands(sub: Any) -> None:
    n = sub.add_parser("node", help="run one node of a topology in the foreground (a service: docs/systemd.md)")
    add_topology_option(n)
    add_node_option(n)
    n.add_argument("--threads", type=int, default=0, help="torch compute threads (0: torch's default)")
    n.add_argument("--dtype", choices=DTYPES, default=None, help="override model.dtype (default: the topology's)")
    n.add_argument("--drafter", type=drafter_arg, default=None,
                   help="override model.drafter, source only: lookup | model:PATH | eagle[:PATH] | none "
                        "(default: the topology's)")
    n.add_argument("--max-context", type=int, default=0,
                   help="override model.max_context, KV-cache slots (0: the topology's)")
    n.add_argument("--no-api", action="store_true", help="source: do not serve the HTTP API")
    n.set_defaults(func=cmd_node)

    u = sub.add_parser("up", help="start every node of a topology that lives on this machine; a node that exits is "
                       "started again (backoff 1, 2, 4 ... 30 s)")
    u.add_argument("topology_file", nargs="?", metavar="TOPOLOGY", default=env_value(TOPOLOGY_ENV),
                   help=f"the YAML topology (default: {env_default(TOPOLOGY_ENV)})")
    u.add_argument("--topology", dest="topology_opt", default=None, metavar="FILE", help="the same, as an option")
    u.add_argument("--threads", type=int, default=0, help="torch threads per node (0: cores / nodes)")
    u.add_argument("--dtype", choices=DTYPES, default=None, help="override model.dtype (default: the topology's)")
    u.add_argument("--drafter", type=drafter_arg, default=None,
                   help="override model.drafter: lookup | model:PATH | eagle[:PATH] | none (default: the topology's)")
    u.add_argument("--max-context", type=int, default=0,
                   help="override model.max_context, KV-cache slots (0: the topology's)")
    u.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the ring to form")
    from .testbed import add_testbed_args

    add_testbed_args(u)
    u.set_defaults(func=cmd_up)
