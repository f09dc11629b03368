#!/usr/bin/env bash
# One command from a fresh clone to a running server on the embedded Fashion-MNIST model (gRPC :8001, metrics :8002).
# Extra arguments go to `ttaserve serve` (e.g. --model-repository DIR --grpc-port 9001).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/ttaserve serve "$@"
