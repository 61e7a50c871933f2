"""Every runtime dependency has at least one ``compat`` test: on the newest versions the ranges allow, CI runs the
unit tier and the ``compat`` tests only (``.ci/run``), so a dependency without one would go untested there."""

from __future__ import annotations

import ast
import re
from importlib.metadata import requires
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


def runtime_dependencies() -> set[str]:
    """The distribution names kotune requires without an extra, normalised (``pyyaml``, ``huggingface-hub``)."""
    names = set()
    for requirement in requires("kotune") or []:
        if "extra ==" not in requirement:
            names.add(normalise(re.match(r"[A-Za-z0-9._-]+", requirement).group(0)))
    return names


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def compat_packages(source: str) -> set[str]:
    """The packages named by ``pytest.mark.compat(...)`` markers in a test module's source."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "compat":
            found |= {normalise(a.value) for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)}
    return found


def test_every_runtime_dependency_has_a_compat_test():
    named = set()
    for path in TESTS.rglob("test_*.py"):
        named |= compat_packages(path.read_text(encoding="utf-8"))
    assert runtime_dependencies(), "kotune's metadata lists no dependency: is it installed?"
    assert sorted(runtime_dependencies() - named) == []
    assert sorted(named - runtime_dependencies()) == [], "a compat marker names a package kotune does not require"


def test_the_scan_reads_markers_on_functions_and_modules():
    source = (
        "import pytest\n"
        'pytestmark = pytest.mark.compat("PyYAML")\n'
        '@pytest.mark.compat("huggingface_hub", "gguf")\n'
        "def test_x(): pass\n"
    )
    assert compat_packages(source) == {"pyyaml", "huggingface-hub", "gguf"}
