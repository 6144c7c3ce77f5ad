"""The topology file: the bundled examples load, and every mistake gets a clear message."""

from __future__ import annotations

import copy
import os
import socket
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from flowspec.config import DrafterSpec, LinkSpec, Topology, is_local_host
from flowspec.config.topology import LM_HEAD_WORK
from flowspec.errors import FlowSpecError, TopologyError

REPO = Path(__file__).resolve().parent.parent
TOPOLOGIES = REPO / "topologies"
KEY = "0123456789abcdef0123456789abcdef"

BASE: dict[str, Any] = {
    "cluster": "test",
    "model": {"target": "default", "drafter": "lookup"},
    "nodes": [
        {"name": "source", "host": "127.0.0.1", "port": 7700, "role": "source"},
        {"name": "stage1", "host": "127.0.0.1", "port": 7701, "role": "stage", "layers": "0-9"},
        {"name": "stage2", "host": "127.0.0.1", "port": 7702, "role": "stage", "layers": "10-19"},
        {"name": "stage3", "host": "127.0.0.1", "port": 7703, "role": "stage", "layers": "20-29"},
    ],
}


@pytest.fixture
def write(tmp_path: Path) -> Callable[[Any], Path]:
    """write(data_or_text) -> path of topo.yaml in tmp_path."""

    def w(content: Any) -> Path:
        p = tmp_path / "topo.yaml"
        p.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        return p

    return w


def base(**top: Any) -> dict[str, Any]:
    d = copy.deepcopy(BASE)
    d.update(copy.deepcopy(top))
    return d


def load_error(write: Callable[[Any], Path], content: Any) -> str:
    p = write(content)
    with pytest.raises(TopologyError) as ei:
        Topology.load(p)
    msg = str(ei.value)
    assert msg.startswith(str(p)), msg  # every message names the file first
    return msg


def layers_error(write: Callable[[Any], Path], *ranges: Any, num_layers: int | None = 30) -> str:
    d = base()
    d["nodes"] = d["nodes"][:1] + [
        {"name": f"stage{i + 1}", "host": "127.0.0.1", "port": 7701 + i, "role": "stage", "layers": r}
        for i, r in enumerate(ranges)
    ]
    if num_layers is not None:
        d["model"]["num_layers"] = num_layers
    return load_error(write, d)


# ------------------------------------------------------------------ bundled files
@pytest.mark.parametrize("name", ["local.yaml", "edge-5.yaml", "lan-example.yaml"])
def test_bundled_topologies_load_and_cover_30_layers(name: str) -> None:
    topo = Topology.load(TOPOLOGIES / name)
    ranges = topo.resolve_layers(30)
    assert list(ranges) == [n.name for n in topo.stages]
    covered = [layer for a, b in ranges.values() for layer in range(a, b)]
    assert covered == list(range(30))
    assert all(b > a for a, b in ranges.values())
    assert Topology.from_dict(topo.to_dict()) == topo


def test_bundled_topology_contents() -> None:
    local = Topology.load(TOPOLOGIES / "local.yaml")
    assert local.source.port == 7700 and [n.port for n in local.stages] == [7701, 7702, 7703]
    assert local.model.drafter == DrafterSpec("eagle") and local.model.target == "default"
    assert (local.api.host, local.api.port) == ("127.0.0.1", 8000) and local.testbed is None

    edge = Topology.load(TOPOLOGIES / "edge-5.yaml")
    assert len(edge.stages) == 4 and [n.port for n in edge.nodes] == list(range(7710, 7715))
    assert edge.model.drafter == DrafterSpec("eagle", None)
    assert edge.api.port == 8010 and edge.decoding.tree.auto == ("segment", "in_flight", "expand")
    assert edge.testbed is not None and edge.testbed.cpu_quota == 0.35 and edge.testbed.threads == 1
    assert edge.link("edge2") == LinkSpec(latency_ms=2, jitter_ms=0, bandwidth_mbit=100)
    assert edge.cpu_quota("edge3") == 0.35
    # the split the README's edge-5 benchmarks ran: the last stage holds the lm_head (verify: auto)
    assert edge.resolve_layers(30, None, 8.0) == {"edge1": (0, 8), "edge2": (8, 17), "edge3": (17, 26),
                                                 "edge4": (26, 30)}

    lan = Topology.load(TOPOLOGIES / "lan-example.yaml")
    assert lan.security.key_file == str(TOPOLOGIES / "cluster.key")
    assert lan.resolve_layers(30) == {"laptop": (0, 12), "raspberry-pi": (12, 22), "old-desktop": (22, 30)}


