#!/usr/bin/env bash
# Creates .venv (if absent) and installs the framework from pyproject.toml, each dependency at the version CI tests
# (the lower bound of its range). GPU machines: set TORCH_SPEC to the torch build for your CUDA (e.g.
# TORCH_SPEC="torch==2.13.0" with --index-url for that CUDA) before running this, or install torch first and set
# TORCH_SPEC=skip. EXTRAS adds optional groups of pyproject.toml (e.g. EXTRAS=test,logging,interop).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null
if [ "${TORCH_SPEC:-torch==2.13.0}" != "skip" ]; then
  pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python - > .venv/constraints.txt <<'PY'
import re, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
for spec in project["dependencies"] + sum(project["optional-dependencies"].values(), []):
    name, low = re.match(r"([\w.-]+)>=([^,]+)", spec).groups()
    if name != "torch":  # installed above, or the user's own build
        print(f"{name}=={low}")
PY
pip install -q hatchling editables  # build this package without fetching a build environment (the wheel test too)
pip install -q -c .venv/constraints.txt --no-build-isolation -e ".[${EXTRAS:-test}]"
pip install -q --no-deps $(python -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['tool']['textual-inversion']['no-deps']))")
python -c "import torch, pytorch_lightning, transformers, taming.modules.vqvae.quantize; print('installed: torch', torch.__version__, '| lightning', pytorch_lightning.__version__)"
case ",${EXTRAS:-test}," in  # the diffusers interop tests need it importable, not only installed
  *,interop,*) python -c "import diffusers; print('interop: diffusers', diffusers.__version__)" ;;
esac
