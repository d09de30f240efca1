#!/usr/bin/env bash
# Install AdapterHub's `adapters` (the reference for the bottleneck-adapter and composition parity
# checks) into its own venv, .venv-adapters: adapters 1.3 pins an older transformers than deltatune's
# .venv has, so the two must never share a site-packages. torch is held at the exact build deltatune
# uses (CPU wheels), so both sides run the same kernels.
#
#     bash benchmarks/setup_adapters.sh        # then: .venv-adapters/bin/python benchmarks/adapterhub_peer.py REQUEST.json OUT/
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-adapters
ADAPTERS_VERSION=${ADAPTERS_VERSION:-1.3.0}
# The full version, local tag included (2.13.0+cpu), so pip cannot swap in a CUDA build of the same release.
TORCH_VERSION=${TORCH_VERSION:-$(.venv/bin/python -c "import torch; print(torch.__version__)" 2>/dev/null || echo 2.13.0+cpu)}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "torch==$TORCH_VERSION" > "$VENV/torch-constraint.txt"
# transformers is left to adapters' own pin; safetensors comes with it.
"$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION" "adapters==$ADAPTERS_VERSION" \
  --constraint "$VENV/torch-constraint.txt"
"$VENV/bin/python" -c "import adapters, torch, transformers, safetensors; print('adapters', adapters.__version__, '| transformers', transformers.__version__, '| torch', torch.__version__, '| safetensors', safetensors.__version__)"
echo "adapters $ADAPTERS_VERSION is set up in $VENV (torch $TORCH_VERSION)"
