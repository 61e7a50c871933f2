"""The exported demo model in llama.cpp itself: greedy replies to held-out prompts, prompted through the GGUF's own
chat template, are kotune's greedy replies token for token and end at the same EOS.

Needs ``llama-cpp-python`` (it compiles llama.cpp; CI does not build it): skipped when it cannot be imported. The
run recorded in ``bench/RESULTS.md`` ("Export") is ``bench/export_llama_cpp.py``, which this test calls."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest
from conftest import ROOT, run_kotune

try:
    import llama_cpp  # noqa: F401
except ImportError as exc:
    pytest.skip(f"llama-cpp-python is not installed ({exc}); pip install llama-cpp-python", allow_module_level=True)

pytestmark = pytest.mark.llama_cpp

ROWS = 8
"""Held-out rows compared (of 30; the recorded bench run compares all of them)."""
MAX_NEW_TOKENS = 96


def bench_module():
    spec = importlib.util.spec_from_file_location("export_llama_cpp", ROOT / "bench" / "export_llama_cpp.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_llama_cpp_replies_equal_kotunes(demo_run, tmp_path):
    """f32 export of the demo run (merged first by ``kotune export``): same prompt ids, same replies, same endings."""
    out = tmp_path / "demo-f32.gguf"
    result = run_kotune(["export", str(demo_run), "--format", "gguf", "--quant", "f32", "--out", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    bench = bench_module()
    rows = [json.loads(line) for line in bench.HELDOUT.read_text(encoding="utf-8").splitlines()[:ROWS]]
    results = bench.compare(demo_run / "merged", out, rows, MAX_NEW_TOKENS)
    assert all(r.prompt_same for r in results), "llama.cpp tokenized the GGUF template's prompt differently"
    assert any(r.kotune_stopped for r in results), "the demo model should end some replies with EOS"
    assert [r.index for r in results if not r.same] == []
