#!/usr/bin/env bash
# Create (or reuse) .venv and install slimtrain with its test extra. Idempotent: a second run
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
if ! .venv/bin/python -c "import slimtrain.registry, pytest, hypothesis, torchtitan, setuptools" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.slimtrain-installed ]; then
  echo "[setup] installing slimtrain (editable) with its test extra"
  "${VPIP[@]}" install -q setuptools wheel
  "${VPIP[@]}" install -q -e '.[test]'
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
# Stable-SPAM's released optimizer is no package: its file at a pinned commit, checked by sha256, into
# the ignored .reference/ (tests/methods/test_frontier2_reference.py; skipped there, saying so, without it).
STABLESPAM_URL=https://raw.githubusercontent.com/TianjinYellow/StableSPAM/6a66da1ea7005f7fe7bc570b7968144b42163bed/galore_torch/stablespam.py
STABLESPAM_SHA256=941ac479f926e9179753921bf3a8746ec79ad2ba5faf495c8aa2b50bca1ad69a
if [ ! -f .reference/stablespam.py ]; then
  mkdir -p .reference
  if .venv/bin/python -c "import urllib.request, hashlib, sys; d = urllib.request.urlopen(sys.argv[1], timeout=30).read(); sys.exit(hashlib.sha256(d).hexdigest() != sys.argv[2] or not open('.reference/stablespam.py', 'wb').write(d))" "$STABLESPAM_URL" "$STABLESPAM_SHA256" 2>/dev/null; then
    echo "[setup] fetched the released Stable-SPAM optimizer into .reference/"
  else
    rm -f .reference/stablespam.py
    echo "[setup] could not fetch the released Stable-SPAM optimizer (offline?); its comparison test will skip"
  fi
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
