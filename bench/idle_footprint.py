"""Resident memory and CPU of an idle agent with no models, and what the memory is spent on.

    .venv/bin/python bench/idle_footprint.py [--seconds 30] [--config agent.toml]

Starts `edgefleet serve` with an empty state directory and no config (or the
TOML given, to see what a feature adds), under ``python -X importtime``, waits
until it answers /readyz, then samples its RSS and CPU time over a quiet
interval (no requests), and once more after one /metrics scrape. Then it says
where the memory goes, three ways:

- the feature packages (numpy, python-tuf, paho-mqtt, grpc, cryptography, ...) the
  process imported: with nothing configured the list is empty;
- its resident pages by mapping (/proc/PID/smaps): the Python heap, libpython,
  and each native library, grouped by the package that ships it;
- the top-level packages it imported (the interpreter's own ``-X importtime``
  record), the most expensive first: how many modules, how long their imports
  took, and what each adds to the RSS of an interpreter that has imported aiohttp.web
  (the floor every agent pays; aiohttp's own row is against a bare interpreter), its
  modules imported alone there (dependencies they share count in each, so the
  column does not add up).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
#: Packages a feature brings: a model's runtime, [mqtt], [updates], gRPC, TLS, the audit log's key.
HEAVY = ("numpy", "onnxruntime", "llama_cpp", "tokenizers", "jinja2", "paho", "tuf", "securesystemslib",
         "urllib3", "cryptography", "grpc", "google", "tqdm")
#: How many packages get their "alone" RSS measured (one interpreter start each).
MEASURED = 12


def imported(importtime: str) -> dict[str, tuple[list[str], int]]:
    """Top-level package -> (its modules the process imported, their summed self time in µs),
    from ``-X importtime``."""
    packages: dict[str, tuple[list[str], list[int]]] = collections.defaultdict(lambda: ([], [0]))
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        self_us, _cumulative, name = line[len("import time:"):].split("|")
        modules, us = packages[name.strip().split(".")[0]]
        modules.append(name.strip())
        us[0] += int(self_us)
    return {name: (modules, us[0]) for name, (modules, us) in packages.items()}


def mapped_rss(pid: int) -> collections.Counter[str]:
    """Resident KiB per mapping group: the Python heap (anonymous memory), libpython, and
    native libraries grouped by the site-packages package (or system library) they come from."""
    groups: collections.Counter[str] = collections.Counter()
    name = ""
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = re.match(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$", line)
        if head:
            name = head.group(1).strip()
        elif line.startswith("Rss:"):
            groups[_group(name)] += int(line.split()[1])
    return groups


def _group(path: str) -> str:
    if not path or path in ("[heap]", "[stack]") or path.startswith("[anon"):
        return "Python objects and heap (anonymous)"
    if path.startswith("["):
        return path
    site = re.search(r"site-packages/([^/]+)", path)
    if site:
        return re.sub(r"(\.libs|-[0-9].*|\.cpython.*|\.abi3.*)$", "", site.group(1)) + " (native)"
    if "lib-dynload" in path:
        return "stdlib extension modules (lib-dynload)"
    return Path(path).name


def alone_rss_mib(modules: list[str], floor: bool) -> float | None:
    """RSS that importing `modules` (one package's, as the agent imported them) adds to an
    interpreter (with `floor`, one that has imported aiohttp.web)."""
    code = ("import contextlib, importlib, re\n" + ("import aiohttp.web\n" if floor else "") +
            "def rss(): return int(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))\n"
            "before = rss()\n"
            f"for name in {modules!r}:\n"
            "    with contextlib.suppress(Exception):\n"
            "        importlib.import_module(name)\n"
            "print(rss() - before)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False)
    return int(done.stdout) / 1024 if done.returncode == 0 and done.stdout.strip().isdigit() else None


def report(pid: int, importtime: str) -> None:
    packages = imported(importtime)
    heavy = sorted(p for p in packages if p in HEAVY)
    print(f"feature packages imported: {', '.join(heavy) if heavy else 'none'}")
    groups = mapped_rss(pid)
    total = sum(groups.values())
    print(f"\nresident memory by mapping (total {total / 1024:.1f} MiB):")
    for name, kib in groups.most_common(8):
        print(f"  {kib / 1024:6.1f} MiB  {name}")
    print(f"\nimported: {sum(len(m) for m, _ in packages.values())} modules in {len(packages)} top-level packages; "
          "the costliest imports:")
    print("  package              modules  import ms  RSS over aiohttp (MiB)")
    costliest = sorted(packages.items(), key=lambda item: -item[1][1])[:MEASURED]
    for name, (modules, us) in costliest:
        alone = alone_rss_mib(modules, floor=name not in ("aiohttp", "asyncio"))
        shown = f"{alone:6.1f}" if alone is not None else "     -"
        print(f"  {name:20} {len(modules):7}  {us / 1000:9.1f}  {shown}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--config", type=Path, help="a TOML config, to see what its features add (default: none)")
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = tempfile.mkdtemp(prefix="edgefleet-idle-")
    importtime = Path(state) / "importtime.txt"
    with importtime.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "agent", "serve", "--state-dir", state,
                                 "--port", str(port)],
                                cwd=ROOT, env={**os.environ, "EDGEFLEET_CONFIG": str(args.config or "")},
                                stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                urllib.request.urlopen(url + "/readyz", timeout=1).read()
                break
            except OSError:
                time.sleep(0.1)
        p = psutil.Process(proc.pid)
        time.sleep(2)
        cpu0, t0 = p.cpu_times(), time.monotonic()
        time.sleep(args.seconds)
        cpu1, t1 = p.cpu_times(), time.monotonic()
        used = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
        mem = p.memory_full_info()
        what = f"config {args.config}" if args.config else "no models"
        print(f"idle agent, {what}: RSS {mem.rss / 2**20:.1f} MiB (USS {mem.uss / 2**20:.1f} MiB), "
              f"threads {p.num_threads()}, CPU {100 * used / (t1 - t0):.3f}% of one core over {t1 - t0:.0f}s")
        urllib.request.urlopen(url + "/metrics", timeout=5).read()
        print(f"after one /metrics scrape: RSS {p.memory_info().rss / 2**20:.1f} MiB\n")
        report(proc.pid, importtime.read_text(errors="replace"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
