#!/usr/bin/env bash
# Runs the GPU paths on a CUDA machine that has no network: the test suites that exercise the engines, strategies
# and sessions with --device auto (= CUDA there), and the GPU benchmarks. Python packages the machine lacks are
# installed from a folder of wheels prepared beforehand on a machine with a package index:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#     --platform manylinux_2_28_x86_64 -d .wheels pydantic pydantic-settings grpcio-health-checking \
#     grpcio-reflection "tritonclient[grpc]" "protobuf>=6.31,<7" "grpcio>=1.78.2"
# Usage: bash scripts/gpu_check.sh [pytest args...]   (SHARED=path/to/shared for the CIFAR-10 tests)
set -euo pipefail
cd "$(dirname "$0")/.."
# The machine's Python that already holds CUDA torch and ONNX Runtime (PYTHON overrides); its environment gets
# the missing packages and an editable ttaserve.
python="${PYTHON:-$(command -v python3)}"
if [ -d .wheels ]; then
  "$python" -m pip install -q --no-index --find-links .wheels --no-deps .wheels/*.whl
fi
"$python" -m pip install -q --no-index --no-build-isolation --no-deps -e .
if [ -n "${SHARED:-}" ] && [ ! -e ../shared ]; then
  ln -s "$(cd "$SHARED" && pwd)" ../shared
fi
"$python" - <<'PY'
import onnxruntime, torch
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
print("onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
PY
"$python" -m pytest -q -p no:cacheprovider "$@"
