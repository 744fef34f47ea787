#!/usr/bin/env bash
# The whole signed-update loop on one machine, with the demo models:
#   a local mosquitto (installed from Debian's packages when missing),
#   a hub whose keys sign the demo bundles (edgefleet hub init / publish / serve),
#   an agent in group "demo" that serves them, hears a new release over MQTT,
#   verifies it through TUF, swaps it in and reports every step.
# Everything lives in a temporary directory and stops when the script ends.
#   scripts/demo-updates.sh            run it and clean up
#   DEMO_DIR=/tmp/x scripts/demo-updates.sh   keep the files there for a look afterwards
set -euo pipefail
cd "$(dirname "$0")/.."

ef=.venv/bin/edgefleet
py=.venv/bin/python
[ -x "$ef" ] || { echo "run scripts/setup.sh first" >&2; exit 1; }

mosquitto=$(command -v mosquitto || true)
[ -n "$mosquitto" ] || [ ! -x /usr/sbin/mosquitto ] || mosquitto=/usr/sbin/mosquitto
if [ -z "$mosquitto" ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
    echo "demo: please install mosquitto (needs root and apt-get)" >&2; exit 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
  mosquitto=$(command -v mosquitto || echo /usr/sbin/mosquitto)
fi

demo=${DEMO_DIR:-$(mktemp -d -t edgefleet-demo.XXXXXX)}
mkdir -p "$demo"
free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
mqtt_port=$(free_port); hub_port=$(free_port); agent_port=${AGENT_PORT:-$(free_port)}
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  [ -n "${DEMO_DIR:-}" ] || rm -rf "$demo"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }

step "a local broker on 127.0.0.1:$mqtt_port"
user=""; [ "$(id -u)" -ne 0 ] || user="user root"
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n%s\n' "$mqtt_port" "$user" > "$demo/mosquitto.conf"
"$mosquitto" -c "$demo/mosquitto.conf" >"$demo/mosquitto.log" 2>&1 & pids+=($!)

step "the demo bundles, laid out in the agent's store"
$ef demo build --state-dir "$demo/agent"

step "a hub: keys (0600), a TUF repository, the demo models published for group 'demo'"
$ef hub init --hub "$demo/hub" --root-keys 2 --root-threshold 2
$ef hub publish --hub "$demo/hub" --group demo --mqtt "127.0.0.1:$mqtt_port" \
  "$demo/agent/models/smollm2-135m-instruct/current" "$demo/agent/models/all-minilm-l6-v2/current"
$ef hub serve --hub "$demo/hub" --port "$hub_port" >"$demo/hub.log" 2>&1 & pids+=($!)

step "an agent in group 'demo' (its trust root: the hub's trust-root.json)"
cat > "$demo/agent.toml" <<EOF
state_dir = "$demo/agent"
[server]
port = $agent_port
[[models]]
name = "smollm2-135m-instruct"
[[models]]
name = "all-minilm-l6-v2"
[mqtt]
host = "127.0.0.1"
port = $mqtt_port
device_id = "demo-device"
group = "demo"
[updates]
hub_url = "http://127.0.0.1:$hub_port"
trust_root = "$demo/hub/trust-root.json"
health_check_interval_s = 0.2
EOF
$ef serve --config "$demo/agent.toml" >"$demo/agent.log" 2>&1 & pids+=($!)
ready() { "$py" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=2)' \
  "http://127.0.0.1:$agent_port/readyz" 2>/dev/null; }
for _ in $(seq 600); do ready && break; sleep 0.1; done
ready || { tail -20 "$demo/agent.log"; exit 1; }
$ef hub status --mqtt "127.0.0.1:$mqtt_port"

step "a new release of the embedding model: a longer max_length, same weights"
new="$demo/release/all-minilm-l6-v2"
mkdir -p "$new" && cp "$demo/agent/models/all-minilm-l6-v2/current/"* "$new/"
sed -i 's/^version = .*/version = "int8-1.0.0-r2"/; s/^max_length = .*/max_length = 512/' "$new/model.toml"
$ef hub status --mqtt "127.0.0.1:$mqtt_port" --follow 120 --until active > "$demo/rollout.txt" & follower=$!
sleep 0.5
$ef hub publish --hub "$demo/hub" --group demo --mqtt "127.0.0.1:$mqtt_port" "$new"

step "the agent hears the doorbell, verifies, swaps, reports each step (read from MQTT by the hub)"
wait "$follower" || { echo "no update reached 'active'"; tail -20 "$demo/agent.log"; exit 1; }
cat "$demo/rollout.txt"
$ef hub status --mqtt "127.0.0.1:$mqtt_port"
"$py" -c 'import json, sys, urllib.request
m = json.load(urllib.request.urlopen(sys.argv[1]))
print("serving", m["name"], "version", m["versions"][0])' "http://127.0.0.1:$agent_port/v2/models/all-minilm-l6-v2"
