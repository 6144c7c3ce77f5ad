"""The house rules, enforced by reading the source: every import arrow in flowspec/ points
down, and no module is too long.

Each top-level module or package of ``flowspec/`` belongs to one layer. A module may import
its own layer and the layers below it, never one above. Every import counts: absolute and
relative, at module level, inside functions, under ``TYPE_CHECKING``, and
``importlib.import_module`` with a literal name.

====  =========  =====================================================================
rank  layer      top-level modules of flowspec/
====  =========  =====================================================================
0     base       ``__init__`` (the version), ``errors``, ``telemetry``
1     engine     ``model/``
2     algorithm  ``speculative/``
3     topology   ``config/``, ``layer_plan``: the topology file, which embeds the
                 algorithm's settings (``speculative.params``)
4     runtime    ``runtime/``
5     testbed    ``testbed/``: emulated links and CPU caps around nodes that the
                 runtime's launcher starts
6     faces      everything else: ``api``, ``api_request``, ``api_format``, ``api_http``,
                 ``metrics``, ``chat/``, ``cli``, ``cli_common``, ``commands``, ``check``,
                 ``footprint``, ``profile_hops``, ``bench/``, ``training/``, and any new
                 top-level module until it is placed in a lower layer here
====  =========  =====================================================================

So ``model/`` imports nothing of ``speculative/``, the runtime or a face; ``speculative/`` nothing of the
runtime or a face; ``runtime/`` no face; and ``runtime/`` and ``testbed/`` cannot import each
other in a cycle (the testbed sits above the runtime, which never imports it).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flowspec"

LAYER_NAMES = ("base", "engine", "algorithm", "topology", "runtime", "testbed", "faces")
# top-level module or package -> rank; anything not named here is a face (the top)
LAYERS: dict[str, int] = {
    "__init__": 0, "errors": 0, "telemetry": 0,
    "model": 1,
    "speculative": 2,
    "config": 3, "layer_plan": 3,
    "runtime": 4,
    "testbed": 5,
}
FACES = len(LAYER_NAMES) - 1
MAX_LINES = 500  # a hard ceiling above the ~450 lines a module should aim for


@dataclass(frozen=True)
class Arrow:
    """One import: `source` (a file) imports the module `target` at `line`."""

    source: Path
    line: int
    target: str


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package at `root` (packages by __init__)."""
    out: dict[str, Path] = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _literal_import(node: ast.Call) -> str | None:
    """The name in `importlib.import_module("...")` or `__import__("...")`, when literal."""
    f = node.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name in ("import_module", "__import__") and node.args:
        arg = node.args[0]
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
    return None


def arrows(root: Path) -> list[Arrow]:
    """Every import of the package at `root` that names one of its own modules."""
    top = root.name
    mods = module_names(root)
    out: list[Arrow] = []
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    frm = ".".join(base + ([node.module] if node.module else []))
                else:
                    frm = node.module or ""
                # `from pkg import sub` imports the module pkg.sub where there is one
                targets = [f"{frm}.{a.name}" if f"{frm}.{a.name}" in mods else frm for a in node.names]
            elif isinstance(node, ast.Call):
                lit = _literal_import(node)
                targets = [lit] if lit else []
            out += [Arrow(path, node.lineno, t) for t in targets if t == top or t.startswith(top + ".")]
    return out


def unit(dotted: str) -> str:
    """The top-level module or package a dotted name belongs to ("__init__" for the package itself)."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def rank(dotted: str) -> int:
    return LAYERS.get(unit(dotted), FACES)


def upward(root: Path) -> list[str]:
    """Every import that points to a higher layer, as one readable line each."""
    names = {p: n for n, p in module_names(root).items()}
    bad = []
    for a in arrows(root):
        src = names[a.source]
        if rank(a.target) > rank(src):
            bad.append(f"{a.source.relative_to(root.parent)}:{a.line} imports {a.target} "
                       f"({LAYER_NAMES[rank(src)]} -> {LAYER_NAMES[rank(a.target)]})")
    return bad


def too_long(root: Path, limit: int) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        n = len(path.read_text().splitlines())
        if n > limit:
            out.append(f"{path.relative_to(root.parent)}: {n} lines")
    return out


# ---------------------------------------------------------------------------- the rules
def test_every_import_points_down() -> None:
    found = arrows(PACKAGE)
    assert len(found) > 50, "the import walker found almost nothing: it is broken"
    bad = upward(PACKAGE)
    assert not bad, ("imports that point up a layer (see this test's docstring for the layers):\n  "
                     + "\n  ".join(bad))


def test_every_named_layer_exists() -> None:
    """A renamed or removed package must move in the table too, or it would silently become a
    face and lose its checks."""
    present = {p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
               if (p.is_file() and p.suffix == ".py") or (p / "__init__.py").is_file()}
    missing = sorted(set(LAYERS) - present)
    assert not missing, f"the layer table names modules flowspec/ no longer has: {missing}"


def test_no_module_is_over_the_ceiling() -> None:
    long = too_long(PACKAGE, MAX_LINES)
    assert not long, f"modules over {MAX_LINES} lines (split them by job):\n  " + "\n  ".join(long)


# ------------------------------------------------------------- the checker can fail
def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)


@pytest.fixture()
def fake_package(tmp_path: Path) -> Path:
    root = tmp_path / "flowspec"
    _write(root, {
        "__init__.py": "__version__ = '0'\n",
        "errors.py": "", "api.py": "", "bench/__init__.py": "", "bench/run.py": "",
        "chat/__init__.py": "", "chat/view.py": "", "testbed/__init__.py": "",
        "model/__init__.py": "", "model/blocks.py": "from ..runtime import protocol\n",
        "speculative/__init__.py": "", "speculative/tree.py": "import flowspec.model.blocks\n",
        "runtime/__init__.py": "from .. import api\n",
        "runtime/protocol.py": "from .. import errors\nfrom flowspec import __version__\n",
        "runtime/node.py": (
            "import os\n"
            "from .protocol import x\n"
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n"
            "    from ..testbed import ring\n"
            "def f():\n"
            "    from flowspec.chat import view\n"
            "    import flowspec.bench.run as r\n"
            "    import importlib\n"
            "    return importlib.import_module('flowspec.cli')\n"
        ),
    })
    return root


def test_checker_catches_every_form_of_import(fake_package: Path) -> None:
    got = sorted(line.split(" (")[0] for line in upward(fake_package))
    assert got == [
        "flowspec/model/blocks.py:1 imports flowspec.runtime.protocol",
        "flowspec/runtime/__init__.py:1 imports flowspec.api",
        "flowspec/runtime/node.py:10 imports flowspec.cli",
        "flowspec/runtime/node.py:5 imports flowspec.testbed",
        "flowspec/runtime/node.py:7 imports flowspec.chat.view",
        "flowspec/runtime/node.py:8 imports flowspec.bench.run",
    ]
    # arrows down and within a layer are fine; names from a module are not modules
    targets = {a.target for a in arrows(fake_package) if a.source.name == "protocol.py"}
    assert targets == {"flowspec.errors", "flowspec"}
    assert any("(runtime -> faces)" in line for line in upward(fake_package))


def test_checker_flags_long_modules(tmp_path: Path) -> None:
    _write(tmp_path / "pkg", {"short.py": "x = 1\n" * 500, "long.py": "x = 1\n" * 501})
    assert too_long(tmp_path / "pkg", 500) == ["pkg/long.py: 501 lines"]