# ------------------------------------------------------------------ queries
def test_ring_queries_with_source_in_the_middle(write: Callable[[Any], Path]) -> None:
    d = base()
    d["nodes"] = [d["nodes"][2], d["nodes"][0], d["nodes"][3], d["nodes"][1]]  # stage2 source stage3 stage1
    d["nodes"][0]["layers"] = "auto"
    d["nodes"][2]["layers"] = "0-9"
    d["nodes"][3]["layers"] = "10-19"
    topo = Topology.load(write(d))
    assert topo.source.name == "source"
    assert [n.name for n in topo.stages] == ["stage3", "stage1", "stage2"]
    assert topo.successor("stage1").name == "stage2" and topo.successor("stage2").name == "source"
    assert topo.predecessor("stage2").name == "stage1" and topo.predecessor("source").name == "stage2"
    assert topo.resolve_layers(30)["stage2"] == (20, 30)
    with pytest.raises(TopologyError, match=r"no node named 'stage9' \(did you mean 'stage3'\?\); "
                                            r"nodes: stage2, source, stage3, stage1"):
        topo.node("stage9")


def test_auto_split_by_speed_and_memory() -> None:
    d = base()
    for n in d["nodes"][1:]:
        n["layers"] = "auto"
    d["nodes"][1]["speed"] = 2.0
    topo = Topology.from_dict(d)
    assert topo.resolve_layers(40) == {"stage1": (0, 20), "stage2": (20, 30), "stage3": (30, 40)}
    # memory: stage1 holds at most 5 layers of 1 GiB; the rest go to the others
    d["nodes"][1]["memory_gb"] = 5.5
    topo = Topology.from_dict(d)
    ranges = topo.resolve_layers(40, layer_bytes=1 << 30)
    # 35 layers for two equal stages: at the tie the later stage takes the odd one
    assert ranges["stage1"] == (0, 5) and ranges["stage2"] == (5, 22) and ranges["stage3"] == (22, 40)
    d["nodes"][2]["memory_gb"] = d["nodes"][3]["memory_gb"] = 1
    with pytest.raises(TopologyError, match=r"memory_gb.*holds only 7 of these 40 layers"):
        Topology.from_dict(d).resolve_layers(40, layer_bytes=1 << 30)


def test_verify_at_the_last_stage_counts_its_lm_head() -> None:
    """decoding.verify: last_stage -- the last stage also holds the lm_head, so an auto split
    gives it fewer layers (LM_HEAD_WORK of the lm_head's size, as it runs over the scored rows
    only), and its memory must hold all of it; the source's split is unchanged."""
    d = base()
    for n in d["nodes"][1:]:
        n["layers"] = "auto"
    assert Topology.from_dict(d).decoding.verify == "source"
    assert Topology.from_dict(d).resolve_layers(30, None, 8.0) == {
        "stage1": (0, 10), "stage2": (10, 20), "stage3": (20, 30)}
    d["decoding"] = {"verify": "last_stage"}
    topo = Topology.from_dict(d)
    assert topo.decoding.verify == "last_stage"
    assert LM_HEAD_WORK == 0.6  # 8 layers of weights cost a stage 4.8 layers of work
    # 11 / 12 / 7 + 4.8: of two stages as busy with one more layer, the later takes it (the
    # first takes the source's segments back to back, and queues form there first)
    assert topo.resolve_layers(30, None, 8.0) == {"stage1": (0, 11), "stage2": (11, 23), "stage3": (23, 30)}
    d["decoding"] = {"verify": "auto"}  # the last stage holds the lm_head too (and chooses while requests share)
    assert Topology.from_dict(d).decoding.lm_head_at_last_stage
    assert Topology.from_dict(d).resolve_layers(30, None, 8.0) == topo.resolve_layers(30, None, 8.0)
    d["decoding"] = {"verify": "last_stage"}
    d["nodes"][3]["memory_gb"] = 8.5  # 8 GiB of lm_head leaves room for no 1 GiB layer
    with pytest.raises(TopologyError, match=r"nodes\[3\]\.memory_gb: 8.5 GiB holds no layer of 1024.0 MiB "
                                            r"besides the lm_head \(8192 MiB\)"):
        Topology.from_dict(d).resolve_layers(30, 1 << 30, 8.0)
    d["nodes"][3]["memory_gb"] = 10
    d["nodes"][3]["layers"] = "26-29"
    d["nodes"][2]["layers"] = "13-25"
    d["nodes"][1]["layers"] = "0-12"
    with pytest.raises(TopologyError, match=r"layers 26-29 and the lm_head need 12.00 GiB but memory_gb is 10"):
        Topology.from_dict(d).resolve_layers(30, 1 << 30, 8.0)
    d["decoding"] = {"verify": "stage"}
    with pytest.raises(TopologyError,
                       match=r"decoding\.verify: unknown verify 'stage'.*allowed: source, last_stage, auto"):
        Topology.from_dict(d)


