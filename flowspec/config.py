"""The topology file: which devices form the ring, what they run and how they talk.

A topology is a YAML file (see ``topologies/*.yaml``, which double as documentation) read
into frozen dataclasses by :meth:`Topology.load`. Everything is validated on load; every
problem raises :class:`~flowspec.errors.TopologyError` whose message names the file, the
field path (``nodes[2].layers``) and what is allowed, e.g.::

    topologies/x.yaml: nodes[2].layers: layers 8-12 overlap nodes[1] (stage1) which has 0-9;
    layers must cover 0-29 exactly once in ring order

Layer ranges are written inclusive in YAML (``0-9``) and held half-open in Python
(``(0, 10)``). Whether the stages cover every layer of the model can only be checked once
the layer count is known: from ``model.num_layers`` at load time, or later through
:meth:`Topology.resolve_layers`, which also splits ``auto`` stages.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import math
import os
import re
import socket
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from .errors import TopologyError
from .layer_plan import plan_layers as _plan_layers, range_text as _range_text

log = logging.getLogger(__name__)

ROLES = ("source", "stage")
DTYPES = ("bfloat16", "float32")
STRATEGIES = ("autoregressive", "chunked", "pipedec", "flowspec")
DRAFTER_KINDS = ("none", "lookup", "eagle", "model")
DEFAULT_TARGET = "default"  # SmolLM2-135M-Instruct, see flowspec.model.loader
DEFAULT_KEY_ENV = "FLOWSPEC_CLUSTER_KEY"
MIN_KEY_BYTES = 16
MAX_CPU_QUOTA = 16.0
CPU_PERIOD_MS_RANGE = (1.0, 1000.0)  # the kernel's bounds of a CFS period

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_CLUSTER_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_HOST_LABEL_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_LAYERS_RE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
_KEY_HINT = "python -c 'import secrets; print(secrets.token_hex(32))'"

_TOP_KEYS = ("cluster", "model", "nodes", "api", "decoding", "security", "testbed")
_MODEL_KEYS = ("target", "drafter", "dtype", "max_context", "num_layers")
_NODE_KEYS = ("name", "host", "port", "role", "layers", "memory_gb", "speed")
_API_KEYS = ("host", "port", "api_key_env", "api_key_file", "queue_size", "allow_unauthenticated")
_DECODING_KEYS = ("strategy", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "tree",
                  "prefill_chunk", "max_active", "resume_window_s")
_TREE_KEYS = ("depth", "top_k", "total", "segment", "expand", "in_flight")
_SECURITY_KEYS = ("key_env", "key_file", "encrypt", "max_frame_mb", "read_timeout_s", "heartbeat_s", "dead_after_s")
_TESTBED_KEYS = ("link", "links", "cpu_quota", "cpu_period_ms", "threads", "cpus")
_LINK_KEYS = ("latency_ms", "jitter_ms", "bandwidth_mbit", "stall_prob", "stall_ms")


# ----------------------------------------------------------------------------- sections
@dataclass(frozen=True)
class DrafterSpec:
    """Where draft tokens come from; written ``kind`` or ``kind:PATH`` in YAML."""

    kind: str  # "none" | "lookup" (prompt n-gram lookup) | "eagle" (feature head) | "model" (small LM)
    path: str | None = None  # absolute path for eagle:PATH / model:PATH; None = bundled head / no file

    def __str__(self) -> str:
        return self.kind if self.path is None else f"{self.kind}:{self.path}"


@dataclass(frozen=True)
class ModelSpec:
    """The model every node serves a part of."""

    target: str  # "default", or an absolute model folder / .gguf path
    drafter: DrafterSpec  # the source's drafter
    dtype: str  # "bfloat16" | "float32"
    max_context: int  # KV-cache slots per stage (>= 64)
    num_layers: int | None = None  # decoder layers, when known without reading the model


@dataclass(frozen=True)
class NodeSpec:
    """One device of the ring."""

    name: str  # unique, [A-Za-z0-9_-]+
    host: str  # hostname or IP the other nodes connect to
    port: int  # 1..65535
    role: str  # "source" (drafter, sampling, HTTP API) | "stage" (holds decoder layers)
    layers: tuple[int, int] | str | None = None  # stages: half-open (start, end) or "auto"; source: None
    memory_gb: float | None = None  # stages: GiB available for weights when splitting `auto`; None = unlimited
    speed: float = 1.0  # stages: relative compute speed when splitting `auto` (> 0)
    index: int = field(default=0, compare=False)  # position in the file's node list (for messages)

    @property
    def is_source(self) -> bool:
        return self.role == "source"

    @property
    def is_auto(self) -> bool:
        return self.layers == "auto"

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def label(self) -> str:
        """``nodes[2] (stage2)``: how messages name the node."""
        return f"nodes[{self.index}] ({self.name})"


@dataclass(frozen=True)
class ApiSpec:
    """The HTTP API served by the source."""

    host: str = "127.0.0.1"  # address to bind
    port: int = 8000  # 1..65535
    api_key_env: str | None = None  # env var holding the Bearer key, or None
    api_key_file: str | None = None  # absolute path of a file holding the Bearer key, or None
    queue_size: int = 16  # waiting requests before answering 429 (>= 1)
    allow_unauthenticated: bool = False  # serve a non-loopback host without a key (refused otherwise)


@dataclass(frozen=True)
class TreeSpec:
    """Shape of the speculative token tree."""

    depth: int = 5  # levels drafted per expansion, 1..32
    top_k: int = 8  # children kept per node, 1..64
    total: int = 64  # nodes kept in the tree (>= 1)
    segment: int = 16  # nodes per segment sent into the ring, 1..512
    expand: int = 32  # nodes added per dynamic expansion (>= 1)
    in_flight: int | str = "auto"  # segments in flight: int >= 1 or "auto" (= number of stages)


@dataclass(frozen=True)
class DecodingSpec:
    """How tokens are generated (defaults for requests that do not say otherwise)."""

    strategy: str = "flowspec"  # autoregressive | chunked | pipedec | flowspec
    max_new_tokens: int = 128  # >= 1
    temperature: float = 0.0  # >= 0; 0 = greedy
    top_p: float = 1.0  # in (0, 1]
    top_k: int = 0  # >= 0; 0 = off
    seed: int | None = None  # sampling seed, None = random
    tree: TreeSpec = field(default_factory=TreeSpec)  # speculative tree shape
    prefill_chunk: int = 256  # prompt tokens per prefill segment (>= 1)
    max_active: int = 4  # requests decoding on the ring at once, 1..64 (every stage holds a KV cache for each)
    resume_window_s: float = 60.0  # a broken ring holds its requests this long, then fails them (0: at once)


@dataclass(frozen=True)
class SecuritySpec:
    """Authentication and liveness of the ring's links."""

    key_env: str = DEFAULT_KEY_ENV  # env var holding the cluster key
    key_file: str | None = None  # absolute path of a file holding the key; wins over key_env
    encrypt: bool = True  # seal every frame with ChaCha20-Poly1305; False: authenticate frames only
    max_frame_mb: float = 64.0  # largest accepted frame, MiB (> 0)
    read_timeout_s: float = 30.0  # a peer silent for longer is dead (> heartbeat_s)
    heartbeat_s: float = 1.0  # heartbeat interval (> 0)
    dead_after_s: float = 5.0  # no heartbeat for this long = dead (> heartbeat_s)

    @property
    def max_frame_bytes(self) -> int:
        return int(self.max_frame_mb * (1 << 20))


