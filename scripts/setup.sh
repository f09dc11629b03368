#!/usr/bin/env bash
# Sets up everything ttaserve needs on a fresh Debian/Ubuntu machine: system packages used by the tests (real
# Fashion-MNIST data, a real Prometheus server and nginx), a virtual environment in .venv, the CPU build of PyTorch
# (installed first, so pip never pulls the multi-GB CUDA build), and ttaserve itself with its server, eval and test
# extras. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_packages=(dataset-fashion-mnist prometheus nginx-light)
missing=()
for package in "${apt_packages[@]}"; do
  dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  else
    echo "setup: cannot install ${missing[*]} (needs root and apt-get); tests that need them will skip" >&2
  fi
fi

python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
  # Pinned first so the package's own range (torch>=2.4) never resolves to something else. On a GPU machine,
  # install your CUDA build of torch into .venv before running this script and it is kept.
  pip install -q "torch==2.13.0"
fi
pip install -q -e ".[server,eval,test]"
echo "setup: done ($(python -c 'import torch; print("torch", torch.__version__)'))"