def test_auto_between_explicit_ranges() -> None:
    d = base()
    d["nodes"][2]["layers"] = "auto"
    topo = Topology.from_dict(d)
    assert topo.resolve_layers(30)["stage2"] == (10, 20)
    d["nodes"][3]["layers"] = "10-29"
    with pytest.raises(TopologyError, match=r"nodes\[3\]\.layers: .*leave 0 layer\(s\) for the 1 auto"):
        Topology.from_dict(d)


def test_num_layers_mismatch_and_too_many_stages() -> None:
    d = base()
    d["model"]["num_layers"] = 30
    with pytest.raises(TopologyError, match=r"model\.num_layers: 30, but the model has 24 layers"):
        Topology.from_dict(d).resolve_layers(24)
    for n in d["nodes"][1:]:
        n["layers"] = "auto"
    del d["model"]["num_layers"]
    with pytest.raises(TopologyError, match=r"nodes: 3 stages but the model has only 2 layers"):
        Topology.from_dict(d).resolve_layers(2)


def test_with_overrides(tmp_path: Path) -> None:
    topo = Topology.from_dict(base(), base_dir=tmp_path)
    t2 = topo.with_overrides(temperature=0.7, max_new_tokens=12, tree_depth=3, drafter="none",
                             seed=None, dtype="float32")
    assert t2.decoding.temperature == 0.7 and t2.decoding.max_new_tokens == 12
    assert t2.decoding.tree.depth == 3 and t2.model.drafter == DrafterSpec("none")
    assert t2.model.dtype == "float32" and t2.decoding.seed is None
    assert topo.decoding.temperature == 0.0  # unchanged original
    assert t2.origin == topo.origin and t2.nodes == topo.nodes
    with pytest.raises(TopologyError, match=r"decoding\.temperature: must be a number in \[0, 2\]"):
        topo.with_overrides(temperature=-1)
    with pytest.raises(TopologyError, match=r"override 'temprature': unknown \(did you mean 'temperature'"):
        topo.with_overrides(temprature=1.0)


def test_drafter_paths_resolve_against_yaml_folder(write: Callable[[Any], Path], tmp_path: Path) -> None:
    d = base()
    d["model"]["drafter"] = "eagle:heads/eagle-smol"
    topo = Topology.load(write(d))
    assert topo.model.drafter == DrafterSpec("eagle", str(tmp_path / "heads" / "eagle-smol"))
    d["model"]["drafter"] = "model:/abs/draft"
    assert Topology.load(write(d)).model.drafter == DrafterSpec("model", "/abs/draft")
    d["model"]["drafter"] = "model"
    assert "model.drafter: 'model' needs a path" in load_error(write, d)
    d["model"]["drafter"] = "lokup"
    msg = load_error(write, d)
    assert "model.drafter: unknown drafter 'lokup' (did you mean 'lookup'?)" in msg
    assert "none, lookup, eagle, eagle:PATH, model:PATH" in msg


def test_defaults() -> None:
    topo = Topology.from_dict(base())
    assert topo.model.dtype == "auto" and topo.model.max_context == 2048
    assert topo.decoding.strategy == "flowspec" and topo.decoding.tree.segment == "auto"
    assert topo.security.key_env == "FLOWSPEC_CLUSTER_KEY" and topo.security.max_frame_bytes == 64 << 20
    assert topo.api.queue_size == 16 and topo.decoding.tree.auto == ("segment", "in_flight", "expand")
    assert topo.link("source") is None and topo.cpu_quota("stage1") is None


