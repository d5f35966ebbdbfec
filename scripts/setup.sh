#!/usr/bin/env bash
# Create (or reuse) .venv and install slimtrain with its test and hf extras (the HF Trainer adapter's tests run in CI). Idempotent: a second run
# installs nothing new. torch is installed first and pinned, because a bare "torch" requirement
# pulls a multi-GB CUDA build: without a GPU we take the CPU build 2.13.0; with one, set
# SLIMTRAIN_TORCH (e.g. "torch==2.11.0") or preinstall the CUDA build you want.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
VPIP=(.venv/bin/python -m pip --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  torch_req=${SLIMTRAIN_TORCH:-torch==2.13.0}
  echo "[setup] installing $torch_req"
  "${VPIP[@]}" install -q "$torch_req"
fi
if ! .venv/bin/python -c "import slimtrain.registry, pytest, hypothesis, torchtitan, setuptools, transformers, accelerate, safetensors" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.slimtrain-installed ]; then
  echo "[setup] installing slimtrain (editable) with its test and hf extras"
  "${VPIP[@]}" install -q setuptools wheel
  "${VPIP[@]}" install -q -e '.[test,hf]'
  touch .venv/.slimtrain-installed
fi
# The released optimizers the method tests compare against (tests/optim/reference_packages.py).
# Without their dependencies: they need transformers for one version check and bitsandbytes for an
# 8-bit variant the tests do not use; the tests import just their optimizer modules.
REFERENCE_PACKAGES=(galore-torch==1.0 fira==1.0.2 apollo-torch==1.0.3 adam-mini==1.1.1)
if ! .venv/bin/python -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('galore_torch') and u.find_spec('fira') and u.find_spec('apollo_torch') and u.find_spec('adam_mini')))"; then
  echo "[setup] installing the reference optimizers (no dependencies): ${REFERENCE_PACKAGES[*]}"
  "${VPIP[@]}" install -q --no-deps "${REFERENCE_PACKAGES[@]}"
fi
# torch.compile on CPU (the suite's compiled runs) generates C++ and calls $CXX or g++.
if ! command -v "${CXX:-g++}" >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "[setup] installing g++ (torch.compile's CPU backend needs a C++ compiler)"
    apt-get install -y -q g++ >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q g++ >/dev/null; }
  else
    echo "[setup] WARNING: no ${CXX:-g++}: --compile.enable on CPU and the suite's compiled runs need a C++ compiler" >&2
  fi
fi
echo "[setup] ready: $(.venv/bin/python -c 'import torch, torchtitan; print("torch", torch.__version__, "torchtitan", getattr(torchtitan, "__version__", "0.2.2"))')"
