#!/usr/bin/env bash
# Set up kotune for development and tests on a fresh machine, in a virtual environment of its own (.venv, or
# $KOTUNE_VENV), so nothing already installed on the machine is used by accident:
#   torch (2.13.0; the CPU build where the machine offers one), kotune with its test, eval and ui extras (lm-eval,
#   the web page's server; in CI also Debian's Chromium and chromedriver for the page's browser tests) and,
#   on the lock, the quantize extra (llama-cpp-python, compiled once), the real test assets.
# KOTUNE_DEPS=lock (default): every package at the version in constraints/lock.txt, the set CI tested.
# KOTUNE_DEPS=latest: the newest versions the ranges in pyproject.toml allow (CI tests this set too).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${KOTUNE_VENV:-.venv}
case "${KOTUNE_DEPS:-lock}" in
  lock) pins=(-c constraints/lock.txt) extras=dev,eval,quantize,ui ;;
  latest) pins=(--upgrade --upgrade-strategy eager) extras=dev,eval,ui ;;
  *) echo "setup.sh: KOTUNE_DEPS must be 'lock' or 'latest', not '${KOTUNE_DEPS}'" >&2; exit 2 ;;
esac
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --upgrade pip
"$py" -m pip install -q "torch==2.13.0"   # on a GPU machine, install your CUDA build of torch into the venv first
# quantize: llama-cpp-python, compiled here once (a few minutes), for the k-quant exports and llama.cpp's own check
CMAKE_ARGS="${CMAKE_ARGS:--DLLAVA_BUILD=OFF}" "$py" -m pip install -q "${pins[@]}" -e ".[$extras]"
"$py" -m kotune.model.assets fetch-test-assets
# ui: its browser tests drive the system Chromium through chromedriver (no browser is downloaded); in CI (root on
# Debian) install both from Debian's packages, elsewhere say how (the tests skip, saying why, without them)
if ! command -v chromedriver >/dev/null; then
  if [ "${CI:-}" = true ] && [ "$(id -u)" = 0 ] && [ -f /etc/debian_version ] && command -v apt-get >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver
  else
    echo "kotune: for the ui browser tests install Chromium and its driver (Debian: apt-get install chromium chromium-driver)"
  fi
fi
echo "kotune: set up in $venv (${KOTUNE_DEPS:-lock} versions); run tests with: $venv/bin/python -m pytest -q"