def test_testbed_link_overrides_inherit_the_default_link() -> None:
    d = base(testbed={"link": {"latency_ms": 5}, "links": {"stage1->stage2": {"bandwidth_mbit": None}},
                      "cpus": {"stage2": 0.5}, "cpu_quota": 1.0, "cpu_period_ms": 2.5})
    topo = Topology.from_dict(d)
    assert topo.testbed is not None and topo.testbed.cpu_period_ms == 2.5
    assert topo.link("stage1") == LinkSpec(latency_ms=5, bandwidth_mbit=None)
    assert topo.link("stage3") == LinkSpec(latency_ms=5)  # stage3 -> source
    assert topo.cpu_quota("stage2") == 0.5 and topo.cpu_quota("source") == 1.0
    assert Topology.from_dict(topo.to_dict()) == topo


# ------------------------------------------------------------------ errors
def test_missing_file() -> None:
    with pytest.raises(TopologyError, match=r"nope\.yaml: no such topology file"):
        Topology.load("nope.yaml")


def test_topology_error_is_a_flowspec_error() -> None:
    assert issubclass(TopologyError, FlowSpecError)


@pytest.mark.parametrize("section", ["cluster", "model", "nodes"])
def test_missing_required_section(write: Callable[[Any], Path], section: str) -> None:
    d = base()
    del d[section]
    msg = load_error(write, d)
    assert f": {section}: missing; required: cluster, model, nodes" in msg


def test_missing_required_node_field(write: Callable[[Any], Path]) -> None:
    d = base()
    del d["nodes"][2]["port"]
    msg = load_error(write, d)
    assert "nodes[2].port: missing; required in a node: name, host, port, role" in msg


def test_unknown_key_with_suggestion(write: Callable[[Any], Path]) -> None:
    d = base()
    d["nodes"][1]["prot"] = 7701
    msg = load_error(write, d)
    assert "nodes[1].prot: unknown key (did you mean 'port'?)" in msg
    assert "allowed in a node: name, host, port, role, layers, memory_gb, speed" in msg

    msg = load_error(write, base(decoding={"temprature": 0.5}))
    assert "decoding.temprature: unknown key (did you mean 'temperature'?)" in msg
    msg = load_error(write, base(securty={}))
    assert "securty: unknown key (did you mean 'security'?)" in msg


def test_overlapping_layers(write: Callable[[Any], Path]) -> None:
    msg = layers_error(write, "0-9", "8-19", "20-29")
    assert ("nodes[2].layers: layers 8-19 overlap nodes[1] (stage1) which has 0-9; "
            "layers must cover 0-29 exactly once in ring order") in msg
    # detected without num_layers too
    msg = layers_error(write, "0-9", "8-19", "auto", num_layers=None)
    assert "nodes[2].layers: layers 8-19 overlap nodes[1] (stage1) which has 0-9" in msg
    assert "exactly once" in msg


def test_layers_out_of_ring_order(write: Callable[[Any], Path]) -> None:
    msg = layers_error(write, "15-29", "0-14")
    assert "nodes[1].layers: layers 15-29 come before nodes[2] (stage2) which has 0-14 but follows it" in msg
    msg = layers_error(write, "0-9", "20-29", "10-19")
    assert "nodes[2].layers: layers 20-29 come before nodes[3] (stage3) which has 10-19" in msg
    msg = layers_error(write, "0-9", "auto", "5-7", num_layers=None)
    assert "nodes[3].layers: layers 5-7 overlap nodes[1] (stage1) which has 0-9" in msg
    msg = layers_error(write, "0-4", "auto", "10-19", "5-6", num_layers=None)
    assert "nodes[4].layers: layers 5-6 come after nodes[3] (stage3) which has 10-19" in msg


def test_gap_in_layers(write: Callable[[Any], Path]) -> None:
    msg = layers_error(write, "0-9", "12-29")
    assert "nodes[2].layers: no stage holds layers 10-11 (nodes[1] (stage1) ends at layer 9" in msg
    assert "layers must cover 0-29 exactly once in ring order" in msg
    msg = layers_error(write, "1-29")
    assert "nodes[1].layers: no stage holds layer 0 (the first stage after the source must start" in msg
    msg = layers_error(write, "0-9", "10-27")
    assert "nodes[2].layers: no stage holds layers 28-29" in msg


def test_layers_out_of_range(write: Callable[[Any], Path]) -> None:
    msg = layers_error(write, "0-9", "10-31")
    assert "nodes[2].layers: layers 10-31 are out of range: the model has 30 layers (0-29)" in msg
    topo = Topology.from_dict(layers_dict("0-9", "10-31"))
    with pytest.raises(TopologyError, match=r"nodes\[2\]\.layers: layers 10-31 are out of range"):
        topo.resolve_layers(30)


