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

The package, by role (import the names from ``flowspec.config`` itself):

* :mod:`.schema`: the section dataclasses (ModelSpec, NodeSpec, ...) and allowed values;
* :mod:`.topology`: :class:`Topology` (ring queries, keys, layer resolution, overrides);
* :mod:`.parse`: the field-by-field validation of plain data into a Topology;
* :mod:`.fields`: the readers of one field each, and the list of every problem found;
* :mod:`.yaml_load`: strict YAML reading (duplicate keys refused);
* :mod:`.hosts`: host / address helpers, :func:`is_local_host`;
* :mod:`.messages`: wording helpers of the error messages.
"""

from __future__ import annotations

from ..errors import TopologyError
from ..speculative.params import STRATEGIES, VERIFY_AT  # one list of names; re-exported
from .hosts import _host_key, _is_loopback, _is_wildcard, _local_identity, is_local_host
from .messages import _join, _kind, _suggest
from .parse import _Parser
from .schema import (
    CPU_PERIOD_MS_RANGE, DEFAULT_KEY_ENV, DEFAULT_TARGET, DRAFTER_KINDS, DTYPES, MAX_CPU_QUOTA,
    MIN_KEY_BYTES, ROLES, STAGE_WEIGHTS, ApiSpec, DecodingSpec, DrafterSpec, LinkSpec, ModelSpec, NodeSpec,
    SecuritySpec, TestbedSpec, TreeSpec,
)
from .topology import Topology, _abs_override, _warn_if_readable
from .yaml_load import _parse_yaml, _StrictLoader

__all__ = [
    "CPU_PERIOD_MS_RANGE", "DEFAULT_KEY_ENV", "DEFAULT_TARGET", "DRAFTER_KINDS", "DTYPES",
    "MAX_CPU_QUOTA", "MIN_KEY_BYTES", "ROLES", "STAGE_WEIGHTS", "STRATEGIES", "VERIFY_AT",
    "ApiSpec", "DecodingSpec", "DrafterSpec", "LinkSpec", "ModelSpec", "NodeSpec", "SecuritySpec",
    "TestbedSpec", "Topology", "TopologyError", "TreeSpec", "is_local_host",
    # private helpers, still importable from flowspec.config as before the split
    "_Parser", "_StrictLoader", "_abs_override", "_host_key", "_is_loopback", "_is_wildcard",
    "_join", "_kind", "_local_identity", "_parse_yaml", "_suggest", "_warn_if_readable",
]
