#!/usr/bin/env bash
# Every GPU goal of the project in one prepared run (slimtrain/gpu_check.py says what and how).
# On the GPU machine: carry .whl (shared/gpu/prepare-wheels.sh) and a prepared corpus (.gpu-data);
# this installs the wheels into .site when torchtitan is missing, then runs the check.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torchtitan" 2>/dev/null && [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target .site .whl/*.whl
fi
export PYTHONPATH="$PWD/.site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" -m slimtrain.gpu_check "$@"
