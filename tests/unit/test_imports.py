"""The package's import graph keeps the layering ``docs/architecture.md`` states: no import circle between files,
and no import that runs up the layers (so no circle between folders either).

Every import statement counts, also one inside a function or under ``if TYPE_CHECKING``: a lazy import is still a
dependency, only a later one.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "kotune"

LAYERS = (
    (
        "__init__",
        "errors",
        "output",
        "config",
        "config_load",
        "preference_config",
        "grpo_config",
        "source_config",
        "security",
        "paths",
        "hashing",
        "presets",
    ),
    ("data",),
    ("run_folder",),
    ("fast",),
    ("model",),
    ("plan",),
    ("inference",),
    ("rl",),
    ("evaluation",),
    ("training",),
    ("export",),
    ("commands", "cli", "docs", "__main__", "ui"),
)
"""Bottom to top, as ``docs/architecture.md`` draws them: a module may import its own layer and those below."""


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = ("kotune", *path.relative_to(PACKAGE).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(known: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the kotune modules it imports (``from a import b`` is ``a.b`` when that is a module)."""
    edges = {}
    for name, path in known.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("kotune"):
                for alias in node.names:
                    child = f"{node.module}.{alias.name}"
                    targets.add(child if child in known else node.module)
            elif isinstance(node, ast.Import):
                targets |= {a.name for a in node.names if a.name.startswith("kotune")}
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                raise AssertionError(f"{path}: relative import; kotune imports by absolute name")
        edges[name] = {t for t in targets if t in known and t != name}
    return edges


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for rank, names in enumerate(LAYERS):
        if top in names:
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS here and to docs/architecture.md")


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], 0
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
            elif child not in index:
                index[child] = low[child] = counter
                counter += 1
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_no_import_circle_between_files():
    assert circles(imports(modules())) == []


def test_no_import_runs_up_the_layers():
    edges = imports(modules())
    upward = sorted(f"{a} -> {b}" for a, targets in edges.items() for b in targets if layer(b) > layer(a))
    assert upward == []


def test_the_checks_find_a_circle_and_an_upward_import():
    """The walker itself: a two-module circle and a data module importing training are reported."""
    edges = {"kotune.data.a": {"kotune.data.b"}, "kotune.data.b": {"kotune.data.a", "kotune.training.loop"}}
    edges["kotune.training.loop"] = set()
    assert circles(edges) == [["kotune.data.a", "kotune.data.b"]]
    assert layer("kotune.training.loop") > layer("kotune.data.b")
    assert layer("kotune.config") < layer("kotune.data.read") < layer("kotune.commands.train")