@dataclass(frozen=True)
class LinkSpec:
    """An emulated network link from one node to the next."""

    latency_ms: float = 2.0  # one-way delay (>= 0)
    jitter_ms: float = 0.0  # random extra delay, up to this much (>= 0)
    bandwidth_mbit: float | None = 100.0  # Mbit/s (> 0), None = unlimited
    stall_prob: float = 0.0  # probability in [0, 1) that a chunk stalls
    stall_ms: float = 0.0  # duration of a stall (>= 0)


@dataclass(frozen=True)
class TestbedSpec:
    """Emulated edge conditions: slow links and CPU-capped nodes."""

    __test__ = False  # not a pytest test class, despite the name

    link: LinkSpec = field(default_factory=LinkSpec)  # default for every link i -> i+1
    links: dict[tuple[str, str], LinkSpec] = field(default_factory=dict)  # (from, to) -> full override
    cpu_quota: float | None = None  # fraction of one core per node, (0, 16], None = uncapped
    threads: int = 1  # compute threads per node (>= 1)
    cpus: dict[str, float | None] = field(default_factory=dict)  # node name -> cpu_quota override
    # CFS period of the CPU caps in ms, [1, 1000]; None = the testbed's default (4 ms, see
    # flowspec/testbed/cgroups.py: short, so that a short burst of work is slowed too)
    cpu_period_ms: float | None = None


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
            if not n.is_source:
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
                      "max_context": m.max_context, "num_layers": m.num_layers},
            "nodes": nodes,
            "api": dataclasses.asdict(self.api),
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
        return tuple(n for n in ring if not n.is_source)

    @property
    def in_flight(self) -> int:
        """Segments in flight: ``decoding.tree.in_flight`` with "auto" resolved to the stage count."""
        v = self.decoding.tree.in_flight
        return len(self.stages) if v == "auto" else int(v)

    def node(self, name: str) -> NodeSpec:
        """The node called name."""
        for n in self.nodes:
            if n.name == name:
                return n
        names = [n.name for n in self.nodes]
        raise TopologyError(f"{self.origin}: no node named {name!r}{_suggest(name, names)}; "
                            f"nodes: {', '.join(names)}")

    def successor(self, name: str) -> NodeSpec:
        """The node that name sends to (the next one in the list, wrapping around)."""
        i = self.node(name).index
        return self.nodes[(i + 1) % len(self.nodes)]

    def predecessor(self, name: str) -> NodeSpec:
        """The node that sends to name."""
        i = self.node(name).index
        return self.nodes[(i - 1) % len(self.nodes)]

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
    def resolve_layers(self, num_layers: int, layer_bytes: int | None = None) -> dict[str, tuple[int, int]]:
        """Half-open layer range of every stage, in ring order, with ``auto`` stages split.

        ``auto`` stages between two explicit ones (or the model's ends) share the layers left
        there in proportion to their speed, each getting at least one and, when layer_bytes
        (bytes of one decoder layer) is given, no more than its memory_gb holds.
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
        return _plan_layers(self.origin, self.stages, num_layers, layer_bytes)


# ----------------------------------------------------------------------------- parsing
class _Parser:
    """Turns plain data into a Topology; every method raises TopologyError with a field path."""

    def __init__(self, origin: str, base_dir: str) -> None:
        self.origin = origin
        self.base_dir = base_dir

    # ------------------------------------------------------------------ helpers
    def error(self, path: str, msg: str) -> TopologyError:
        return TopologyError(f"{self.origin}: {path}: {msg}" if path else f"{self.origin}: {msg}")

    def mapping(self, v: Any, path: str, allowed: Sequence[str], required: Sequence[str] = (),
                what: str = "") -> dict[str, Any]:
        if not isinstance(v, dict):
            raise self.error(path or "top level", f"must be a mapping with keys {', '.join(allowed)}"
                             f", not {_kind(v)}")
        for k in v:
            if k not in allowed:
                key = str(k)
                raise self.error(_join(path, key), f"unknown key{_suggest(key, allowed)} "
                                 f"(allowed{what}: {', '.join(allowed)})")
        for k in required:
            if k not in v:
                raise self.error(_join(path, k), f"missing; required{what}: {', '.join(required)}")
        return v

    def number(self, v: Any, path: str, *, integer: bool = False, lo: float | None = None,
               hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
               nullable: str | None = None) -> Any:
        """A number within bounds; nullable, when given, says what null means (and allows it)."""
        kind = "an integer" if integer else "a number"
        if lo is not None and hi is not None:
            if integer:
                allowed = f"{kind} from {lo:g} to {hi:g}"
            else:
                allowed = f"{kind} in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
        elif lo is not None:
            allowed = f"{kind} {'>' if lo_open else '>='} {lo:g}"
        else:
            allowed = kind
        if nullable:
            allowed += f", or null ({nullable})"
        if v is None:
            if nullable:
                return None
            raise self.error(path, f"must be {allowed}, not null")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
            raise self.error(path, f"must be {allowed}, not {v!r}")
        if not math.isfinite(v):
            raise self.error(path, f"must be {allowed}, not {v!r}")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise self.error(path, f"must be {allowed}, not {v!r}")
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise self.error(path, f"must be {allowed}, not {v!r}")
        return int(v) if integer else float(v)

    def string(self, v: Any, path: str, allowed: str, pattern: re.Pattern[str] | None = None) -> str:
        if not isinstance(v, str) or not v.strip() or (pattern is not None and not pattern.match(v)):
            raise self.error(path, f"must be {allowed}, not {v!r}")
        return v.strip()

    def flag(self, v: Any, path: str) -> bool:
        if not isinstance(v, bool):
            raise self.error(path, f"must be true or false, not {v!r}")
        return v

    def choice(self, v: Any, path: str, choices: Sequence[str], what: str) -> str:
        if not isinstance(v, str) or v not in choices:
            hint = _suggest(v, choices) if isinstance(v, str) else ""
            raise self.error(path, f"unknown {what} {v!r}{hint}; allowed: {', '.join(choices)}")
        return v

    def env_name(self, v: Any, path: str, nullable: bool) -> str | None:
        if v is None and nullable:
            return None
        return self.string(v, path, "the name of an environment variable ([A-Za-z_][A-Za-z0-9_]*)"
                           + (", or null" if nullable else ""), _ENV_RE)

    def file_path(self, v: Any, path: str) -> str | None:
        if v is None:
            return None
        s = self.string(v, path, f"a file path (relative to {self.base_dir}), or null")
        return self.resolve(s)

    def resolve(self, p: str) -> str:
        q = Path(p).expanduser()
        if not q.is_absolute():
            q = Path(self.base_dir) / q
        return os.path.normpath(str(q))

    def host(self, v: Any, path: str, wildcard_ok: bool) -> str:
        allowed = "a hostname or an IP address"
        if not isinstance(v, str):
            raise self.error(path, f"must be {allowed}, not {v!r}")
        h = v.strip()
        try:
            ip = ipaddress.ip_address(h)
        except ValueError:
            ip = None
        if ip is not None:
            if ip.is_unspecified and not wildcard_ok:
                raise self.error(path, f"{h} is a bind-all address, not one the other nodes can connect "
                                 "to; give this node's reachable hostname or IP")
            return h
        labels = h.rstrip(".").split(".")
        if not h or len(h) > 253 or not all(_HOST_LABEL_RE.match(lb) for lb in labels):
            raise self.error(path, f"must be {allowed}, not {v!r}")
        return h

    # ------------------------------------------------------------------ sections
    def topology(self, d: Any) -> Topology:
        if d is None:
            raise self.error("", "the file is empty; a topology needs cluster, model and nodes")
        d = self.mapping(d, "", _TOP_KEYS, ("cluster", "model", "nodes"))
        cluster = self.string(d["cluster"], "cluster", "a name of letters, digits, '.', '_' or '-'",
                              _CLUSTER_RE)
        model = self.model(d["model"])
        nodes = self.nodes(d["nodes"])
        api = self.api(d.get("api"), nodes)
        decoding = self.decoding(d.get("decoding"))
        security = self.security(d.get("security"))
        testbed = self.testbed(d.get("testbed"), nodes) if d.get("testbed") is not None else None
        topo = Topology(cluster=cluster, model=model, nodes=nodes, api=api, decoding=decoding,
                        security=security, testbed=testbed, origin=self.origin, base_dir=self.base_dir)
        # check the layer ranges as far as possible without the model
        _plan_layers(self.origin, topo.stages, model.num_layers, None)
        return topo

    def model(self, v: Any) -> ModelSpec:
        d = self.mapping(v, "model", _MODEL_KEYS)
        target = d.get("target", DEFAULT_TARGET)
        target = self.string(target, "model.target",
                             f"{DEFAULT_TARGET!r}, a model folder or a .gguf file")
        if target != DEFAULT_TARGET:
            target = self.resolve(target)
        drafter = self.drafter(d.get("drafter", "lookup"))
        dtype = self.choice(d.get("dtype", "bfloat16"), "model.dtype", DTYPES, "dtype")
        max_context = self.number(d.get("max_context", 2048), "model.max_context", integer=True, lo=64)
        num_layers = self.number(d.get("num_layers"), "model.num_layers", integer=True, lo=1,
                                 nullable="read from the model")
        return ModelSpec(target=target, drafter=drafter, dtype=dtype, max_context=max_context,
                         num_layers=num_layers)

    def drafter(self, v: Any) -> DrafterSpec:
        allowed = "none, lookup, eagle, eagle:PATH, model:PATH"
        if not isinstance(v, str) or not v.strip():
            raise self.error("model.drafter", f"must be one of {allowed}, not {v!r}")
        kind, sep, rest = v.strip().partition(":")
        kind, rest = kind.strip(), rest.strip()
        if kind not in DRAFTER_KINDS:
            raise self.error("model.drafter", f"unknown drafter {v!r}{_suggest(kind, DRAFTER_KINDS)}; "
                             f"allowed: {allowed}")
        if kind in ("none", "lookup"):
            if sep:
                raise self.error("model.drafter", f"{kind!r} takes no path; allowed: {allowed}")
            return DrafterSpec(kind)
        if not rest:
            if kind == "eagle" and not sep:
                return DrafterSpec("eagle")  # the bundled head
            raise self.error("model.drafter", f"{v!r} needs a path after ':'; allowed: {allowed}")
        return DrafterSpec(kind, self.resolve(rest))

    def nodes(self, v: Any) -> tuple[NodeSpec, ...]:
        if not isinstance(v, list) or not v:
            raise self.error("nodes", "must be a list of nodes in ring order (one source, at least one "
                             f"stage), not {_kind(v)}")
        out: list[NodeSpec] = []
        names: dict[str, int] = {}
        addresses: dict[tuple[str, int], int] = {}
        source_at: int | None = None
        for i, item in enumerate(v):
            p = f"nodes[{i}]"
            d = self.mapping(item, p, _NODE_KEYS, ("name", "host", "port", "role"), " in a node")
            name = self.string(d["name"], f"{p}.name", "a name of letters, digits, '_' or '-'", _NAME_RE)
            if name in names:
                j = names[name]
                raise self.error(f"{p}.name", f"{name!r} is already the name of nodes[{j}]; "
                                 "node names must be unique")
            names[name] = i
            host = self.host(d["host"], f"{p}.host", wildcard_ok=False)
            port = self.number(d["port"], f"{p}.port", integer=True, lo=1, hi=65535)
            addr = (_host_key(host), port)
            if addr in addresses:
                j = addresses[addr]
                raise self.error(f"{p}.port", f"{host}:{port} is already used by nodes[{j}] "
                                 f"({out[j].name}); each node needs its own (host, port)")
            addresses[addr] = i
            role = self.choice(d["role"], f"{p}.role", ROLES, "role")
            if role == "source":
                if source_at is not None:
                    raise self.error(f"{p}.role", f"a second source: nodes[{source_at}] "
                                     f"({out[source_at].name}) is already the source; exactly one node "
                                     "has role: source, every other one role: stage")
                source_at = i
                for k in ("layers", "memory_gb", "speed"):
                    if k in d:
                        raise self.error(f"{p}.{k}", "only stage nodes hold layers; the source runs "
                                         "the embedding, drafter and lm_head (remove this key)")
                out.append(NodeSpec(name=name, host=host, port=port, role=role, index=i))
                continue
            layers = self.layers(d.get("layers", "auto"), f"{p}.layers")
            memory = self.number(d.get("memory_gb"), f"{p}.memory_gb", lo=0, lo_open=True,
                                 nullable="unlimited")
            speed = self.number(d.get("speed", 1.0), f"{p}.speed", lo=0, lo_open=True)
            out.append(NodeSpec(name=name, host=host, port=port, role=role, layers=layers,
                                memory_gb=memory, speed=speed, index=i))
        if source_at is None:
            raise self.error("nodes", "no node has role: source; exactly one node must be the source "
                             "(it runs the drafter and the HTTP API)")
        if len(out) < 2:
            raise self.error("nodes", "no stage node; at least one node needs role: stage (stages "
                             "hold the model's layers)")
        return tuple(out)

    def layers(self, v: Any, path: str) -> tuple[int, int] | str:
        allowed = 'an inclusive range "A-B", a single layer A, or "auto"'
        if isinstance(v, bool):
            raise self.error(path, f"must be {allowed}, not {v!r}")
        if isinstance(v, int):
            if v < 0:
                raise self.error(path, f"must be {allowed} (layers count from 0), not {v!r}")
            return (v, v + 1)
        if isinstance(v, str):
            if v.strip() == "auto":
                return "auto"
            m = _LAYERS_RE.match(v)
            if m:
                a = int(m.group(1))
                b = int(m.group(2)) if m.group(2) is not None else a
                if b < a:
                    raise self.error(path, f"{v!r} ends before it starts; write the lower layer first, "
                                     f"e.g. \"{b}-{a}\"")
                return (a, b + 1)
        raise self.error(path, f"must be {allowed}, not {v!r}")

    def api(self, v: Any, nodes: tuple[NodeSpec, ...]) -> ApiSpec:
        d = self.mapping({} if v is None else v, "api", _API_KEYS)
        dflt = ApiSpec()
        host = self.host(d.get("host", dflt.host), "api.host", wildcard_ok=True)
        port = self.number(d.get("port", dflt.port), "api.port", integer=True, lo=1, hi=65535)
        src = next(n for n in nodes if n.is_source)
        for n in nodes:
            same_host = _host_key(n.host) == _host_key(host) or (n is src and _is_wildcard(host))
            if same_host and n.port == port:
                raise self.error("api.port", f"{port} is already the ring port of {n.label}; "
                                 "the HTTP API needs a port of its own")
        key_env = self.env_name(d.get("api_key_env"), "api.api_key_env", nullable=True)
        key_file = self.file_path(d.get("api_key_file"), "api.api_key_file")
        open_ok = self.flag(d.get("allow_unauthenticated", dflt.allow_unauthenticated),
                            "api.allow_unauthenticated")
        if key_env is None and key_file is None and not open_ok and not _is_loopback(host):
            raise self.error("api.host", f"{host} serves the HTTP API beyond this machine without a key: "
                             "anyone on the network could use the ring; set api.api_key_env (or "
                             "api.api_key_file) to a Bearer key, bind 127.0.0.1, or set "
                             "api.allow_unauthenticated: true if the network is yours alone")
        return ApiSpec(
            host=host, port=port, api_key_env=key_env, api_key_file=key_file,
            queue_size=self.number(d.get("queue_size", dflt.queue_size), "api.queue_size",
                                   integer=True, lo=1),
            allow_unauthenticated=open_ok,
        )

    def decoding(self, v: Any) -> DecodingSpec:
        d = self.mapping({} if v is None else v, "decoding", _DECODING_KEYS)
        dflt = DecodingSpec()
        return DecodingSpec(
            strategy=self.choice(d.get("strategy", dflt.strategy), "decoding.strategy", STRATEGIES,
                                 "strategy"),
            max_new_tokens=self.number(d.get("max_new_tokens", dflt.max_new_tokens),
                                       "decoding.max_new_tokens", integer=True, lo=1),
            temperature=self.number(d.get("temperature", dflt.temperature), "decoding.temperature",
                                    lo=0),
            top_p=self.number(d.get("top_p", dflt.top_p), "decoding.top_p", lo=0, hi=1, lo_open=True),
            top_k=self.number(d.get("top_k", dflt.top_k), "decoding.top_k", integer=True, lo=0),
            seed=self.number(d.get("seed"), "decoding.seed", integer=True, nullable="random"),
            tree=self.tree(d.get("tree")),
            prefill_chunk=self.number(d.get("prefill_chunk", dflt.prefill_chunk),
                                      "decoding.prefill_chunk", integer=True, lo=1),
            max_active=self.number(d.get("max_active", dflt.max_active), "decoding.max_active",
                                   integer=True, lo=1, hi=64),
            resume_window_s=self.number(d.get("resume_window_s", dflt.resume_window_s),
                                        "decoding.resume_window_s", lo=0, hi=86400),
        )

    def tree(self, v: Any) -> TreeSpec:
        d = self.mapping({} if v is None else v, "decoding.tree", _TREE_KEYS)
        dflt = TreeSpec()
        p = "decoding.tree"
        in_flight = d.get("in_flight", dflt.in_flight)
        if in_flight != "auto":
            if isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 1:
                raise self.error(f"{p}.in_flight", "must be an integer >= 1 or \"auto\" (= number of "
                                 f"stages), not {in_flight!r}")
        return TreeSpec(
            depth=self.number(d.get("depth", dflt.depth), f"{p}.depth", integer=True, lo=1, hi=32),
            top_k=self.number(d.get("top_k", dflt.top_k), f"{p}.top_k", integer=True, lo=1, hi=64),
            total=self.number(d.get("total", dflt.total), f"{p}.total", integer=True, lo=1),
            segment=self.number(d.get("segment", dflt.segment), f"{p}.segment", integer=True, lo=1,
                                hi=512),
            expand=self.number(d.get("expand", dflt.expand), f"{p}.expand", integer=True, lo=1),
            in_flight=in_flight,
        )

    def security(self, v: Any) -> SecuritySpec:
        d = self.mapping({} if v is None else v, "security", _SECURITY_KEYS)
        dflt = SecuritySpec()
        p = "security"
        hb = self.number(d.get("heartbeat_s", dflt.heartbeat_s), f"{p}.heartbeat_s", lo=0, lo_open=True)
        dead = self.number(d.get("dead_after_s", dflt.dead_after_s), f"{p}.dead_after_s", lo=0,
                           lo_open=True)
        if dead <= hb:
            raise self.error(f"{p}.dead_after_s", f"{dead:g} s must be greater than heartbeat_s "
                             f"({hb:g} s), or a live peer is declared dead between two heartbeats")
        read_to = self.number(d.get("read_timeout_s", dflt.read_timeout_s), f"{p}.read_timeout_s",
                              lo=0, lo_open=True)
        if read_to <= hb:
            raise self.error(f"{p}.read_timeout_s", f"{read_to:g} s must be greater than heartbeat_s "
                             f"({hb:g} s), or an idle but live peer times out")
        key_env = self.string(d.get("key_env", dflt.key_env), f"{p}.key_env",
                              "the name of an environment variable ([A-Za-z_][A-Za-z0-9_]*)", _ENV_RE)
        return SecuritySpec(
            key_env=key_env,
            key_file=self.file_path(d.get("key_file"), f"{p}.key_file"),
            encrypt=self.flag(d.get("encrypt", dflt.encrypt), f"{p}.encrypt"),
            max_frame_mb=self.number(d.get("max_frame_mb", dflt.max_frame_mb), f"{p}.max_frame_mb",
                                     lo=0, lo_open=True),
            read_timeout_s=read_to,
            heartbeat_s=hb,
            dead_after_s=dead,
        )

    def link(self, v: Any, path: str, base: LinkSpec) -> LinkSpec:
        d = self.mapping(v, path, _LINK_KEYS, (), " in a link")
        return LinkSpec(
            latency_ms=self.number(d.get("latency_ms", base.latency_ms), f"{path}.latency_ms", lo=0),
            jitter_ms=self.number(d.get("jitter_ms", base.jitter_ms), f"{path}.jitter_ms", lo=0),
            bandwidth_mbit=self.number(d.get("bandwidth_mbit", base.bandwidth_mbit),
                                       f"{path}.bandwidth_mbit", lo=0, lo_open=True, nullable="unlimited"),
            stall_prob=self.number(d.get("stall_prob", base.stall_prob), f"{path}.stall_prob", lo=0, hi=1,
                                   hi_open=True),
            stall_ms=self.number(d.get("stall_ms", base.stall_ms), f"{path}.stall_ms", lo=0),
        )

    def testbed(self, v: Any, nodes: tuple[NodeSpec, ...]) -> TestbedSpec:
        d = self.mapping(v, "testbed", _TESTBED_KEYS)
        raw_link = d.get("link")
        link = self.link({} if raw_link is None else raw_link, "testbed.link", LinkSpec())
        names = [n.name for n in nodes]
        edges = [(n.name, nodes[(n.index + 1) % len(nodes)].name) for n in nodes]
        edge_text = ", ".join(f"{a}->{b}" for a, b in edges)
        links: dict[tuple[str, str], LinkSpec] = {}
        raw_links = {} if d.get("links") is None else d["links"]
        if not isinstance(raw_links, dict):
            raise self.error("testbed.links", f"must be a mapping \"A->B\": link, not {_kind(raw_links)}")
        for k, lv in raw_links.items():
            p = f"testbed.links[{str(k)!r}]"
            a, arrow, b = str(k).partition("->")
            a, b = a.strip(), b.strip()
            if not arrow or not a or not b:
                raise self.error(p, f"keys are written \"A->B\" with node names; the ring edges are "
                                 f"{edge_text}")
            for end in (a, b):
                if end not in names:
                    raise self.error(p, f"no node named {end!r}{_suggest(end, names)}; the ring edges "
                                     f"are {edge_text}")
            if (a, b) not in edges:
                raise self.error(p, f"{a}->{b} is not a ring edge (each node sends only to the next "
                                 f"one); the ring edges are {edge_text}")
            links[(a, b)] = self.link(lv if lv is not None else {}, p, link)
        cpus: dict[str, float | None] = {}
        raw_cpus = {} if d.get("cpus") is None else d["cpus"]
        if not isinstance(raw_cpus, dict):
            raise self.error("testbed.cpus", f"must be a mapping node name: cpu_quota, not {_kind(raw_cpus)}")
        for k, cv in raw_cpus.items():
            p = f"testbed.cpus.{k}"
            if k not in names:
                raise self.error(p, f"no node named {str(k)!r}{_suggest(str(k), names)}; "
                                 f"nodes: {', '.join(names)}")
            cpus[k] = self.number(cv, p, lo=0, hi=MAX_CPU_QUOTA, lo_open=True, nullable="uncapped")
        return TestbedSpec(
            link=link, links=links,
            cpu_quota=self.number(d.get("cpu_quota"), "testbed.cpu_quota", lo=0, hi=MAX_CPU_QUOTA,
                                  lo_open=True, nullable="uncapped"),
            threads=self.number(d.get("threads", 1), "testbed.threads", integer=True, lo=1),
            cpus=cpus,
            cpu_period_ms=self.number(d.get("cpu_period_ms"), "testbed.cpu_period_ms", lo=CPU_PERIOD_MS_RANGE[0],
                                      hi=CPU_PERIOD_MS_RANGE[1], nullable="the testbed's default"),
        )


# ----------------------------------------------------------------------------- helpers
class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                dup = key in seen
            except TypeError:
                continue
            if dup:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (each key may appear once per mapping)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_yaml(text: str, origin: str) -> Any:
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"{origin}:{mark.line + 1}:{mark.column + 1}" if mark is not None else origin
        what = " ".join(x for x in (e.context, e.problem) if x)
        raise TopologyError(f"{where}: YAML syntax error: {what}") from None
    except yaml.YAMLError as e:
        raise TopologyError(f"{origin}: YAML syntax error: {e}") from None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return repr(v)


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _is_loopback(host: str) -> bool:
    """Whether a bind address keeps a server on this machine (localhost, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def _is_wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::")


def _host_key(host: str) -> str:
    """Host spelling used to detect two nodes on the same address."""
    h = host.strip().lower().rstrip(".")
    if h == "localhost":
        return "127.0.0.1"
    try:
        return str(ipaddress.ip_address(h))
    except ValueError:
        return h


def _abs_override(key: str, v: Any) -> Any:
    """Make a command-line target / drafter path absolute (relative to the current folder)."""
    if key == "target" and isinstance(v, str) and v != DEFAULT_TARGET:
        return os.path.abspath(os.path.expanduser(v))
    if key == "drafter":
        if isinstance(v, DrafterSpec):
            return v
        if isinstance(v, str):
            kind, sep, rest = v.partition(":")
            if sep and rest.strip():
                return DrafterSpec(kind.strip(), os.path.abspath(os.path.expanduser(rest.strip())))
            return DrafterSpec(v.strip()) if v.strip() in ("none", "lookup", "eagle") else v
    return v


def _warn_if_readable(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        log.warning("cluster key file %s is readable by other users; chmod 600 it", path)


def is_local_host(host: str) -> bool:
    """Whether host names this machine: loopback, localhost, or this machine's name or addresses."""
    h = host.strip().lower().rstrip(".")
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if h in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    local_names, local_ips = _local_identity()
    try:
        ip = ipaddress.ip_address(h)
    except ValueError:
        ip = None
    if ip is not None:
        return ip.is_loopback or ip.is_unspecified or str(ip) in local_ips
    if h in local_names:
        return True
    try:
        infos = socket.getaddrinfo(h, None)
    except (OSError, UnicodeError):
        return False
    for info in infos:
        try:
            addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        except ValueError:
            continue
        if addr.is_loopback or str(addr) in local_ips:
            return True
    return False


def _local_identity() -> tuple[set[str], set[str]]:
    """This machine's host names and IP addresses (best effort, without network traffic)."""
    names: set[str] = set()
    ips: set[str] = set()
    try:
        hostname = socket.gethostname().lower()
    except OSError:
        hostname = ""
    if hostname:
        names.update({hostname, hostname.split(".")[0]})
        try:
            for info in socket.getaddrinfo(hostname, None):
                ips.add(str(ipaddress.ip_address(str(info[4][0]).split("%")[0])))
        except (OSError, ValueError, UnicodeError):
            pass
    # the address of the default route's interface: connecting a UDP socket sends nothing
    for family, probe in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect((probe, 9))
                ips.add(str(ipaddress.ip_address(s.getsockname()[0].split("%")[0])))
        except (OSError, ValueError):
            pass
    return names, ips
