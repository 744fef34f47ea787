"""What telemetry costs an idle agent: CPU share and resident memory, on against off.

    .venv/bin/python bench/bench_telemetry.py [--seconds 30] [--models chat,embed]

In one run, starts a mosquitto on a loopback port, then the same agent
(`edgefleet serve`, the demo models loaded) twice, one after the other:
telemetry off (`[telemetry] enabled = false`, no MQTT) and telemetry on (MQTT,
a record every 1 s, energy sampled every 1 s). Each waits until ready, settles,
then measures its CPU time and RSS over a quiet interval with no requests.
Prints both, the difference and the ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from mqtt_broker import MosquittoBroker, free_port  # noqa: E402

from agent.cli.demo import CHAT_MODEL, EMBEDDING_MODEL, build_demo_bundles  # noqa: E402


def measure(config_text: str, seconds: float, state: Path) -> tuple[float, int]:
    """(CPU share of one core, RSS bytes) of an idle agent over `seconds`."""
    port = free_port()
    path = state / f"agent-{port}.toml"
    path.write_text(f'state_dir = "{state}"\n[server]\nport = {port}\n' + config_text)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    proc = subprocess.Popen([sys.executable, "-m", "agent", "serve", "--config", str(path)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("the agent did not get ready")
            time.sleep(0.2)
        time.sleep(3)  # let start-up settle
        process = psutil.Process(proc.pid)
        cpu0, t0 = sum(process.cpu_times()[:2]), time.monotonic()
        time.sleep(seconds)
        cpu1, t1 = sum(process.cpu_times()[:2]), time.monotonic()
        return (cpu1 - cpu0) / (t1 - t0), process.memory_info().rss
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--models", default="chat,embed", help="demo models to load: chat, embed, or none")
    parser.add_argument("--rounds", type=int, default=2, help="off/on pairs, alternating; the median is shown")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="edgefleet-telemetry-bench-"))
    build_demo_bundles(state / "models")
    names = {"chat": CHAT_MODEL, "embed": EMBEDDING_MODEL}
    models = "".join(f'[[models]]\nname = "{names[m]}"\n' for m in args.models.split(",") if m in names)
    broker = MosquittoBroker(state)
    broker.start()
    offs, ons = [], []
    try:
        for _ in range(args.rounds):
            offs.append(measure("[telemetry]\nenabled = false\n" + models, args.seconds, state))
            ons.append(measure(f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\ndevice_id = "bench"\n'
                               "[telemetry]\ninterval_s = 1.0\nenergy_sample_s = 1.0\n" + models, args.seconds, state))
    finally:
        broker.stop()
    for i, (a, b) in enumerate(zip(offs, ons, strict=True)):
        print(f"round {i + 1}: off {a[0] * 100:.3f} % CPU {a[1] / 2**20:.1f} MiB; on {b[0] * 100:.3f} % CPU "
              f"{b[1] / 2**20:.1f} MiB")
    off = (statistics.median(a[0] for a in offs), statistics.median(a[1] for a in offs))
    on = (statistics.median(b[0] for b in ons), statistics.median(b[1] for b in ons))
    print(f"idle agent, {args.models or 'no'} models, {args.seconds:.0f} s each, {psutil.cpu_count()} CPUs, "
          f"median of {args.rounds}")
    print(f"{'':28} {'CPU (% of one core)':>20} {'RSS (MiB)':>10}")
    print(f"{'telemetry off':28} {off[0] * 100:>20.3f} {off[1] / 2**20:>10.1f}")
    print(f"{'telemetry on, 1 s interval':28} {on[0] * 100:>20.3f} {on[1] / 2**20:>10.1f}")
    print(f"{'difference':28} {(on[0] - off[0]) * 100:>20.3f} {(on[1] - off[1]) / 2**20:>10.1f}")
    print(f"{'ratio on/off':28} {on[0] / max(off[0], 1e-9):>20.2f} {on[1] / off[1]:>10.3f}")


if __name__ == "__main__":
    main()
