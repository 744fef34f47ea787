#!/usr/bin/env bash
# Run an arm64 edgefleet .deb on an x86_64 host under qemu-user-static, as a user would:
#   packaging/smoke-arm64.sh DEB [--gguf]
# installs it with dpkg into a throwaway arm64 Debian root (bookworm, from debootstrap's
# first stage: no arm64 code runs to build it), then in that root, under
# qemu-aarch64-static: `edgefleet --version`, `edgefleet doctor`, and `edgefleet serve` with
# the demo ONNX embedding model, asked over loopback for /v1/embeddings and a KServe v2
# infer (HTTP and gRPC), compared with the same requests to this checkout's own (x86_64) agent.
# --gguf also loads the demo GGUF chat model and asks one short chat.
# Needs root (chroot, mount), qemu-user-static, debootstrap, and `scripts/setup.sh --test`'s
# .venv (the demo weights, the reference agent, tritonclient for gRPC). The arm64 base root is kept in
# $EDGEFLEET_ARM64_ROOT (default dist/arm64-root) and reused; binfmt_misc is not needed:
# the agent is started through qemu-aarch64-static itself, and it execs nothing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/.." && pwd)
deb=$(realpath "${1:?usage: packaging/smoke-arm64.sh DEB [--gguf]}")
gguf=0
[ "${2:-}" = --gguf ] && gguf=1
base=${EDGEFLEET_ARM64_ROOT:-$repo/dist/arm64-root}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
host_python="$repo/.venv/bin/python"
qemu=$(command -v qemu-aarch64-static) || { echo "smoke: apt install qemu-user-static" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "smoke: needs root (chroot, mount)" >&2; exit 2; }
"$host_python" -c 'import tritonclient.grpc' 2>/dev/null || { echo "smoke: run scripts/setup.sh --test first" >&2; exit 2; }
step() { echo "== $*"; }

