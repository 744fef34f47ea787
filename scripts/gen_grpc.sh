#!/usr/bin/env bash
# Regenerate the KServe v2 (Open Inference Protocol) gRPC message and service code.
#
#   scripts/gen_grpc.sh [OUT_ROOT]      (default: the repository itself)
#
# Input: agent/kserve/proto/open_inference_grpc.proto, byte for byte the upstream file
#   https://github.com/kserve/open-inference-protocol/blob/eeb043e2c95c1dd35f8b9185f5dadf44c7f10c9f/specification/protocol/open_inference_grpc.proto
#   (sha256 below; package `inference`, service `inference.GRPCInferenceService`, the same wire
#   format as Triton's grpc_service.proto, of which it is the subset every v2 server serves).
# Tool: grpcio-tools at the exact version pinned in pyproject.toml's test extra, so the output
#   is the same on every machine; tests/test_kserve_grpc.py regenerates into a temp dir and
#   compares with the committed files.
set -euo pipefail
cd "$(dirname "$0")/.."
PROTO=agent/kserve/proto/open_inference_grpc.proto
SHA256=0f715460d60b014a23e06ac8e768cfa3d8336221cdb66bd7aeeab6dc27620b0f
OUT=${1:-.}
PY=${PYTHON:-.venv/bin/python}

echo "$SHA256  $PROTO" | sha256sum --check --quiet || {
    echo "gen_grpc.sh: $PROTO is not the upstream file (sha256 differs)" >&2; exit 1; }
mkdir -p "$OUT/agent/kserve/proto"
# -I . makes the generated service module import the messages as agent.kserve.proto.*
"$PY" -m grpc_tools.protoc -I . --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" "$PROTO"
