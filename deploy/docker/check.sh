#!/usr/bin/env bash
# Builds the server image and serves real requests through it, the way the manifests run it: uid 10001, read-only
# root file system, a writable /tmp, no capabilities. Checks (deploy/docker/smoke.py, from the host's .venv) that the
# embedded Fashion-MNIST model classifies real test images, that an adaptive session steps, and that the server runs
# the prebuilt native front end and C kernels. Needs docker or podman, and .venv (bash scripts/setup.sh).
#
#   bash deploy/docker/check.sh [extra build arguments, e.g. --build-arg BASE=... --build-arg TORCH_INDEX_URL=]
#
# ENGINE=podman|docker picks the tool; ENGINE_FLAGS are put before its subcommands (e.g. "--runtime runc").
set -euo pipefail
cd "$(dirname "$0")/../.."

engine="${ENGINE:-$(command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 && echo docker || echo podman)}"
read -r -a engine_flags <<< "${ENGINE_FLAGS:-}"
image="${IMAGE:-ttaserve:check}"
container="ttaserve-check-$$"

"$engine" "${engine_flags[@]}" build -f deploy/docker/Dockerfile -t "$image" "$@" .

grpc_port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
http_port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
metrics_port=$(.venv/bin/python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cleanup() { "$engine" "${engine_flags[@]}" rm -f "$container" >/dev/null 2>&1 || true; }
trap cleanup EXIT
"$engine" "${engine_flags[@]}" run -d --name "$container" --network host \
  --user 10001:10001 --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
  "$image" serve --host 127.0.0.1 --grpc-port "$grpc_port" --http-port "$http_port" \
  --metrics-port "$metrics_port" >/dev/null

status=0
.venv/bin/python deploy/docker/smoke.py "127.0.0.1:$grpc_port" "http://127.0.0.1:$metrics_port/metrics" \
  "http://127.0.0.1:$http_port" || status=$?
echo "--- server log"
"$engine" "${engine_flags[@]}" logs "$container" 2>&1 | tail -20
"$engine" "${engine_flags[@]}" image ls "$image"
exit "$status"
