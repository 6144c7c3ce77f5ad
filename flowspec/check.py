"""`flowspec check TOPOLOGY`: is the file valid, how are the layers split, how much memory
does each node need, and (with ``--reach``) does each node's address answer?

Every problem of an invalid file is printed at once, one line each (exit 2). A valid file
prints one row per node: its address, what it holds (layers, embedding, norm, lm_head,
drafter), the bytes of its weights and of its KV caches. Exit 1 when the model cannot be
read on this machine (nor the drafter) or, with ``--reach``, when a node does not answer a
TCP connect.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
from typing import Any, Sequence

from .cli_common import EXIT_RUNTIME, TOPOLOGY_ENV, env_default, env_value
from .config import Topology
from .errors import ModelError, UsageError
from .layer_plan import range_text

REACH_TIMEOUT_S = 2.0


# ------------------------------------------------------------------------------ reach
async def _reach_one(host: str, port: int, timeout: float) -> str | None:
    """None when host:port accepts a TCP connection within timeout, else why not, in words."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except asyncio.TimeoutError:
        return f"no answer within {timeout:g} s"
    except socket.gaierror:
        return f"unknown host {host!r}"
    except ConnectionRefusedError:
        return "connection refused (nothing listens there)"
    except OSError as e:
        return e.strerror or str(e)
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass
    return None


def reach(addresses: Sequence[tuple[str, int]], timeout: float = REACH_TIMEOUT_S) -> list[str | None]:
    """For each (host, port), at once: None when it answers a TCP connect, else why not."""
    async def all_of() -> list[str | None]:
        return list(await asyncio.gather(*(_reach_one(h, p, timeout) for h, p in addresses)))

    return asyncio.run(all_of())


# ----------------------------------------------------------------------------- output
def size_text(n: int) -> str:
    """Bytes as MiB or GiB."""
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"