def layers_dict(*ranges: Any) -> dict[str, Any]:
    d = base()
    d["nodes"] = d["nodes"][:1] + [
        {"name": f"stage{i + 1}", "host": "127.0.0.1", "port": 7701 + i, "role": "stage", "layers": r}
        for i, r in enumerate(ranges)
    ]
    return d


@pytest.mark.parametrize("bad", ["9-0", "x", "1-2-3", -1, True, [0, 9]])
def test_bad_layers_syntax(write: Callable[[Any], Path], bad: Any) -> None:
    msg = layers_error(write, bad, "10-29")
    assert "nodes[1].layers:" in msg
    assert ('"A-B"' in msg) or ("write the lower layer first" in msg)


def test_single_layer_forms(write: Callable[[Any], Path]) -> None:
    topo = Topology.from_dict(layers_dict(0, "1", "2-29"))
    assert topo.resolve_layers(30) == {"stage1": (0, 1), "stage2": (1, 2), "stage3": (2, 30)}
    assert [n["layers"] for n in topo.to_dict()["nodes"][1:]] == ["0", "1", "2-29"]


def test_duplicate_port_on_same_host(write: Callable[[Any], Path]) -> None:
    d = base()
    d["nodes"][2]["port"] = 7701
    msg = load_error(write, d)
    assert "nodes[2].port: 127.0.0.1:7701 is already used by nodes[1] (stage1)" in msg
    assert "each node needs its own (host, port)" in msg
    d["nodes"][2]["host"] = "localhost"  # same machine, other spelling
    assert "nodes[2].port:" in load_error(write, d)
    d["nodes"][2]["host"] = "127.0.0.2"  # another address: fine
    Topology.load(write(d))


def test_duplicate_names(write: Callable[[Any], Path]) -> None:
    d = base()
    d["nodes"][3]["name"] = "stage1"
    msg = load_error(write, d)
    assert "nodes[3].name: 'stage1' is already the name of nodes[1]; node names must be unique" in msg


def test_bad_name_and_host(write: Callable[[Any], Path]) -> None:
    d = base()
    d["nodes"][1]["name"] = "stage 1"
    assert "nodes[1].name: must be a name of letters, digits, '_' or '-'" in load_error(write, d)
    d = base()
    d["nodes"][1]["host"] = "bad_host!"
    assert "nodes[1].host: must be a hostname or an IP address" in load_error(write, d)
    d["nodes"][1]["host"] = "0.0.0.0"
    assert "nodes[1].host: 0.0.0.0 is a bind-all address" in load_error(write, d)
    d["nodes"][1]["host"] = "127.0.0.1"
    d["nodes"][1]["port"] = 70000
    assert "nodes[1].port: must be an integer from 1 to 65535, not 70000" in load_error(write, d)


def test_two_sources(write: Callable[[Any], Path]) -> None:
    d = base()
    d["nodes"][2]["role"] = "source"
    del d["nodes"][2]["layers"]
    msg = load_error(write, d)
    assert "nodes[2].role: a second source: nodes[0] (source) is already the source" in msg
    assert "exactly one node has role: source" in msg


def test_no_source(write: Callable[[Any], Path]) -> None:
    d = base()
    d["nodes"][0]["role"] = "stage"
    msg = load_error(write, d)
    assert "nodes: no node has role: source; exactly one node must be the source" in msg


def test_no_stage(write: Callable[[Any], Path]) -> None:
    d = base()
    d["nodes"] = d["nodes"][:1]
    msg = load_error(write, d)
    assert "nodes: no stage node; at least one node needs role: stage" in msg


def test_bad_role_and_layers_on_source(write: Callable[[Any], Path]) -> None:
    d = base()
    d["nodes"][1]["role"] = "stgae"
    assert "nodes[1].role: unknown role 'stgae' (did you mean 'stage'?); allowed: source, stage" in \
        load_error(write, d)
    d = base()
    d["nodes"][0]["layers"] = "0-1"
    assert "nodes[0].layers: only stage nodes hold layers" in load_error(write, d)


def test_unknown_strategy(write: Callable[[Any], Path]) -> None:
    msg = load_error(write, base(decoding={"strategy": "flowspek"}))
    assert ("decoding.strategy: unknown strategy 'flowspek' (did you mean 'flowspec'?); "
            "allowed: autoregressive, chunked, pipedec, flowspec") in msg


