"""The layering of ``docs/architecture.md`` is the one the code has: no module imports one of a higher layer, and
no two files import each other, directly or around a loop (imports inside functions count too: they are still a
dependency). Read from the source with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import kotune

PACKAGE = Path(kotune.__file__).parent
CORE = {"errors", "output", "config", "config_load", "preference_config", "security", "paths", "hashing"}
"""Top-level modules below every wing (``run_folder`` is its own layer, above ``data``)."""
LAYERS = ["core", "data", "run_folder", "fast", "model", "plan", "inference", "evaluation", "training", "export", "top"]
"""Lowest first: a module may import its own layer and those before it."""

PENDING = {
    "kotune.model.build -> kotune.training.dist",
    "kotune.model.build -> kotune.training.fsdp",
    "kotune.plan.estimate -> kotune.training.order",
    "circle: kotune.training.dist, kotune.training.fsdp",
    "circle: kotune.training.loop, kotune.training.resume",
    "circle: kotune.training.preference_recipe, kotune.training.recipe",
}
"""What the rewrite of ``training/`` (issue 27) removes; take each line out as it goes."""


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    if module == "kotune":  # the package's __init__: its version
        return "core"
    head = module.split(".")[1]
    if head in CORE:
        return "core"
    return "top" if head in ("commands", "cli", "docs", "__main__") else head


def import_graph() -> dict[str, set[str]]:
    """Module -> the kotune modules it imports (``from package import submodule`` names the submodule)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kotune":
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in files]
                targets = subs if len(subs) == len(node.names) else [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[module].update(t for t in targets if t in files and t != module)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_runs_up_the_layers_or_around_a_circle():
    graph = import_graph()
    upward = {
        f"{a} -> {b}"
        for a, targets in graph.items()
        for b in targets
        if LAYERS.index(layer(b)) > LAYERS.index(layer(a))
    }
    found = upward | {f"circle: {', '.join(group)}" for group in circles(graph)}
    assert found - PENDING == set(), "imports against docs/architecture.md's layering"
    assert PENDING - found == set(), "fixed: take these out of PENDING"


def test_every_folder_and_top_level_module_has_a_layer():
    names = {module_name(p).split(".")[1] for p in PACKAGE.rglob("*.py") if module_name(p) != "kotune"}
    assert {layer(f"kotune.{n}") for n in names} <= set(LAYERS)
