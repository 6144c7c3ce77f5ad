"""The sections of a topology file as frozen dataclasses, and the values they allow.

Each dataclass is one section of the YAML file (``model``, ``nodes[i]``, ``api``,
``decoding``, ``security``, ``testbed``); :class:`~flowspec.config.topology.Topology`
holds them. Nothing here validates: :mod:`flowspec.config.parse` builds these from
plain data and checks every field: a field's default is the dataclass's, and the values it
allows are the rule declared next to it (``metadata=allows(...)``, :mod:`flowspec.speculative.bounds`).
The ``decoding`` section embeds the algorithm's request settings: their defaults and bounds are
those of :class:`~flowspec.speculative.request.DecodeRequest` and
:class:`~flowspec.speculative.params.TreeParams`, declared there once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePath

from ..model.dtypes import NODE_DTYPES as DTYPES  # noqa: F401 -- the node dtype names; re-exported
from ..speculative.bounds import Integer, Number, OneOf, allows
from ..speculative.params import DRAFTERS as DRAFTER_KINDS  # noqa: F401 -- the drafter kinds; re-exported
from ..speculative.params import TreeParams, head_at_last_stage
from ..speculative.request import DecodeRequest
from ..speculative.tuning import AUTO, TUNABLE

_REQUEST = DecodeRequest()  # the built-in request defaults
_TREE = TreeParams()  # the built-in draft tree

ROLES = ("source", "stage", "spare")
STAGE_WEIGHTS = ("same", "int8")  # same: as model.dtype; int8: see flowspec.model.int8 (changes the model)
DEFAULT_TARGET = "default"  # SmolLM2-135M-Instruct, see flowspec.model.loader
DEFAULT_TARGET_NAME = "SmolLM2-135M-Instruct"  # the default model's id in the HTTP API
DEFAULT_KEY_ENV = "FLOWSPEC_CLUSTER_KEY"
MIN_KEY_BYTES = 16
MAX_CPU_QUOTA = 16.0
CPU_PERIOD_MS_RANGE = (1.0, 1000.0)  # the kernel's bounds of a CFS period
_PORT = Integer(1, 65535)  # the rule of a TCP port
_POSITIVE = Number(0, lo_open=True)  # the rule of a number > 0


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

    target: str = DEFAULT_TARGET  # "default", or an absolute model folder / .gguf path
    drafter: DrafterSpec = DrafterSpec("lookup")  # the source's drafter
    # "auto" (bfloat16 where the node's CPU computes it natively, else float32) | "bfloat16" | "float32"
    dtype: str = field(default="auto", metadata=allows(OneOf(DTYPES, "dtype")))
    max_context: int = field(default=2048, metadata=allows(Integer(64)))  # KV-cache slots per stage
    # decoder layers, when known without reading the model
    num_layers: int | None = field(default=None, metadata=allows(Integer(1, null="read from the model")))
    name: str | None = None  # the model's id in the HTTP API; None = derived from target (see served_name)
    # "same": the stages' weights in dtype; "int8": their decoder layers' projections stored as int8
    # with per-output-channel scales, computed in dtype (opt-in: it changes the model; every node agrees)
    stage_weights: str = field(default="same", metadata=allows(OneOf(STAGE_WEIGHTS, "stage weights")))

    @property
    def served_name(self) -> str:
        """The model's id in the HTTP API: ``name``, else SmolLM2-135M-Instruct for the default
        model, else the model folder's name or the .gguf file's stem."""
        if self.name:
            return self.name
        if self.target == DEFAULT_TARGET:
            return DEFAULT_TARGET_NAME
        p = PurePath(self.target.rstrip("/"))
        return (p.stem if p.suffix.lower() == ".gguf" else p.name) or self.target

    @property
    def aliases(self) -> tuple[str, ...]:
        """Every name a request may use for this model: the served name, the target as written
        in the topology and the last part of its path."""
        t = self.target.rstrip("/")
        return tuple(dict.fromkeys((self.served_name, self.target, t, PurePath(t).name)))


@dataclass(frozen=True)
class NodeSpec:
    """One device of the ring."""

    name: str  # unique, [A-Za-z0-9_-]+
    host: str  # hostname or IP the other nodes connect to
    port: int = field(metadata=allows(_PORT))  # the ring's TCP port on host
    # "source" (drafter, sampling, HTTP API) | "stage" (holds decoder layers) | "spare" (outside
    # the ring, holds nothing until it takes the place of a stage that died)
    role: str = field(metadata=allows(OneOf(ROLES, "role")))
    layers: tuple[int, int] | str | None = None  # stages: half-open (start, end) or "auto"; source, spares: None
    # stages: GiB available for weights when splitting `auto`; spares: the most a spare can load
    # (one that cannot hold a dead stage's weights is not chosen); None = unlimited
    memory_gb: float | None = field(default=None, metadata=allows(Number(0, lo_open=True, null="unlimited")))
    # stages: relative compute speed when splitting `auto`
    speed: float = field(default=1.0, metadata=allows(_POSITIVE))
    index: int = field(default=0, compare=False)  # position in the file's node list (for messages)

    @property
    def is_source(self) -> bool:
        return self.role == "source"

    @property
    def is_spare(self) -> bool:
        return self.role == "spare"

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
    port: int = field(default=8000, metadata=allows(_PORT))  # TCP port to bind
    api_key_env: str | None = None  # env var holding the Bearer key, or None
    api_key_file: str | None = None  # absolute path of a file holding the Bearer key, or None
    queue_size: int = field(default=16, metadata=allows(Integer(1)))  # waiting requests before answering 429
    allow_unauthenticated: bool = False  # serve a non-loopback host without a key (refused otherwise)
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API ("*": any); () = no CORS
    access_log: bool = False  # log one line per HTTP request (method, path, status, tokens, duration)


@dataclass(frozen=True)
class TreeSpec:
    """Shape of the speculative token tree: TreeParams (bounds: its fields), where segment,
    expand and in_flight may be "auto": chosen once the ring has formed, from what its nodes
    and links cost (speculative/tuning.py)."""

    depth: int = _TREE.depth  # levels drafted per expansion
    top_k: int = _TREE.top_k  # children kept per node
    total: int = _TREE.total  # nodes kept in the tree
    segment: int | str = "auto"  # nodes per segment sent into the ring, or "auto"
    expand: int | str = "auto"  # nodes added per dynamic expansion, or "auto" (= segment x in_flight)
    in_flight: int | str = "auto"  # segments in flight, or "auto" (as many as the ring holds without queueing)

    @property
    def auto(self) -> tuple[str, ...]:
        """The settings the source chooses for its ring."""
        return tuple(k for k in TUNABLE if getattr(self, k) == AUTO)

    def params(self, chosen: TreeParams | None = None) -> TreeParams:
        """As TreeParams: the "auto" settings from `chosen` (the source's tuning), else TreeParams' defaults."""
        src = chosen or _TREE
        return TreeParams(self.depth, self.top_k, self.total,
                          *(getattr(src if getattr(self, k) == AUTO else self, k)
                            for k in ("segment", "expand", "in_flight")))


@dataclass(frozen=True)
class DecodingSpec:
    """How tokens are generated (defaults for requests that do not say otherwise: the fields
    that DecodeRequest also has take its defaults and bounds), and how the ring serves them."""

    strategy: str = _REQUEST.strategy  # autoregressive | chunked | pipedec | flowspec
    max_new_tokens: int = _REQUEST.max_new_tokens  # tokens per answer
    temperature: float = _REQUEST.temperature  # 0 = greedy
    top_p: float = _REQUEST.top_p  # nucleus mass
    top_k: int = _REQUEST.top_k  # 0 = off
    seed: int | None = _REQUEST.seed  # sampling seed, None = random
    tree: TreeSpec = field(default_factory=TreeSpec)  # speculative tree shape
    prefill_chunk: int = field(default=256, metadata=allows(Integer(1)))  # prompt tokens per prefill segment
    # requests decoding on the ring at once (every stage holds a KV cache for each)
    max_active: int = field(default=4, metadata=allows(Integer(1, 64)))
    # a broken ring holds its requests this long, then fails them (0: at once)
    resume_window_s: float = field(default=60.0, metadata=allows(Number(0, 86400)))
    # a stage dead this long is replaced by a spare node, if one is connected
    failover_after_s: float = field(default=5.0, metadata=allows(Number(0, 86400)))
    # where the target's tokens are chosen: "source" (its lm_head) | "last_stage" (which then
    # holds the lm_head) | "auto" (the last stage holds it and chooses while requests share the ring)
    verify: str = _REQUEST.verify

    @property
    def lm_head_at_last_stage(self) -> bool:
        """The last stage loads the lm_head (verify: last_stage or auto)."""
        return head_at_last_stage(self.verify)

    @property
    def request(self) -> DecodeRequest:
        """The request a client gets when it sets nothing (the draft tree is the ring's own)."""
        return DecodeRequest(strategy=self.strategy, max_new_tokens=self.max_new_tokens,
                             temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                             verify=self.verify)


@dataclass(frozen=True)
class SecuritySpec:
    """Authentication and liveness of the ring's links."""

    key_env: str = DEFAULT_KEY_ENV  # env var holding the cluster key
    key_file: str | None = None  # absolute path of a file holding the key; wins over key_env
    encrypt: bool = True  # seal every frame with ChaCha20-Poly1305; False: authenticate frames only
    max_frame_mb: float = field(default=64.0, metadata=allows(_POSITIVE))  # largest accepted frame, MiB
    # a peer silent for longer is dead (> heartbeat_s)
    read_timeout_s: float = field(default=30.0, metadata=allows(_POSITIVE))
    heartbeat_s: float = field(default=0.5, metadata=allows(_POSITIVE))  # heartbeat interval
    # no heartbeat for this long = dead (> heartbeat_s)
    dead_after_s: float = field(default=2.5, metadata=allows(_POSITIVE))

    @property
    def max_frame_bytes(self) -> int:
        return int(self.max_frame_mb * (1 << 20))


@dataclass(frozen=True)
class LinkSpec:
    """An emulated network link from one node to the next."""

    latency_ms: float = field(default=2.0, metadata=allows(Number(0)))  # one-way delay
    jitter_ms: float = field(default=0.0, metadata=allows(Number(0)))  # random extra delay, up to this much
    # Mbit/s; None = unlimited
    bandwidth_mbit: float | None = field(default=100.0, metadata=allows(Number(0, lo_open=True, null="unlimited")))
    # probability that a chunk stalls
    stall_prob: float = field(default=0.0, metadata=allows(Number(0, 1, hi_open=True)))
    stall_ms: float = field(default=0.0, metadata=allows(Number(0)))  # duration of a stall


@dataclass(frozen=True)
class TestbedSpec:
    """Emulated edge conditions: slow links and CPU-capped nodes."""

    __test__ = False  # not a pytest test class, despite the name

    link: LinkSpec = field(default_factory=LinkSpec)  # default for every link i -> i+1
    links: dict[tuple[str, str], LinkSpec] = field(default_factory=dict)  # (from, to) -> full override
    # fraction of one core per node; None = uncapped
    cpu_quota: float | None = field(default=None, metadata=allows(Number(0, MAX_CPU_QUOTA, lo_open=True,
                                                                         null="uncapped")))
    threads: int = field(default=1, metadata=allows(Integer(1)))  # compute threads per node
    cpus: dict[str, float | None] = field(default_factory=dict)  # node name -> cpu_quota override (its rule)
    # CFS period of the CPU caps in ms; None = the testbed's default (4 ms, see
    # flowspec/testbed/cgroups.py: short, so that a short burst of work is slowed too)
    cpu_period_ms: float | None = field(default=None, metadata=allows(Number(*CPU_PERIOD_MS_RANGE,
                                                                             null="the testbed's default")))