def test_bad_dtype(write: Callable[[Any], Path]) -> None:
    d = base()
    d["model"]["dtype"] = "float16"
    msg = load_error(write, d)
    assert "model.dtype: unknown dtype 'float16'" in msg and "allowed: auto, bfloat16, float32" in msg


def test_negative_temperature(write: Callable[[Any], Path]) -> None:
    msg = load_error(write, base(decoding={"temperature": -0.5}))
    assert "decoding.temperature: must be a number in [0, 2], not -0.5" in msg


@pytest.mark.parametrize("section,field,value,expect", [
    ("decoding", "top_p", 0, "decoding.top_p: must be a number in (0, 1], not 0"),
    ("decoding", "max_new_tokens", 0, "decoding.max_new_tokens: must be an integer >= 1, not 0"),
    ("decoding", "top_k", "8", "decoding.top_k: must be an integer >= 0, not '8'"),
    ("decoding", "tree", {"depth": 40}, "decoding.tree.depth: must be an integer from 1 to 32, not 40"),
    ("decoding", "tree", {"in_flight": 0}, 'decoding.tree.in_flight: must be an integer from 1 to 64 or "auto"'),
    ("decoding", "tree", {"segment": "big"}, 'decoding.tree.segment: must be an integer from 1 to 512 or "auto"'),
    ("decoding", "tree", {"expand": 0}, 'decoding.tree.expand: must be an integer from 1 to 4096 or "auto"'),
    ("model", "max_context", 32, "model.max_context: must be an integer >= 64, not 32"),
    ("api", "queue_size", 0, "api.queue_size: must be an integer >= 1, not 0"),
    ("api", "port", 7700, "api.port: 7700 is already the ring port of nodes[0] (source)"),
    ("security", "max_frame_mb", 0, "security.max_frame_mb: must be a number > 0, not 0"),
    ("security", "key_env", "1BAD", "security.key_env: must be the name of an environment variable"),
    ("testbed", "cpu_quota", 20, "testbed.cpu_quota: must be a number in (0, 16], or null (uncapped), not 20"),
    ("testbed", "cpu_period_ms", 0.5,
     "testbed.cpu_period_ms: must be a number in [1, 1000], or null (the testbed's default), not 0.5"),
    ("testbed", "link", {"stall_prob": 1.0}, "testbed.link.stall_prob: must be a number in [0, 1), not 1.0"),
    ("testbed", "cpus", {"stage7": 0.5}, "testbed.cpus.stage7: no node named 'stage7' (did you mean"),
])
def test_bad_values(write: Callable[[Any], Path], section: str, field: str, value: Any, expect: str) -> None:
    d = base()
    d.setdefault(section, {})[field] = value
    assert expect in load_error(write, d)


def test_bad_testbed_link_key(write: Callable[[Any], Path]) -> None:
    edges = "source->stage1, stage1->stage2, stage2->stage3, stage3->source"
    msg = load_error(write, base(testbed={"links": {"stage1->stage3": {"latency_ms": 5}}}))
    assert "testbed.links['stage1->stage3']: stage1->stage3 is not a ring edge" in msg
    assert f"the ring edges are {edges}" in msg
    msg = load_error(write, base(testbed={"links": {"stage1->stgae2": {}}}))
    assert "testbed.links['stage1->stgae2']: no node named 'stgae2' (did you mean 'stage2'?)" in msg
    msg = load_error(write, base(testbed={"links": {"stage1 to stage2": {}}}))
    assert "keys are written \"A->B\" with node names" in msg
    msg = load_error(write, base(testbed={"links": {"stage1->stage2": {"latency": 5}}}))
    assert "testbed.links['stage1->stage2'].latency: unknown key (did you mean 'latency_ms'?)" in msg


