"""Validation of a parsed topology: plain data (from YAML or a dict) into a Topology.

:class:`_Parser` checks every field of every section and raises
:class:`~flowspec.errors.TopologyError` naming the file, the field path
(``nodes[2].layers``) and what is allowed. It reports every problem at once
(:class:`~flowspec.errors.TopologyErrors`, one line each): every section, every node and
every field is checked even after an earlier one failed, and every unknown key is named.
A check across fields (a port used twice, dead_after_s against heartbeat_s) runs when the
fields it compares were accepted; the API's port and the testbed's links, which name
nodes, are checked once the nodes are valid. The
layer ranges are checked as far as possible without the model (see
:mod:`flowspec.layer_plan`), once the rest of the file is valid.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

from ..errors import TopologyError, TopologyErrors
from ..layer_plan import plan_layers as _plan_layers
from ..speculative.bounds import FieldError, rule_of, show
from ..speculative.params import TreeParams, split_drafter
from ..speculative.request import check_decode
from ..speculative.tuning import AUTO, TUNABLE
from .fields import _ENV_RE, _Fields, _Recorded
from .hosts import _host_key, _is_loopback, _is_wildcard
from .messages import _kind, _suggest
from .schema import (
    DEFAULT_TARGET, ApiSpec, DecodingSpec, DrafterSpec, LinkSpec, ModelSpec, NodeSpec, SecuritySpec, TestbedSpec,
    TreeSpec,
)

if TYPE_CHECKING:
    from .topology import Topology

_NAME_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_CLUSTER_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}$")
_ORIGIN_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/\s?#]+$")
_LAYERS_RE = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")

_TOP_KEYS = ("cluster", "model", "nodes", "api", "decoding", "security", "testbed")
_MODEL_KEYS = ("target", "drafter", "dtype", "max_context", "num_layers", "name", "stage_weights")
_NODE_KEYS = ("name", "host", "port", "role", "layers", "memory_gb", "speed")
_API_KEYS = ("host", "port", "api_key_env", "api_key_file", "queue_size", "allow_unauthenticated", "cors_origins",
             "access_log")
_DECODING_KEYS = ("strategy", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "tree",
                  "prefill_chunk", "max_active", "resume_window_s", "verify", "failover_after_s")
_TREE_KEYS = ("depth", "top_k", "total", "segment", "expand", "in_flight")
# the decoding keys that set a request's defaults (checked as speculative.request.DecodeRequest's fields)
_REQUEST_KEYS = ("strategy", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "verify")
_SECURITY_KEYS = ("key_env", "key_file", "encrypt", "max_frame_mb", "read_timeout_s", "heartbeat_s", "dead_after_s")
_TESTBED_KEYS = ("link", "links", "cpu_quota", "cpu_period_ms", "threads", "cpus")
_LINK_KEYS = ("latency_ms", "jitter_ms", "bandwidth_mbit", "stall_prob", "stall_ms")
_TOP_REQUIRED = ("cluster", "model", "nodes")
_NODE_REQUIRED = ("name", "host", "port", "role")


# ----------------------------------------------------------------------------- parsing
class _Parser(_Fields):
    """Turns plain data into a Topology; every method raises TopologyError with a field path
    (the field readers and the problem list are :class:`~flowspec.config.fields._Fields`)."""

    # ------------------------------------------------------------------ sections
    def topology(self, d: Any) -> Topology:
        """The whole file; every problem found is raised at once (TopologyErrors when there are several)."""
        topo = self.attempt(lambda: self._topology(d), None)
        if self.problems:
            raise self.problems[0] if len(self.problems) == 1 else TopologyErrors(self.problems)
        assert topo is not None
        return topo

    def _topology(self, d: Any) -> Topology | None:
        from .topology import Topology  # at call time: topology.py imports this module
        if d is None:
            raise self.error("", "the file is empty; a topology needs cluster, model and nodes")
        d = self.mapping(d, "", _TOP_KEYS, _TOP_REQUIRED, fatal_missing=False)
        cluster = self.attempt(lambda: self.string(d["cluster"], "cluster", "a name of letters, digits, '.', "
                                                   "'_' or '-'", _CLUSTER_RE), "") if "cluster" in d else ""
        model = self.attempt(lambda: self.model(d["model"]), None) if "model" in d else None
        nodes = self.attempt(lambda: self.nodes(d["nodes"]), None) if "nodes" in d else None
        # the API's ports and the testbed's links name nodes: checked once the nodes are valid
        api = self.attempt(lambda: self.api(d.get("api"), nodes), None) if nodes else None
        decoding = self.attempt(lambda: self.decoding(d.get("decoding")), None)
        security = self.attempt(lambda: self.security(d.get("security")), None)
        testbed = (self.attempt(lambda: self.testbed(d["testbed"], nodes), None)
                   if nodes and d.get("testbed") is not None else None)
        if self.problems:
            return None
        assert model is not None and nodes is not None and api is not None
        assert decoding is not None and security is not None
        topo = Topology(cluster=cluster, model=model, nodes=nodes, api=api, decoding=decoding,
                        security=security, testbed=testbed, origin=self.origin, base_dir=self.base_dir)
        # check the layer ranges as far as possible without the model
        _plan_layers(self.origin, topo.stages, model.num_layers, None)
        return topo

    def model(self, v: Any) -> ModelSpec:
        d = self.mapping(v, "model", _MODEL_KEYS)
        before = len(self.problems)
        dflt = ModelSpec()

        def target() -> str:
            t = self.string(d.get("target", dflt.target), "model.target",
                            f"{DEFAULT_TARGET!r}, a model folder or a .gguf file")
            return t if t == DEFAULT_TARGET else self.resolve(t)

        def name() -> str | None:
            n = d.get("name")
            if n is None:
                return None
            return self.string(n, "model.name", "the model's id in the HTTP API (letters, digits and ._:/@+-, "
                               "at most 128 characters, e.g. SmolLM2-135M-Instruct), or null to derive it from "
                               "model.target", _MODEL_NAME_RE)

        out = ModelSpec(target=self.attempt(target, dflt.target),
                        drafter=self.attempt(lambda: self.drafter(d.get("drafter", str(dflt.drafter))), dflt.drafter),
                        dtype=self.field(ModelSpec, "dtype", d, "model"),
                        stage_weights=self.field(ModelSpec, "stage_weights", d, "model"),
                        max_context=self.field(ModelSpec, "max_context", d, "model"),
                        num_layers=self.field(ModelSpec, "num_layers", d, "model"),
                        name=self.attempt(name, None))
        self.close(before)
        return out

    def drafter(self, v: Any) -> DrafterSpec:
        """model.drafter (speculative.params.split_drafter reads it), a path resolved against the file's folder."""
        try:
            kind, path = split_drafter(v)
        except FieldError as e:
            raise self.error("model.drafter", e.reason) from None
        return DrafterSpec(kind, None if path is None else self.resolve(path))  # eagle without a path: the bundled head

    def nodes(self, v: Any) -> tuple[NodeSpec, ...] | None:
        """The ring's nodes; every node is checked, and None is returned when any has a problem."""
        if not isinstance(v, list) or not v:
            raise self.error("nodes", "must be a list of nodes in ring order (one source, at least one "
                             f"stage), not {_kind(v)}")
        before = len(self.problems)
        out: list[NodeSpec] = []
        seen: dict[tuple[Any, ...], tuple[int, str]] = {}  # ("name", n) / ("address", h, p) / ("role", "source")
        for i, item in enumerate(v):
            n = self.attempt(functools.partial(self.node, item, i, seen), None)
            if n is not None:
                out.append(n)
        if len(self.problems) > before:
            return None
        if ("role", "source") not in seen:
            raise self.error("nodes", "no node has role: source; exactly one node must be the source "
                             "(it runs the drafter and the HTTP API)")
        if not any(n.role == "stage" for n in out):
            raise self.error("nodes", "no stage node; at least one node needs role: stage (stages "
                             "hold the model's layers)")
        return tuple(out)

    def node(self, item: Any, i: int, seen: dict[tuple[Any, ...], tuple[int, str]]) -> NodeSpec:
        """nodes[i]: every field is checked; the first problem of each is recorded, and then _Recorded."""
        p = f"nodes[{i}]"
        d = self.mapping(item, p, _NODE_KEYS, _NODE_REQUIRED, " in a node")
        before = len(self.problems)

        def unique(key: tuple[Any, ...], path: str, what: str) -> None:
            if key in seen:
                j, other = seen[key]
                raise self.error(path, what.format(j=j, other=other))
            seen[key] = (i, str(d["name"]))

        name = self.attempt(lambda: self.string(d["name"], f"{p}.name", "a name of letters, digits, '_' or '-'",
                                                _NAME_RE), "")
        if name:
            self.attempt(lambda: unique(("name", name), f"{p}.name", f"{name!r} is already the name of nodes[{{j}}]; "
                                        "node names must be unique"), None)
        host = self.attempt(lambda: self.host(d["host"], f"{p}.host", wildcard_ok=False), "")
        port = self.attempt(lambda: self.field(NodeSpec, "port", d, p), 0)
        if host and port:
            self.attempt(lambda: unique(("address", _host_key(host), port), f"{p}.port", f"{host}:{port} is already used "
                                        "by nodes[{j}] ({other}); each node needs its own (host, port)"), None)
        role = self.attempt(lambda: self.field(NodeSpec, "role", d, p), "")
        if role == "source":
            self.attempt(lambda: unique(("role", "source"), f"{p}.role", "a second source: nodes[{j}] ({other}) is already "
                                        "the source; exactly one node has role: source, every other one role: "
                                        "stage"), None)
            for k in ("layers", "memory_gb", "speed"):
                if k in d:
                    self.problems.append(self.error(f"{p}.{k}", "only stage nodes hold layers; the source runs "
                                                    "the embedding, drafter and lm_head (remove this key)"))
            if len(self.problems) > before:
                raise _Recorded
            return NodeSpec(name=name, host=host, port=port, role=role, index=i)
        if role == "spare":  # outside the ring until it takes a dead stage's place (runtime/failover.py)
            for k in ("layers", "speed"):
                if k in d:
                    self.problems.append(self.error(f"{p}.{k}", "a spare holds no layers of its own: it loads "
                                                    "those of the stage whose place it takes (remove this key; "
                                                    "memory_gb says what it can hold)"))
            memory = self.attempt(lambda: self.field(NodeSpec, "memory_gb", d, p), None)
            if len(self.problems) > before:
                raise _Recorded
            return NodeSpec(name=name, host=host, port=port, role=role, memory_gb=memory, index=i)
        layers = self.attempt(lambda: self.layers(d.get("layers", "auto"), f"{p}.layers"), "auto")
        memory = self.attempt(lambda: self.field(NodeSpec, "memory_gb", d, p), None)
        speed = self.attempt(lambda: self.field(NodeSpec, "speed", d, p), 1.0)
        if len(self.problems) > before:
            raise _Recorded
        return NodeSpec(name=name, host=host, port=port, role=role, layers=layers, memory_gb=memory,
                        speed=speed, index=i)

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
        before = len(self.problems)
        dflt = ApiSpec()
        host = self.attempt(lambda: self.host(d.get("host", dflt.host), "api.host", wildcard_ok=True), None)
        port, port_ok = self.field_ok(ApiSpec, "port", d, "api")
        src = next(n for n in nodes if n.is_source)
        for n in nodes if host is not None and port_ok else ():
            same_host = _host_key(n.host) == _host_key(host) or (n is src and _is_wildcard(host))
            if same_host and n.port == port:
                self.problems.append(self.error("api.port", f"{port} is already the ring port of {n.label}; "
                                                "the HTTP API needs a port of its own"))
        no_key = object()  # a key setting that was refused: whether the API is open is not known
        key_env = self.attempt(lambda: self.env_name(d.get("api_key_env"), "api.api_key_env", nullable=True), no_key)
        key_file = self.attempt(lambda: self.file_path(d.get("api_key_file"), "api.api_key_file"), no_key)
        open_ok = self.attempt(lambda: self.flag(d.get("allow_unauthenticated", dflt.allow_unauthenticated),
                                                 "api.allow_unauthenticated"), True)
        if host is not None and key_env is None and key_file is None and not open_ok and not _is_loopback(host):
            self.problems.append(self.error(
                "api.host", f"{host} serves the HTTP API beyond this machine without a key: anyone on the "
                "network could use the ring; set api.api_key_env (or api.api_key_file) to a Bearer key, bind "
                "127.0.0.1, or set api.allow_unauthenticated: true if the network is yours alone"))
        out = ApiSpec(
            host=host or dflt.host, port=port,
            api_key_env=key_env if isinstance(key_env, str) else None,
            api_key_file=key_file if isinstance(key_file, str) else None,
            queue_size=self.field(ApiSpec, "queue_size", d, "api"),
            allow_unauthenticated=open_ok,
            cors_origins=self.origins(d.get("cors_origins")),
            access_log=self.attempt(lambda: self.flag(d.get("access_log", dflt.access_log), "api.access_log"),
                                    dflt.access_log),
        )
        self.close(before)
        return out

    def origins(self, v: Any) -> tuple[str, ...]:
        """api.cors_origins: browser origins (scheme://host[:port]) or "*", as a list; each
        origin that is not one is recorded as a problem."""
        allowed = ("a list of browser origins such as https://example.com or http://localhost:3000 "
                   "(scheme://host[:port], no path), or [\"*\"] for any origin")
        if v is None:
            return ()
        items = [v] if isinstance(v, str) else v
        if not isinstance(items, (list, tuple)):
            self.problems.append(self.error("api.cors_origins", f"must be {allowed}, not {v!r}"))
            return ()
        out = []
        for i, o in enumerate(items):
            if not isinstance(o, str) or not (o.strip() == "*" or _ORIGIN_RE.match(o.strip().rstrip("/"))):
                self.problems.append(self.error(f"api.cors_origins[{i}]", f"must be {allowed}, not {o!r}"))
                continue
            out.append(o.strip().rstrip("/").lower())  # browsers send scheme and host in lower case
        return tuple(dict.fromkeys(out))

    def decoding(self, v: Any) -> DecodingSpec:
        d = self.mapping({} if v is None else v, "decoding", _DECODING_KEYS)
        before = len(self.problems)
        # a request's defaults: null is a value here (seed: null = random), never "not given";
        # a refused field is recorded and left out, and the others are checked again without it
        given = {k: d[k] for k in _REQUEST_KEYS if k in d}
        r = None
        while r is None:
            try:
                r = check_decode(given, null_is_default=False)
            except FieldError as e:
                self.problems.append(self.error(f"decoding.{e.field}", e.reason))
                key = re.split(r"[.\[]", e.field, maxsplit=1)[0]
                if key not in given:  # not one of the fields given: nothing left to take out
                    r = check_decode({}, null_is_default=False)
                given.pop(key, None)
        out = DecodingSpec(
            strategy=r.strategy, max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
            top_k=r.top_k, seed=r.seed, verify=r.verify,
            tree=self.attempt(lambda: self.tree(d.get("tree")), TreeSpec()),
            **{k: self.field(DecodingSpec, k, d, "decoding")
               for k in ("prefill_chunk", "max_active", "resume_window_s", "failover_after_s")},
        )
        self.close(before)
        return out

    def tree(self, v: Any) -> TreeSpec:
        d = self.mapping({} if v is None else v, "decoding.tree", _TREE_KEYS)
        before = len(self.problems)
        dflt = TreeSpec()
        p = "decoding.tree"

        def tunable(k: str, value: Any) -> Any:
            """An integer, or "auto": chosen for the ring once it has formed."""
            if value != AUTO:
                rule = rule_of(TreeParams, k)
                try:
                    rule.read(value)
                except FieldError:
                    raise self.error(f"{p}.{k}", f"must be {rule.allowed} or \"auto\" (chosen from what the "
                                     f"ring's nodes and links cost), not {show(value)}") from None
            return value

        auto = {k: self.attempt(functools.partial(tunable, k, d.get(k, getattr(dflt, k))), getattr(dflt, k))
                for k in TUNABLE}
        sizes = {k: self.attempt(functools.partial(self.ruled, TreeParams, k, d.get(k, getattr(dflt, k)),
                                                   f"{p}.{k}"), getattr(dflt, k))
                 for k in ("depth", "top_k", "total")}
        self.close(before)
        return TreeSpec(**sizes, **auto)

    def security(self, v: Any) -> SecuritySpec:
        d = self.mapping({} if v is None else v, "security", _SECURITY_KEYS)
        before = len(self.problems)
        dflt = SecuritySpec()
        p = "security"
        hb, hb_ok = self.field_ok(SecuritySpec, "heartbeat_s", d, p)
        dead, dead_ok = self.field_ok(SecuritySpec, "dead_after_s", d, p)
        if hb_ok and dead_ok and dead <= hb:
            self.problems.append(self.error(f"{p}.dead_after_s", f"{dead:g} s must be greater than heartbeat_s "
                                            f"({hb:g} s), or a live peer is declared dead between two heartbeats"))
        read_to, read_ok = self.field_ok(SecuritySpec, "read_timeout_s", d, p)
        if hb_ok and read_ok and read_to <= hb:
            self.problems.append(self.error(f"{p}.read_timeout_s", f"{read_to:g} s must be greater than "
                                            f"heartbeat_s ({hb:g} s), or an idle but live peer times out"))
        out = SecuritySpec(
            key_env=self.attempt(lambda: self.string(d.get("key_env", dflt.key_env), f"{p}.key_env",
                                                     "the name of an environment variable ([A-Za-z_][A-Za-z0-9_]*)",
                                                     _ENV_RE), dflt.key_env),
            key_file=self.attempt(lambda: self.file_path(d.get("key_file"), f"{p}.key_file"), None),
            encrypt=self.attempt(lambda: self.flag(d.get("encrypt", dflt.encrypt), f"{p}.encrypt"), dflt.encrypt),
            max_frame_mb=self.field(SecuritySpec, "max_frame_mb", d, p),
            read_timeout_s=read_to,
            heartbeat_s=hb,
            dead_after_s=dead,
        )
        self.close(before)
        return out

    def link(self, v: Any, path: str, base: LinkSpec) -> LinkSpec:
        """A link at `path`; what it does not set is `base`'s (testbed.link, or LinkSpec's defaults)."""
        d = self.mapping(v, path, _LINK_KEYS, (), " in a link")
        return LinkSpec(**{k: self.field(LinkSpec, k, d, path, getattr(base, k)) for k in _LINK_KEYS})

    def testbed(self, v: Any, nodes: tuple[NodeSpec, ...]) -> TestbedSpec:
        d = self.mapping(v, "testbed", _TESTBED_KEYS)
        before = len(self.problems)
        spares = [n.label for n in nodes if n.is_spare]
        if spares:
            self.problems.append(self.error(
                "testbed", f"{', '.join(spares)} {'is a spare' if len(spares) == 1 else 'are spares'}: the "
                "emulated testbed puts a proxy on each ring link of the file's order and cannot follow a spare "
                "into the ring; remove the spare or the testbed section"))
        raw_link = d.get("link")
        link = self.attempt(lambda: self.link({} if raw_link is None else raw_link, "testbed.link", LinkSpec()),
                            LinkSpec())
        names = [n.name for n in nodes]
        edges = [(n.name, nodes[(n.index + 1) % len(nodes)].name) for n in nodes]
        edge_text = ", ".join(f"{a}->{b}" for a, b in edges)

        def one_link(k: Any, lv: Any) -> tuple[tuple[str, str], LinkSpec]:
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
            return (a, b), self.link(lv if lv is not None else {}, p, link)

        def one_cpu(k: Any, cv: Any) -> float | None:
            p = f"testbed.cpus.{k}"
            if k not in names:
                raise self.error(p, f"no node named {str(k)!r}{_suggest(str(k), names)}; "
                                 f"nodes: {', '.join(names)}")
            return self.ruled(TestbedSpec, "cpu_quota", cv, p)

        links: dict[tuple[str, str], LinkSpec] = {}
        raw_links = {} if d.get("links") is None else d["links"]
        if not isinstance(raw_links, dict):
            self.problems.append(self.error("testbed.links", f"must be a mapping \"A->B\": link, not "
                                            f"{_kind(raw_links)}"))
            raw_links = {}
        if spares:  # the ring's edges are not the file's order then: the entries name nothing to check
            raw_links = {}
        for k, lv in raw_links.items():
            got = self.attempt(functools.partial(one_link, k, lv), None)
            if got is not None:
                links[got[0]] = got[1]
        cpus: dict[str, float | None] = {}
        raw_cpus = {} if d.get("cpus") is None else d["cpus"]
        if not isinstance(raw_cpus, dict):
            self.problems.append(self.error("testbed.cpus", f"must be a mapping node name: cpu_quota, not "
                                            f"{_kind(raw_cpus)}"))
            raw_cpus = {}
        for k, cv in ({} if spares else raw_cpus).items():
            n = len(self.problems)
            quota = self.attempt(functools.partial(one_cpu, k, cv), None)
            if len(self.problems) == n:
                cpus[k] = quota
        out = TestbedSpec(
            link=link, links=links, cpus=cpus,
            **{k: self.field(TestbedSpec, k, d, "testbed") for k in ("cpu_quota", "threads", "cpu_period_ms")},
        )
        self.close(before)
        return out