# 1. an arm64 Debian root with the package's dependencies, unpacked only (dpkg -x)
if [ ! -x "$base/usr/bin/python3.11" ]; then
  command -v debootstrap >/dev/null || { echo "smoke: apt install debootstrap" >&2; exit 2; }
  step "arm64 base root: debootstrap --foreign into $base"
  rm -rf "$base.tmp"
  debootstrap --arch=arm64 --foreign --variant=minbase \
    --include=python3.11,libgomp1,libstdc++6,systemd bookworm "$base.tmp" "$mirror" >/dev/null
  for package in "$base.tmp"/var/cache/apt/archives/*.deb; do dpkg -x "$package" "$base.tmp"; done
  rm -rf "$base.tmp"/var/cache/apt/archives/*.deb "$base.tmp/debootstrap"
  mv "$base.tmp" "$base"
fi

work=$(mktemp -d)
root="$work/root"
agents=()
cleanup() {
  for pid in ${agents[@]+"${agents[@]}"}; do kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null || true; done
  umount "$root/proc/cpuinfo" 2>/dev/null || true
  mountpoint -q "$root/proc" && umount "$root/proc"
  rm -rf "$work"
}
trap cleanup EXIT
cp -a "$base" "$root"
install -m 0755 "$qemu" "$root/usr/bin/qemu-aarch64-static"

# 2. install the package with dpkg, as the amd64 test does (maintainer scripts chrootless)
step "dpkg --root -i $(basename "$deb")"
for d in var/lib/dpkg/info var/lib/dpkg/updates var/lib/dpkg/triggers; do mkdir -p "$root/$d"; done
for f in status available statoverride; do : > "$root/var/lib/dpkg/$f"; done
dpkg --root="$root" --force-script-chrootless --force-depends --force-architecture -i "$deb"
# /proc for psutil; its cpuinfo replaced by the emulated CPU's (packaging/arm64_cpuinfo.py).
# No /sys: with the host's /sys and an x86 /proc/cpuinfo onnxruntime's cpuinfo library
# crashes under qemu (SIGSEGV at import); without it, it warns and falls back.
mount -t proc proc "$root/proc"
chroot "$root" /usr/bin/qemu-aarch64-static /usr/bin/python3.11 - < "$here/arm64_cpuinfo.py" > "$work/cpuinfo"
mount --bind "$work/cpuinfo" "$root/proc/cpuinfo"
in_root() { chroot "$root" /usr/bin/qemu-aarch64-static /opt/edgefleet/venv/bin/python "$@"; }
edgefleet=/opt/edgefleet/venv/bin/edgefleet

step "edgefleet --version (arm64, emulated)"
time in_root "$edgefleet" --version

# 3. the demo bundles (weights from the host's .venv), and a config naming them
models=(all-minilm-l6-v2)
[ "$gguf" = 1 ] && models+=(smollm2-135m-instruct)
"$repo/.venv/bin/edgefleet" demo build --state-dir "$work/host-state" >/dev/null
mkdir -p "$root/var/lib/edgefleet/models"
for m in "${models[@]}"; do cp -a "$work/host-state/models/$m" "$root/var/lib/edgefleet/models/"; done
free_port() { "$host_python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port) grpc_port=$(free_port) host_port=$(free_port) host_grpc_port=$(free_port)
config() {  # state_dir port grpc_port
  printf 'state_dir = "%s"\n[server]\nhost = "127.0.0.1"\nport = %s\ngrpc_port = %s\n[runtime]\nthreads = 2\n' \
    "$1" "$2" "$3"
  for m in "${models[@]}"; do printf '[[models]]\nname = "%s"\n' "$m"; done
}
config /var/lib/edgefleet "$port" "$grpc_port" > "$root/etc/edgefleet/smoke.toml"
config "$work/host-state" "$host_port" "$host_grpc_port" > "$work/host.toml"

step "edgefleet doctor (arm64, emulated)"
doctor=0
time in_root "$edgefleet" doctor --config /etc/edgefleet/smoke.toml || doctor=$?

# 4. serve: arm64 under qemu, and the host's agent as the reference
step "edgefleet serve (arm64, emulated) on 127.0.0.1:$port: ${models[*]}"
start=$(date +%s%N)
chroot "$root" /usr/bin/qemu-aarch64-static /opt/edgefleet/venv/bin/python "$edgefleet" serve \
  --config /etc/edgefleet/smoke.toml > "$work/arm64.log" 2>&1 &
agents+=($!)
"$repo/.venv/bin/edgefleet" serve --config "$work/host.toml" > "$work/host.log" 2>&1 &
agents+=($!)
if ! "$host_python" "$here/smoke_requests.py" wait "http://127.0.0.1:$port" 900 "${agents[0]}"; then
  tail -30 "$work/arm64.log"; exit 1
fi
echo "arm64 agent: start to /readyz 200 (models loaded) $(( ($(date +%s%N) - start) / 1000000 )) ms"
# then until each model has answered its start-up probe (what READY=1 waits for), so the
# probes' work does not land in the timed requests
for _ in $(seq 900); do grep -q ' msg=ready ' "$work/arm64.log" && break; sleep 1; done
grep -q ' msg=ready ' "$work/arm64.log" || { echo "smoke: no 'ready' log line" >&2; tail -30 "$work/arm64.log"; exit 1; }
echo "arm64 agent: start to ready (probes answered) $(( ($(date +%s%N) - start) / 1000000 )) ms"
"$host_python" "$here/smoke_requests.py" wait "http://127.0.0.1:$host_port" 300 "${agents[1]}" >/dev/null || { tail -30 "$work/host.log"; exit 1; }
step "/v1/embeddings and KServe v2 infer of all-minilm-l6-v2 (HTTP and gRPC), 5 times each"
"$host_python" "$here/smoke_requests.py" embed "http://127.0.0.1:$port" all-minilm-l6-v2 5 "127.0.0.1:$grpc_port" \
  > "$work/arm64.json" || { tail -30 "$work/arm64.log"; exit 1; }
"$host_python" "$here/smoke_requests.py" embed "http://127.0.0.1:$host_port" all-minilm-l6-v2 5 \
  "127.0.0.1:$host_grpc_port" > "$work/host.json"
compare=0
"$host_python" "$here/smoke_requests.py" compare "$work/arm64.json" "$work/host.json" || compare=$?
chat=0
if [ "$gguf" = 1 ]; then
  step "/v1/chat/completions, 16 tokens (arm64, emulated)"
  "$host_python" "$here/smoke_requests.py" chat "http://127.0.0.1:$port" smollm2-135m-instruct || chat=$?
  grep -o 'llama.cpp[^"]*CPU[^"]*' "$work/arm64.log" | head -3 || true
fi
step "arm64 agent log (last lines)"
tail -8 "$work/arm64.log"
echo "doctor exit $doctor, compare exit $compare, chat exit $chat"
[ "$compare" = 0 ] && [ "$chat" = 0 ]
