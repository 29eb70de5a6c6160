#!/usr/bin/env bash
# Creates .venv (if absent) and installs the framework with its pinned CPU stack.
# GPU machines: set TORCH_SPEC to the torch build for your CUDA (e.g. TORCH_SPEC="torch==2.9.1"
# with --index-url for that CUDA) before running this, or install torch first and set TORCH_SPEC=skip.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null
if [ "${TORCH_SPEC:-torch==2.13.0}" != "skip" ]; then
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
pip install -q -r requirements.txt
pip install -q --no-deps -r requirements-nodeps.txt
pip install -q hatchling editables  # build this package without fetching a build environment (the wheel test too)
pip install -q --no-deps --no-build-isolation -e .
python -c "import torch, pytorch_lightning, transformers, taming.modules.vqvae.quantize; print('installed: torch', torch.__version__, '| lightning', pytorch_lightning.__version__)"
