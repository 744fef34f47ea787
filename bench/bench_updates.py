"""Signed updates: how fast a file is verified, how long a swap takes, what it costs in memory.

    .venv/bin/python bench/bench_updates.py [--rounds 3] [--size-mb 1024]

Verify: a 1 GB temporary (sparse) file hashed by the store's own verification
(`runtime.files.sha256_file`, what `verifying` and a resumed download run) against
coreutils' `sha256sum` on the same file, rounds alternating; the ratio of the
medians is what to read. The file is deleted at the end.

Swap: the demo chat model serving in a `ModelRegistry`; a second version (same
weights, a new model.toml) is staged beside it, then taken from staged to active
the way an update does (probe with a real inference, then the switch). Reported:
the staged -> active latency against the same generation as the probe run in-process
on the serving version (the probe's own work, the baseline); the switch alone;
and the memory the process holds while both versions are loaded, against what
the first version added when it loaded (RSS and PSS from /proc via psutil; the second
version's weights are a copy, as a new release's are, so no page is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import psutil  # noqa: E402

from agent.cli.demo import CHAT_MODEL, build_demo_bundles  # noqa: E402
from runtime.backend import ChatMessage, GenerationRequest  # noqa: E402
from runtime.bundle import ProbeOptions, read_bundle  # noqa: E402
from runtime.devices import MachineSettings, describe_cpu  # noqa: E402
from runtime.files import sha256_file  # noqa: E402
from runtime.registry import ModelRegistry  # noqa: E402


def bench_verify(size_mb: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "blob"
        with open(path, "wb") as handle:
            handle.truncate(size_mb << 20)  # sparse: reads come from the page cache, no disk
        ours, theirs = [], []
        for _ in range(rounds):
            started = time.perf_counter()
            sha256_file(path)
            ours.append(time.perf_counter() - started)
            started = time.perf_counter()
            subprocess.run(["sha256sum", str(path)], check=True, capture_output=True)
            theirs.append(time.perf_counter() - started)
    mb = size_mb * 1.048576
    o, t = statistics.median(ours), statistics.median(theirs)
    print(f"verify {size_mb} MiB: store {mb / o:.0f} MB/s, sha256sum {mb / t:.0f} MB/s, "
          f"throughput ratio {t / o:.2f} (medians of {rounds})")


def memory() -> tuple[float, float]:
    """RSS, and PSS (pages shared with other mappings counted in part: what this process really holds)."""
    info = psutil.Process().memory_full_info()
    return info.rss / 2**20, info.pss / 2**20


async def bench_swap(rounds: int) -> None:
    state = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    try:
        build_demo_bundles(state / "models")
        current = (state / "models" / CHAT_MODEL / "current").resolve()
        second = state / "v2"
        second.mkdir()
        for path in current.iterdir():  # copies: a new release brings new weights, not shared page cache
            shutil.copyfile(path, second / path.name)
        toml = second / "model.toml"
        toml.write_text(toml.read_text().replace('version = "q4_1-0.1.2-2"', 'version = "bench-2"'))
        registry = ModelRegistry(MachineSettings(cpu=describe_cpu()))
        gc.collect()
        rss0, uss0 = memory()
        serving = await registry.load(read_bundle(current, name=CHAT_MODEL))
        rss1, uss1 = memory()
        probe = ProbeOptions()  # the demo bundles name no probe of their own: the default one
        request = GenerationRequest(messages=[ChatMessage("user", probe.text)], max_tokens=probe.max_tokens,
                                    temperature=0.0)
        warm_up = serving.generate(request)  # the first request of a process pays for thread start-up
        async for _ in warm_up.stream():
            pass
        baseline, swaps, switches, stage_s = [], [], [], []
        peak_rss, peak_uss = rss1, uss1
        for i in range(rounds):
            started = time.perf_counter()
            job = serving.generate(request)
            async for _ in job.stream():
                pass
            baseline.append(time.perf_counter() - started)
            print(f"  round {i}: in-process generation {baseline[-1] * 1000:.0f} ms", file=sys.stderr)
            bundle = read_bundle(second if i % 2 == 0 else current, name=CHAT_MODEL)
            started = time.perf_counter()
            staged = await registry.stage(bundle)
            stage_s.append(time.perf_counter() - started)
            rss, uss = memory()
            peak_rss, peak_uss = max(peak_rss, rss), max(peak_uss, uss)
            started = time.perf_counter()
            await registry.probe(staged)  # staged -> activating: a real inference
            switch_at = time.perf_counter()
            await registry.commit(staged)  # -> active
            done = time.perf_counter()
            swaps.append(done - started)
            print(f"  round {i}: staged -> active {swaps[-1] * 1000:.0f} ms", file=sys.stderr)
            switches.append(done - switch_at)
            rss, uss = memory()
            peak_rss, peak_uss = max(peak_rss, rss), max(peak_uss, uss)
            await registry.confirm(CHAT_MODEL)
            serving = staged
        await registry.close()
        b, s = statistics.median(baseline), statistics.median(swaps)
        print(f"swap {CHAT_MODEL}: staged -> active {s * 1000:.0f} ms (probe + switch) vs the same "
              f"{probe.max_tokens}-token generation in-process {b * 1000:.0f} ms: ratio {s / b:.2f}; the switch alone "
              f"{statistics.median(switches) * 1e6:.0f} us; loading the staged version took "
              f"{statistics.median(stage_s) * 1000:.0f} ms (medians of {rounds})")
        print(f"memory: first version added {rss1 - rss0:.0f} MiB RSS / {uss1 - uss0:.0f} MiB PSS; "
              f"while two versions are loaded, {peak_rss - rss1:.0f} MiB RSS / {peak_uss - uss1:.0f} MiB PSS more: "
              f"ratio {(peak_rss - rss1) / max(1e-9, rss1 - rss0):.2f} (RSS), "
              f"{(peak_uss - uss1) / max(1e-9, uss1 - uss0):.2f} (PSS)")
    finally:
        shutil.rmtree(state, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=1024)
    args = parser.parse_args()
    bench_verify(args.size_mb, args.rounds)
    asyncio.run(bench_swap(args.rounds))


if __name__ == "__main__":
    main()
