"""Strict YAML reading of topology files: duplicate keys and syntax errors become TopologyError.

The message of a syntax error names the file, line and column (``x.yaml:3:7: YAML syntax
error: ...``).
"""

from __future__ import annotations

from typing import Any

import yaml

from ..errors import TopologyError


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