def table(rows: list[list[str]]) -> list[str]:
    """Left-aligned columns, two spaces apart."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _model_line(topo: Topology, cfg: Any) -> str:
    from .model.dtypes import planning_bytes

    dtype = topo.model.dtype
    size = planning_bytes(dtype)
    weights = (f"dtype auto, sized at float32 ({size} bytes a weight: the most auto may choose; half where a "
               "node runs bfloat16)" if dtype == "auto" else f"dtype {dtype} ({size} bytes a weight)")
    if topo.model.stage_weights == "int8":
        weights += "; the stages' projections in int8 (1 byte a weight; model.stage_weights: int8)"
    return (f"model {topo.model.target}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocabulary "
            f"{cfg.vocab_size}; {weights}; drafter {topo.model.drafter}; tokens chosen at the "
            f"{_VERIFY_TEXT[topo.decoding.verify]}")


_VERIFY_TEXT = {"source": "source", "last_stage": "last stage",
                "auto": "last stage while requests share the ring, else at the source"}


def _node_rows(topo: Topology, reached: list[str | None] | None) -> tuple[list[str], list[list[str]]]:
    """With the model read here: the lines above the node table, and its rows (ModelError when
    the model cannot be read, TopologyError when the layers do not fit)."""
    from .model.config import ModelConfig
    from .model.loader import resolve_model
    from .footprint import drafter_params, plan_ring

    folder = resolve_model(topo.model.target)
    cfg = ModelConfig.from_file(str(folder / "config.json"))
    plans = plan_ring(topo, cfg, drafter_params(topo, cfg))
    rows = [["node", "role", "address", "holds", "weights", f"KV caches ({topo.decoding.max_active} x "
             f"{topo.model.max_context})"] + (["reach"] if reached is not None else [])]
    for i, p in enumerate(plans):
        row = [p.name, p.role, p.address, p.holds, size_text(p.weight_bytes),
               size_text(p.kv_bytes) if p.kv_bytes else "-"]
        rows.append(row + ([_reach_text(reached[i])] if reached is not None else []))
    total = (f"total: weights {size_text(sum(p.weight_bytes for p in plans))}, KV caches "
             f"{size_text(sum(p.kv_bytes for p in plans))}")
    return [_model_line(topo, cfg), total], rows


def _layers_only_rows(topo: Topology, reached: list[str | None] | None) -> list[list[str]]:
    """Without the model: the layers when model.num_layers gives them, else what the file says."""
    ranges = topo.resolve_layers(topo.model.num_layers) if topo.model.num_layers else {}
    rows = [["node", "role", "address", "layers"] + (["reach"] if reached is not None else [])]
    for i, n in enumerate(topo.nodes):
        if n.is_source:
            layers = "lm_head + drafter"
        elif n.name in ranges:
            layers = range_text(ranges[n.name])
        elif n.layers is None:  # a node that holds no layers of its own (a spare)
            layers = "-"
        else:
            layers = n.layers if isinstance(n.layers, str) else range_text(n.layers)  # type: ignore[arg-type]
        rows.append([n.name, n.role, f"{n.host}:{n.port}", layers]
                    + ([_reach_text(reached[i])] if reached is not None else []))
    return rows


def _reach_text(why: str | None) -> str:
    return "answers" if why is None else f"NO: {why}"


# ---------------------------------------------------------------------------- command
def cmd_check(args: argparse.Namespace) -> int:
    path = args.topology_opt or args.topology_file
    if not path:
        raise UsageError(f"flowspec check needs a topology file: flowspec check topologies/local.yaml "
                         f"(or set ${TOPOLOGY_ENV})")
    topo = Topology.load(path)  # TopologyError: every problem at once, exit 2
    if args.timeout <= 0:
        raise UsageError(f"--timeout must be > 0 seconds, not {args.timeout:g}")
    reached = reach([n.address for n in topo.nodes], args.timeout) if args.reach else None
    failed = False
    try:
        (model_line, total), rows = _node_rows(topo, reached)
    except ModelError as e:
        print(f"flowspec check: no sizes: the model or the drafter cannot be read on this machine: {e}",
              file=sys.stderr)
        model_line, total, rows = "", "", _layers_only_rows(topo, reached)
        failed = True
    count = len(topo.spares)  # outside the ring until a stage stays dead
    spares = f", {count} spare{'s' if count > 1 else ''}" if count else ""
    print(f"{path}: valid: cluster {topo.cluster!r}, {len(topo.stages)} stage(s), "
          f"{len(topo.stages) + 1} nodes in ring order{spares}")
    for line in [model_line] + table(rows) + [total]:
        if line:
            print(line)
    if reached is not None:
        down = [f"{n.name} ({n.host}:{n.port})" for n, why in zip(topo.nodes, reached) if why is not None]
        if down:
            print(f"reach: {len(topo.nodes) - len(down)} of {len(topo.nodes)} nodes answer; no answer from "
                  f"{', '.join(down)}")
            failed = True
        else:
            print(f"reach: all {len(topo.nodes)} nodes answer")
    return EXIT_RUNTIME if failed else 0


def add_check_command(sub: Any) -> None:
    c = sub.add_parser("check", help="validate a topology file: every problem at once, the layer split "
                       "and the memory per node; --reach: does each node answer", description=__doc__)
    c.add_argument("topology_file", nargs="?", metavar="TOPOLOGY", default=env_value(TOPOLOGY_ENV),
                   help=f"the YAML topology (default: {env_default(TOPOLOGY_ENV)})")
    c.add_argument("--topology", dest="topology_opt", default=None, metavar="FILE",
                   help="the same, as an option")
    c.add_argument("--reach", action="store_true",
                   help="also try a TCP connect to every node's address (host:port)")
    c.add_argument("--timeout", type=float, default=REACH_TIMEOUT_S, help="--reach: seconds per connect")
    c.set_defaults(func=cmd_check)
