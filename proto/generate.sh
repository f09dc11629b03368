#!/usr/bin/env bash
# Regenerates the checked-in Python stubs and the descriptor set from the .proto files in this folder.
# The stubs are committed, so installing ttaserve never runs protoc. Run after editing a .proto:
#   pip install "grpcio-tools>=1.75,<1.80" && bash proto/generate.sh
# grpcio-tools is held below 1.80 because later releases generate code for protobuf 7, and
# tritonclient needs protobuf < 7.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
python -m grpc_tools.protoc -I"ttaserve/protocol=$here" \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  --include_imports --descriptor_set_out="$here/descriptor_set.binpb" \
  ttaserve/protocol/kserve_v2.proto ttaserve/protocol/grpc_service.proto ttaserve/protocol/adaptation.proto
cp "$out"/ttaserve/protocol/*.py "$out"/ttaserve/protocol/*.pyi "$here/"
# The service file's own module would register `inference.GRPCInferenceService` in protobuf's global
# pool, clashing with tritonclient's; nothing imports it (the grpc stubs only need the messages), and
# reflection reads the service from descriptor_set.binpb instead.
rm -f "$here/grpc_service_pb2.py" "$here/grpc_service_pb2.pyi" "$here/kserve_v2_pb2_grpc.py"