def test_every_problem_of_every_section_at_once(write: Callable[[Any], Path]) -> None:
    """Fields checked by hand (names, addresses, flags, origins, links) and across fields
    (ports, timeouts) are all reported, in file order, not only the first of each section."""
    from flowspec.errors import TopologyErrors

    d = base(
        model={"target": "default", "drafter": 5, "name": "bad name!"},
        api={"host": "0.0.0.0", "port": 7700, "cors_origins": ["ftp//x", "https://ok.example", 5],
             "access_log": "yes"},
        decoding={"strategy": "flowspek", "temperature": -1, "top_p": 7, "max_active": 0,
                  "tree": {"segment": 0, "top_k": 999, "depth": 0}},
        security={"heartbeat_s": 5, "dead_after_s": 2, "read_timeout_s": 1, "encrypt": "maybe",
                  "key_env": "1BAD"},
        testbed={"link": {"bandwidth_mbit": 0}, "links": {"a->b": {}, "source->stage1": {"latency_ms": -1}},
                 "cpus": {"nobody": 0.5}})
    p = write(d)
    with pytest.raises(TopologyErrors) as ei:
        Topology.load(p)
    fields = [m.split(": ")[1] for m in ei.value.messages]
    assert fields == [
        "model.drafter", "model.name", "api.port", "api.host", "api.cors_origins[0]", "api.cors_origins[2]",
        "api.access_log", "decoding.strategy", "decoding.temperature", "decoding.top_p", "decoding.tree.segment",
        "decoding.tree.depth", "decoding.tree.top_k", "decoding.max_active", "security.dead_after_s",
        "security.read_timeout_s", "security.key_env", "security.encrypt", "testbed.link.bandwidth_mbit",
        "testbed.links['a->b']", "testbed.links['source->stage1'].latency_ms", "testbed.cpus.nobody"], fields
    assert all(m.startswith(f"{p}: ") for m in ei.value.messages)
    # a cross-field check needs both fields accepted: a refused heartbeat is said once, on its own
    d = base(security={"heartbeat_s": -1, "dead_after_s": 0.5})
    with pytest.raises(TopologyError) as one:
        Topology.load(write(d))
    assert "security.heartbeat_s: must be a number > 0" in str(one.value)
    assert "dead_after_s" not in str(one.value)


def test_dead_after_not_above_heartbeat(write: Callable[[Any], Path]) -> None:
    msg = load_error(write, base(security={"heartbeat_s": 2.0, "dead_after_s": 2.0}))
    assert "security.dead_after_s: 2 s must be greater than heartbeat_s (2 s)" in msg


def test_missing_cluster_key(monkeypatch: pytest.MonkeyPatch, write: Callable[[Any], Path]) -> None:
    monkeypatch.delenv("FLOWSPEC_CLUSTER_KEY", raising=False)
    p = write(base())
    topo = Topology.load(p)
    with pytest.raises(TopologyError) as ei:
        topo.cluster_key()
    msg = str(ei.value)
    assert msg.startswith(f"{p}: security.key_env: no cluster key")
    assert "FLOWSPEC_CLUSTER_KEY is not set" in msg
    assert "export FLOWSPEC_CLUSTER_KEY=" in msg and "security.key_file" in msg
    monkeypatch.setenv("FLOWSPEC_CLUSTER_KEY", f"  {KEY}\n")
    assert topo.cluster_key() == KEY.encode()


def test_too_short_cluster_key(monkeypatch: pytest.MonkeyPatch, write: Callable[[Any], Path]) -> None:
    monkeypatch.setenv("MY_KEY", " short \n")
    topo = Topology.load(write(base(security={"key_env": "MY_KEY"})))
    with pytest.raises(TopologyError, match=r"security\.key_env: the cluster key in \$MY_KEY is 5 bytes; "
                                            r"at least 16 are needed"):
        topo.cluster_key()


def test_cluster_key_file_wins_and_is_relative(tmp_path: Path, write: Callable[[Any], Path]) -> None:
    (tmp_path / "keys").mkdir()
    key_path = tmp_path / "keys" / "cluster.key"
    topo = Topology.load(write(base(security={"key_file": "keys/cluster.key"})))
    assert topo.security.key_file == str(key_path)
    with pytest.raises(TopologyError, match=r"security\.key_file: cannot read .*cluster\.key.*chmod 600"):
        topo.cluster_key(environ={"FLOWSPEC_CLUSTER_KEY": KEY})
    key_path.write_text(KEY[::-1] + "\n")
    os.chmod(key_path, 0o600)
    assert topo.cluster_key(environ={"FLOWSPEC_CLUSTER_KEY": KEY}) == KEY[::-1].encode()
    key_path.write_text("tiny")
    with pytest.raises(TopologyError, match=r"security\.key_file: .* is 4 bytes; at least 16"):
        topo.cluster_key()


def test_yaml_syntax_error_gives_file_and_line(write: Callable[[Any], Path]) -> None:
    text = "cluster: x\nmodel:\n  target: default\nnodes: [\n  {name: a\n"
    msg = load_error(write, text)
    assert "YAML syntax error" in msg
    msg = load_error(write, "cluster: x\nmodel: {}\n  bad: indent\n")
    assert msg.startswith(f"{write('')}".rsplit("/", 1)[0])
    assert ":3:" in msg and "YAML syntax error" in msg


