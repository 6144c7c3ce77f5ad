"""The validated topology: ring queries, secrets, layer resolution, overrides.

:class:`Topology` is what :meth:`Topology.load` returns: it holds the sections of
:mod:`flowspec.config.schema`, answers questions about the ring (source, stages,
successor, emulated links), reads the cluster and API keys, and splits ``auto`` stages
once the model's layer count is known.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ..errors import TopologyError
from ..layer_plan import plan_layers as _plan_layers, range_text as _range_text
from ..speculative.bounds import FieldError
from ..speculative.params import split_drafter
from .messages import _suggest
from .parse import _Parser
from .schema import (
    DEFAULT_TARGET, MIN_KEY_BYTES, ApiSpec, DecodingSpec, DrafterSpec, LinkSpec, ModelSpec,
    NodeSpec, SecuritySpec, TestbedSpec, TreeSpec,
)
from .yaml_load import _parse_yaml

log = logging.getLogger(__package__)  # "flowspec.config", as before the split into a package

# Work of the lm_head as a share of its size in decoder layers (it reads as many bytes, but
# one matrix product costs less than a layer's dozen operations). Measured for the default
# model in bfloat16, one thread (`tools/bench_engine.py`: `--stage 8 --stage-sizes 1,8,16`
# and `--head-sizes 1,8,16`): the lm_head takes 0.62 / 0.64 / 0.63 of an 8-layer stage's
# time at 1 / 8 / 16 rows; on edge-5 with 4 requests sharing the ring (the last stage
# chooses every token) 0.56 (27 ms of a 58 ms pass of 5 layers and the lm_head, 49 ms
# for 8 layers). An earlier estimate from busy shares with one request, 0.4, left the
# last stage the slowest of the ring whenever requests share it (README, "Where the
# lm_head runs").
LM_HEAD_WORK = 0.6

_KEY_HINT = "python -c 'import secrets; print(secrets.token_hex(32))'"


# ----------------------------------------------------------------------------- topology
@dataclass(frozen=True)
class Topology:
    """A validated topology file."""

    cluster: str  # cluster name; every node must agree (checked at handshake)
    model: ModelSpec  # what is served
    nodes: tuple[NodeSpec, ...]  # ring order, exactly one source, at least one stage
    api: ApiSpec = field(default_factory=ApiSpec)  # the source's HTTP API
    decoding: DecodingSpec = field(default_factory=DecodingSpec)  # generation defaults
    security: SecuritySpec = field(default_factory=SecuritySpec)  # keys, frames, timeouts
    testbed: TestbedSpec | None = None  # emulated links / CPU caps, None = real conditions
    origin: str = field(default="<dict>", compare=False)  # file it came from, for messages
    base_dir: str = field(default=".", compare=False)  # folder relative paths were resolved against

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Topology":
        """Read and validate a topology file."""
        origin = str(path)
        p = Path(path).expanduser()
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise TopologyError(
                f"{origin}: no such topology file (examples: topologies/local.yaml, "
                "topologies/edge-5.yaml, topologies/lan-example.yaml)"
            ) from None
        except IsADirectoryError:
            raise TopologyError(f"{origin}: is a folder; give a topology .yaml file") from None
        except UnicodeDecodeError as e:
            raise TopologyError(f"{origin}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except OSError as e:
            raise TopologyError(f"{origin}: cannot read ({e.strerror or e})") from None
        data = _parse_yaml(text, origin)
        topo = cls.from_dict(data, source=origin, base_dir=str(p.resolve().parent))
        log.debug("topology %s: cluster %s, %d nodes", origin, topo.cluster, len(topo.nodes))
        return topo

    @classmethod
    def from_dict(cls, d: Any, source: str = "<dict>", base_dir: str | os.PathLike[str] | None = None
                  ) -> "Topology":
        """Validate a parsed topology; relative paths are resolved against base_dir (default: cwd)."""
        return _Parser(source, os.path.abspath(base_dir if base_dir is not None else os.getcwd())).topology(d)

    def to_dict(self) -> dict[str, Any]:
        """The topology as plain data, in the YAML layout; ``from_dict`` reads it back unchanged."""
        nodes = []
        for n in self.nodes:
            nd: dict[str, Any] = {"name": n.name, "host": n.host, "port": n.port, "role": n.role}
            if n.is_spare:
                if n.memory_gb is not None:
                    nd["memory_gb"] = n.memory_gb
            elif not n.is_source:
                nd["layers"] = n.layers if isinstance(n.layers, str) else _range_text(n.layers)
                if n.memory_gb is not None:
                    nd["memory_gb"] = n.memory_gb
                nd["speed"] = n.speed
            nodes.append(nd)
        m = self.model
        dec = dataclasses.asdict(self.decoding)
        out: dict[str, Any] = {
            "cluster": self.cluster,
            "model": {"target": m.target, "drafter": str(m.drafter), "dtype": m.dtype,
                      "max_context": m.max_context, "num_layers": m.num_layers, "name": m.name,
                      "stage_weights": m.stage_weights},
            "nodes": nodes,
            "api": dict(dataclasses.asdict(self.api), cors_origins=list(self.api.cors_origins)),
            "decoding": dec,
            "security": dataclasses.asdict(self.security),
        }
        if self.testbed is not None:
            tb = self.testbed
            out["testbed"] = {
                "link": dataclasses.asdict(tb.link),
                "links": {f"{a}->{b}": dataclasses.asdict(v) for (a, b), v in tb.links.items()},
                "cpu_quota": tb.cpu_quota,
                "cpu_period_ms": tb.cpu_period_ms,
                "threads": tb.threads,
                "cpus": dict(tb.cpus),
            }
        return out

    def with_overrides(self, **kw: Any) -> "Topology":
        """A validated copy with ``model`` / ``decoding`` fields replaced.

        Keys are field names of ModelSpec or DecodingSpec (``temperature=0.7``,
        ``drafter="none"``), or ``tree_<field>`` for the tree (``tree_depth=4``). ``None``
        values are skipped, so optional command-line flags can be passed straight through.
        Relative paths in ``target`` / ``drafter`` are taken relative to the current folder.
        """
        model_fields = {f.name for f in dataclasses.fields(ModelSpec)}
        dec_fields = {f.name for f in dataclasses.fields(DecodingSpec)}
        tree_fields = {f.name for f in dataclasses.fields(TreeSpec)}
        allowed = sorted(model_fields | dec_fields | {f"tree_{t}" for t in tree_fields})
        m_kw: dict[str, Any] = {}
        d_kw: dict[str, Any] = {}
        t_kw: dict[str, Any] = {}
        for k, v in kw.items():
            if v is None:
                continue
            if k in model_fields:
                m_kw[k] = _abs_override(k, v)
            elif k in dec_fields:
                d_kw[k] = v
            elif k.startswith("tree_") and k[5:] in tree_fields:
                t_kw[k[5:]] = v
            else:
                raise TopologyError(f"{self.origin}: override {k!r}: unknown{_suggest(k, allowed)} "
                                    f"(allowed: {', '.join(allowed)})")
        # dataclasses.replace builds the copy; re-reading it through from_dict validates it
        tree = d_kw.pop("tree", self.decoding.tree)
        tree = dataclasses.replace(tree, **t_kw) if isinstance(tree, TreeSpec) else dict(tree, **t_kw)
        draft = dataclasses.replace(
            self, model=dataclasses.replace(self.model, **m_kw),
            decoding=dataclasses.replace(self.decoding, tree=tree, **d_kw),
        )
        data = draft.to_dict()
        if not isinstance(tree, TreeSpec):
            data["decoding"]["tree"] = tree
        checked = Topology.from_dict(data, source=f"{self.origin} (with overrides)", base_dir=self.base_dir)
        return dataclasses.replace(checked, origin=self.origin)

    # ------------------------------------------------------------------ ring queries
    @property
    def source(self) -> NodeSpec:
        """The source node."""
        return next(n for n in self.nodes if n.is_source)

    @property
    def stages(self) -> tuple[NodeSpec, ...]:
        """Stage nodes in ring order, starting right after the source."""
        i = self.source.index
        ring = self.nodes[i + 1:] + self.nodes[:i]
        return tuple(n for n in ring if n.role == "stage")

    @property
    def spares(self) -> tuple[NodeSpec, ...]:
        """Spare nodes: outside the ring until one takes a dead stage's place (runtime/failover.py)."""
        return tuple(n for n in self.nodes if n.is_spare)

    def node(self, name: str) -> NodeSpec:
        """The node called name."""
        for n in self.nodes:
            if n.name == name:
                return n
        names = [n.name for n in self.nodes]
        raise TopologyError(f"{self.origin}: no node named {name!r}{_suggest(name, names)}; "
                            f"nodes: {', '.join(names)}")

    def successor(self, name: str) -> NodeSpec:
        """The node that name sends to in the file's ring order (the next one in the list that
        is not a spare, wrapping around); a ring whose spare took a stage's place follows
        runtime/ring_plan.py instead."""
        ring, i = self._ring_position(name)
        return ring[(i + 1) % len(ring)]

    def predecessor(self, name: str) -> NodeSpec:
        """The node that sends to name (in the file's ring order)."""
        ring, i = self._ring_position(name)
        return ring[(i - 1) % len(ring)]

    def _ring_position(self, name: str) -> tuple[list[NodeSpec], int]:
        node = self.node(name)
        if node.is_spare:
            raise TopologyError(f"{self.origin}: node {name!r} is a spare: it has no place in the ring "
                                "until it takes a dead stage's")
        ring = [n for n in self.nodes if not n.is_spare]
        return ring, ring.index(node)

    def link(self, name: str) -> LinkSpec | None:
        """The emulated link from name to its successor; None without a testbed."""
        if self.testbed is None:
            return None
        key = (name, self.successor(name).name)
        return self.testbed.links.get(key, self.testbed.link)

    def cpu_quota(self, name: str) -> float | None:
        """The emulated CPU quota of a node (fraction of one core); None = uncapped."""
        self.node(name)
        if self.testbed is None:
            return None
        return self.testbed.cpus.get(name, self.testbed.cpu_quota)

    # ------------------------------------------------------------------ secrets
    def cluster_key(self, environ: Mapping[str, str] | None = None) -> bytes:
        """The shared key that authenticates the ring's links (key_file wins over key_env)."""
        env = os.environ if environ is None else environ
        sec = self.security
        if sec.key_file is not None:
            where = f"security.key_file ({sec.key_file})"
            try:
                raw = Path(sec.key_file).read_bytes()
            except OSError as e:
                raise TopologyError(
                    f"{self.origin}: security.key_file: cannot read {sec.key_file} "
                    f"({e.strerror or e}); create it on every node with `{_KEY_HINT} > {sec.key_file}` "
                    f"and `chmod 600 {sec.key_file}`, or remove key_file to use ${sec.key_env}"
                ) from None
            _warn_if_readable(sec.key_file)
            key = raw.strip()
            path = "security.key_file"
        else:
            value = env.get(sec.key_env)
            if not value or not value.strip():
                raise TopologyError(
                    f"{self.origin}: security.key_env: no cluster key: the environment variable "
                    f"{sec.key_env} is {'empty' if value is not None else 'not set'}; set the same key "
                    f"on every node, e.g. `export {sec.key_env}=$({_KEY_HINT})`, or point "
                    "security.key_file at a file holding it"
                )
            where = f"${sec.key_env}"
            key = value.strip().encode("utf-8")
            path = "security.key_env"
        if len(key) < MIN_KEY_BYTES:
            raise TopologyError(
                f"{self.origin}: {path}: the cluster key in {where} is {len(key)} bytes; at least "
                f"{MIN_KEY_BYTES} are needed (make one with `{_KEY_HINT}`)"
            )
        return key

    def api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The HTTP API's Bearer key (api_key_file wins over api_key_env); None when none is configured."""
        env = os.environ if environ is None else environ
        if self.api.api_key_file is not None:
            try:
                key = Path(self.api.api_key_file).read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise TopologyError(f"{self.origin}: api.api_key_file: cannot read "
                                    f"{self.api.api_key_file} ({e})") from None
            if not key:
                raise TopologyError(f"{self.origin}: api.api_key_file: {self.api.api_key_file} is empty; "
                                    "put the Bearer key in it or remove api_key_file")
            return key
        if self.api.api_key_env is not None:
            key = (env.get(self.api.api_key_env) or "").strip()
            if not key:
                raise TopologyError(f"{self.origin}: api.api_key_env: the environment variable "
                                    f"{self.api.api_key_env} is not set; export it on the source node "
                                    "or remove api_key_env to serve without a key")
            return key
        return None

    # ------------------------------------------------------------------ layers
    def resolve_layers(self, num_layers: int, layer_bytes: int | None = None,
                       lm_head_layers: float = 0.0, lm_head_work: float | None = None
                       ) -> dict[str, tuple[int, int]]:
        """Half-open layer range of every stage, in ring order, with ``auto`` stages split.

        ``auto`` stages between two explicit ones (or the model's ends) share the layers left
        there in proportion to their speed, each getting at least one and, when layer_bytes
        (bytes of one decoder layer) is given, no more than its memory_gb holds.
        lm_head_layers: the lm_head's size in decoder layers; with ``decoding.verify:
        last_stage`` (or ``auto``) the last stage holds it: its memory must hold that many layers more,
        and an auto split charges it LM_HEAD_WORK of that in work. lm_head_work: the lm_head's
        work in decoder layers when it differs from its size in them (int8 layers are smaller,
        not faster); default lm_head_layers.
        """
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise TopologyError(f"{self.origin}: the model's layer count must be an integer >= 1, "
                                f"not {num_layers!r}")
        if layer_bytes is not None and (isinstance(layer_bytes, bool) or not isinstance(layer_bytes, int)
                                        or layer_bytes < 1):
            raise TopologyError(f"{self.origin}: layer_bytes must be an integer >= 1 or None, "
                                f"not {layer_bytes!r}")
        declared = self.model.num_layers
        if declared is not None and declared != num_layers:
            raise TopologyError(f"{self.origin}: model.num_layers: {declared}, but the model has "
                                f"{num_layers} layers; fix model.num_layers or remove it")
        last = self.stages[-1].name
        extra = {last: lm_head_layers} if self.decoding.lm_head_at_last_stage else {}
        work = {k: (v if lm_head_work is None else lm_head_work) * LM_HEAD_WORK for k, v in extra.items()}
        return _plan_layers(self.origin, self.stages, num_layers, layer_bytes, extra, work)


# ----------------------------------------------------------------------------- helpers
def _abs_override(key: str, v: Any) -> Any:
    """Make a command-line target / drafter path absolute (relative to the current folder)."""
    if key == "target" and isinstance(v, str) and v != DEFAULT_TARGET:
        return os.path.abspath(os.path.expanduser(v))
    if key == "drafter" and isinstance(v, str):
        try:
            kind, path = split_drafter(v)
        except FieldError:
            return v  # not a drafter: the parser says why, at model.drafter
        return DrafterSpec(kind, None if path is None else os.path.abspath(os.path.expanduser(path)))
    return v


def _warn_if_readable(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("cluster key file %s is readable by other users; chmod 600 it", path)
