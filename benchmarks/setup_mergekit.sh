#!/usr/bin/env bash
# Install mergekit (the benchmark's reference) into its own venv, .venv-mergekit, so that its pins
# never touch deltatune's .venv. torch is held at the version deltatune uses (CPU wheels), so both
# sides run the same kernels.
#
#     bash benchmarks/setup_mergekit.sh        # then: python benchmarks/merge_vs_mergekit.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-mergekit
MERGEKIT_VERSION=${MERGEKIT_VERSION:-0.1.5}
TORCH_VERSION=${TORCH_VERSION:-$(.venv/bin/python -c "import torch; print(torch.__version__.split('+')[0])" 2>/dev/null || echo 2.13.0)}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "torch==$TORCH_VERSION" > "$VENV/torch-constraint.txt"
"$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "mergekit==$MERGEKIT_VERSION" \
  --constraint "$VENV/torch-constraint.txt"
"$VENV/bin/mergekit-yaml" --help > /dev/null
echo "mergekit $MERGEKIT_VERSION is set up in $VENV (torch $TORCH_VERSION)"