def test_duplicate_yaml_key_gives_line(write: Callable[[Any], Path]) -> None:
    msg = load_error(write, "cluster: x\nmodel: {}\ncluster: y\nnodes: []\n")
    assert "topo.yaml:3:1: YAML syntax error: duplicate key 'cluster'" in msg


def test_empty_and_non_mapping_file(write: Callable[[Any], Path]) -> None:
    assert "the file is empty; a topology needs cluster, model and nodes" in load_error(write, "")
    assert "top level: must be a mapping" in load_error(write, "- a\n- b\n")


# ------------------------------------------------------------------ is_local_host
def test_is_local_host() -> None:
    for h in ("127.0.0.1", "127.3.2.1", "::1", "localhost", "LOCALHOST", socket.gethostname()):
        assert is_local_host(h), h
    for h in ("192.0.2.55", "203.0.113.9", "2001:db8::77"):
        assert not is_local_host(h), h


def test_api_beyond_loopback_needs_a_key_or_an_explicit_opt_out(write: Callable[[Any], Path]) -> None:
    for host in ("0.0.0.0", "192.168.1.20", "source-box"):
        msg = load_error(write, base(api={"host": host, "port": 8000}))
        assert f"api.host: {host} serves the HTTP API beyond this machine without a key" in msg
        assert "api.api_key_env" in msg and "allow_unauthenticated: true" in msg
    for api in ({"host": "0.0.0.0", "port": 8000, "api_key_env": "MY_API_KEY"},
                {"host": "0.0.0.0", "port": 8000, "allow_unauthenticated": True},
                {"host": "127.0.0.1", "port": 8000}, {"host": "localhost", "port": 8000}):
        t = Topology.load(write(base(api=api)))
        assert t.api.host == api["host"]
        assert t.api.allow_unauthenticated is api.get("allow_unauthenticated", False)
    msg = load_error(write, base(api={"host": "127.0.0.1", "allow_unauthenticated": "yes"}))
    assert "api.allow_unauthenticated: must be true or false, not 'yes'" in msg


def test_encrypt_flag(write: Callable[[Any], Path]) -> None:
    assert Topology.load(write(base())).security.encrypt is True
    assert Topology.load(write(base(security={"encrypt": False}))).security.encrypt is False
    assert "security.encrypt: must be true or false, not 1" in load_error(write, base(security={"encrypt": 1}))


def test_resume_window(write: Callable[[Any], Path]) -> None:
    assert Topology.load(write(base())).decoding.resume_window_s == 60.0
    assert Topology.load(write(base(decoding={"resume_window_s": 0}))).decoding.resume_window_s == 0
    msg = load_error(write, base(decoding={"resume_window_s": -1}))
    assert "decoding.resume_window_s: must be a number in [0, 86400], not -1" in msg


def test_spare_nodes(write: Callable[[Any], Path]) -> None:
    d = base(decoding={"failover_after_s": 2})
    d["nodes"].insert(2, {"name": "spare1", "host": "127.0.0.1", "port": 7709, "role": "spare", "memory_gb": 2})
    t = Topology.load(write(d))
    assert [n.name for n in t.stages] == ["stage1", "stage2", "stage3"] and [n.name for n in t.spares] == ["spare1"]
    assert t.successor("stage1").name == "stage2" and t.predecessor("stage2").name == "stage1"  # not in the ring
    assert t.decoding.failover_after_s == 2 and Topology.load(write(base())).decoding.failover_after_s == 5.0
    assert Topology.from_dict(t.to_dict()) == t
    with pytest.raises(TopologyError, match="node 'spare1' is a spare: it has no place in the ring"):
        t.successor("spare1")
    d["nodes"][2].update(layers="0-9", speed=2)
    msg = load_error(write, d)
    assert "nodes[2].layers: a spare holds no layers of its own" in msg and "nodes[2].speed" in msg
    del d["nodes"][2]["layers"], d["nodes"][2]["speed"]
    msg = load_error(write, dict(d, testbed={"cpu_quota": 0.5}))
    assert "testbed: nodes[2] (spare1) is a spare: the emulated testbed" in msg
    only = base()
    only["nodes"] = [only["nodes"][0], d["nodes"][2]]
    assert "nodes: no stage node; at least one node needs role: stage" in load_error(write, only)
    msg = load_error(write, base(decoding={"failover_after_s": -1}))
    assert "decoding.failover_after_s: must be a number in [0, 86400], not -1" in msg
