#!/usr/bin/env bash
# Create the virtual environment and install qtools with its C++ kernel.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# Build requirements are installed into the venv so rebuilds need no isolation.
"$VENV/bin/python" -m pip install -q "scikit-build-core>=0.10" "nanobind>=2.4" "cmake>=3.18" ninja
# This machine only: tune the kernel for its CPU (the CMake default, used by
# `pip wheel .`, is a portable build).
"$VENV/bin/python" -m pip install -q --no-build-isolation \
  --config-settings=cmake.define.QTOOLS_NATIVE=ON -e ".[test]"
