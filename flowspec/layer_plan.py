"""How a topology's stages share the model's layers (``layers: auto`` and explicit ranges).

Explicit ranges must cover the layers exactly once in ring order; runs of ``auto`` stages
between them split what is left by declared ``speed``, within each node's ``memory_gb``.
Every problem is a TopologyError naming the file and the node.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Mapping, Sequence

from .errors import TopologyError

if TYPE_CHECKING:
    from .config import NodeSpec

log = logging.getLogger(__name__)

GIB = 1 << 30  # memory_gb counts GiB


def plan_layers(origin: str, stages: Sequence[NodeSpec], num_layers: int | None,
                 layer_bytes: int | None, extra: Mapping[str, float] | None = None,
                 extra_work: Mapping[str, float] | None = None) -> dict[str, tuple[int, int]]:
    """Check the stages' layers in ring order; with num_layers, split auto stages and return all ranges.

    Without num_layers only what the file alone decides is checked (order, overlaps, gaps
    between explicit ranges, room for auto stages) and an empty dict is returned. `extra`:
    weights a stage holds besides its layers, in layers (the lm_head on the last stage when
    it chooses the tokens), checked against its memory_gb; `extra_work`: the time that stage
    spends on them per segment, in layers (defaults to `extra`): an auto split gives it
    fewer layers.
    """
    extra = extra or {}
    extra_work = extra if extra_work is None else extra_work
    rule = (f"layers must cover 0-{num_layers - 1} exactly once in ring order" if num_layers is not None
            else "layers must cover every layer of the model exactly once, in ring order starting "
                 "at layer 0 on the first stage after the source")

    def err(node: NodeSpec | None, msg: str) -> TopologyError:
        where = f"nodes[{node.index}].layers" if node is not None else "nodes"
        return TopologyError(f"{origin}: {where}: {msg}; {rule}")

    explicit: list[NodeSpec] = []  # explicit stages seen so far
    runs: list[tuple[int, int, list[NodeSpec]]] = []  # (start, end, auto stages) to split
    pending: list[NodeSpec] = []  # auto stages since the last explicit one
    cursor = 0  # first layer not yet held
    for pos, n in enumerate(stages):
        if n.is_auto:
            pending.append(n)
            continue
        s, e = n.layers  # type: ignore[misc]
        text = range_text((s, e))
        if num_layers is not None and e > num_layers:
            raise err(n, f"layers {text} are out of range: the model has {num_layers} layers "
                      f"(0-{num_layers - 1})")
        if s < cursor:
            hit = next((m for m in explicit if m.layers[0] < e and s < m.layers[1]), None)  # type: ignore
            if hit is not None:
                raise err(n, f"layers {text} overlap {hit.label} which has {range_text(hit.layers)}")
            prev = explicit[-1]
            raise err(n, f"layers {text} come after {prev.label} which has {range_text(prev.layers)}: "
                      "a stage must start where the one before it in the ring ends")
        gap = s - cursor
        if not pending and gap > 0:
            later = next((m for m in stages[pos + 1:] if not m.is_auto
                          and m.layers[0] < s and cursor < m.layers[1]), None)  # type: ignore[index]
            if later is not None:
                raise err(n, f"layers {text} come before {later.label} which has "
                          f"{range_text(later.layers)} but follows it in the ring: stages hold "  # type: ignore
                          "consecutive layers in ring order")
            before = (f"{explicit[-1].label} ends at layer {cursor - 1}" if explicit
                      else "the first stage after the source must start at layer 0")
            raise err(n, f"no stage holds {layers_text((cursor, s))} ({before}, this "
                      f"node starts at {s})")
        if pending:
            if gap < len(pending):
                raise err(n, f"layers {text} leave {gap} layer(s) for the {len(pending)} auto stage(s) "
                          f"before it ({', '.join(m.name for m in pending)}), which need at least one each")
            runs.append((cursor, s, pending))
            pending = []
        explicit.append(n)
        cursor = e
    if num_layers is None:
        return {}
    if pending:
        gap = num_layers - cursor
        if gap < len(pending):
            if not explicit:
                raise err(None, f"{len(pending)} stages but the model has only {num_layers} layers; every "
                          "stage needs at least one")
            raise err(pending[-1], f"{gap} layer(s) remain after {explicit[-1].label} for the "
                      f"{len(pending)} auto stage(s) {', '.join(m.name for m in pending)}, which need at "
                      "least one each")
        runs.append((cursor, num_layers, pending))
    elif cursor < num_layers:
        last = explicit[-1]
        raise err(last, f"no stage holds {layers_text((cursor, num_layers))} ({last.label}, "
                  f"the last stage before the source, ends at layer {cursor - 1}; the model has "
                  f"{num_layers} layers)")

    out: dict[str, tuple[int, int]] = {}
    for n in explicit:
        if layer_bytes is not None:
            _check_memory(origin, n, n.layers[1] - n.layers[0], layer_bytes, extra.get(n.name, 0.0))  # type: ignore
        out[n.name] = n.layers  # type: ignore[assignment]
    for start, end, group in runs:
        at = start
        for m, c in zip(group, _split(origin, start, end, group, layer_bytes, extra, extra_work)):
            out[m.name] = (at, at + c)
            at += c
    out = {n.name: out[n.name] for n in stages}  # ring order
    log.debug("layers of %s: %s", origin, out)
    return out


def _capacity(origin: str, n: NodeSpec, layer_bytes: int | None, extra: float = 0.0) -> int | None:
    if layer_bytes is None or n.memory_gb is None:
        return None
    cap = int((n.memory_gb * GIB - extra * layer_bytes) // layer_bytes)
    if cap < 1:
        also = f" besides the lm_head ({extra * layer_bytes / (1 << 20):.0f} MiB)" if extra else ""
        raise TopologyError(f"{origin}: nodes[{n.index}].memory_gb: {n.memory_gb:g} GiB holds no layer of "
                            f"{layer_bytes / (1 << 20):.1f} MiB{also}; give it more memory_gb or remove the node")
    return cap


def _check_memory(origin: str, n: NodeSpec, count: int, layer_bytes: int, extra: float = 0.0) -> None:
    cap = _capacity(origin, n, layer_bytes, extra)
    if cap is not None and count > cap:
        also = " and the lm_head" if extra else ""
        raise TopologyError(
            f"{origin}: nodes[{n.index}].layers: layers {range_text(n.layers)}{also} need "  # type: ignore
            f"{(count + extra) * layer_bytes / GIB:.2f} GiB but memory_gb is {n.memory_gb:g} (room for {cap} "
            "layers); give this stage fewer layers or raise memory_gb"
        )


def _split(origin: str, start: int, end: int, group: list[NodeSpec], layer_bytes: int | None,
           extra: Mapping[str, float], extra_work: Mapping[str, float]) -> list[int]:
    """Layers per auto stage for [start, end): proportional to speed (counting the work a
    stage holds besides its layers), at least 1, within memory."""
    total = end - start
    caps = [_capacity(origin, n, layer_bytes, extra.get(n.name, 0.0)) for n in group]
    room = sum(c for c in caps if c is not None) if all(c is not None for c in caps) else None
    if room is not None and room < total:
        names = ", ".join(f"{n.label} ({n.memory_gb:g} GiB)" for n in group)
        raise TopologyError(
            f"{origin}: nodes[{group[0].index}].memory_gb: layers {range_text((start, end))} go to the "
            f"auto stage(s) {names}, whose memory holds only {room} of these {total} layers of "
            f"{layer_bytes / (1 << 20):.1f} MiB; raise memory_gb, add stages or give layers explicitly"
        )
    counts = [1] * len(group)
    for _ in range(total - len(group)):
        # the stage that would finish its share soonest with one more layer takes it; of two
        # that would finish it as soon, the later in the ring: the first stage takes a
        # request's segments as the source sends them, back to back, and queues form there
        # first (edge-5, 4-8 requests: 8/9/9/4 layers beat 9/9/8/4 and 9/8/8/5; README,
        # "Where the lm_head runs")
        best = min((i for i in range(len(group)) if caps[i] is None or counts[i] < caps[i]),  # type: ignore
                   key=lambda i: ((counts[i] + 1 + extra_work.get(group[i].name, 0.0)) / group[i].speed, -i))
        counts[best] += 1
    return counts


def range_text(r: tuple[int, int]) -> str:
    """Half-open (a, b) written the YAML way: "a-(b-1)", or "a" for one layer."""
    a, b = r
    return str(a) if b - a == 1 else f"{a}-{b - 1}"


def layers_text(r: tuple[int, int]) -> str:
    """"layer 5" or "layers 5-9"."""
    return f"layer{'' if r[1] - r[0] == 1 else 's'} {range_text(r)}"
