"""ONNX embeddings under concurrent load: dynamic batching on against off, in one run.

    .venv/bin/python bench/bench_embeddings_load.py [--clients 1,4,16] [--requests-per-client 40]
        [--texts-per-request 1] [--rounds 3] [--json PATH] [--quick]

Two agents serve the demo embedding model (all-MiniLM-L6-v2, int8 ONNX), each as its own
process on loopback, started one after the other: "batched" with the default [batching]
settings (concurrent requests gathered into one onnxruntime run, up to onnx_max_batch) and
"unbatched" with EDGEFLEET_BATCHING__ONNX_MAX_BATCH=1 (one request per run, as before).
Other EDGEFLEET_BATCHING__* variables in the environment reach both agents (e.g.
ONNX_MAX_DELAY_MS). Both get scheduler.max_pending raised above the largest client count,
so no request is refused with 429; the figures do not depend on it.

For each concurrency C in --clients, C closed-loop clients each send --requests-per-client
POST /v1/embeddings requests of --texts-per-request short sentences (keep-alive connections,
float JSON answers). The two agents take turns level by level, and the order flips every
round, so machine noise hits both; only the agent being measured gets requests (the other
sits idle after a --settle-s pause, and the CPU time it used meanwhile is printed to show it
stayed out of the way).
Reported per level: embeddings/s (texts embedded / wall time of the level, median over
--rounds), request latency p50/p95 (all rounds pooled) and the ratio batched/unbatched.

How to read it: embeddings/s batched/unbatched above 1 at 4 and 16 clients is what dynamic
batching buys; at 1 client the latency p50 of "batched" should be no worse than "unbatched"
(a lone request must not wait for company). Bounded: a fixed number of requests, a per-request
timeout and --max-seconds for the whole run; both agents are killed on exit, error or Ctrl-C.
`--quick` is a smoke run (1 and 4 clients, 5 requests each, 1 round).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT)]

import aiohttp  # noqa: E402
from bench_load import Processes, pct, ratio, require_loopback, start_agent  # noqa: E402

from agent.cli.demo import EMBEDDING_MODEL, build_demo_bundles  # noqa: E402

SENTENCES = [
    "The cat sits on the mat.", "Edge devices run models locally.", "A storm is coming from the west.",
    "Quarterly revenue grew by eight percent.", "She plays the violin every evening.",
    "The train to Berlin leaves at noon.", "Sensors report temperature every second.",
    "Bread rises when the yeast is warm.", "The library opens at nine on Sundays.",
    "Solar panels charge the battery by day.", "A fox crossed the road at dawn.",
    "The meeting moved to Thursday afternoon.", "Fresh snow covered the mountain pass.",
    "He repaired the bicycle with a spare chain.", "The museum added a new wing.",
    "Water boils faster at high altitude.",
]
AGENTS = {"batched": {}, "unbatched": {"EDGEFLEET_BATCHING__ONNX_MAX_BATCH": "1"}}


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def level(session: aiohttp.ClientSession, url: str, clients: int, per_client: int, texts: int,
                deadline: float, timeout_s: float) -> dict[str, Any]:
    latencies: list[float] = []
    errors: list[str] = []
    done_texts = 0
    partial = False

    async def client(i: int) -> None:
        nonlocal done_texts, partial
        for j in range(per_client):
            if time.monotonic() >= deadline:
                partial = True
                return
            start = (i * per_client + j) * texts
            batch = [SENTENCES[(start + k) % len(SENTENCES)] for k in range(texts)]
            sent = time.perf_counter()
            try:
                async with session.post(url + "/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": batch},
                                        timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                    body = await resp.read()
                    if resp.status != 200:
                        errors.append(f"HTTP {resp.status}: {body[:200]!r}")
                        continue
                    got = len(json.loads(body)["data"])
            except (TimeoutError, aiohttp.ClientError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - sent)
            done_texts += got

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    wall = time.perf_counter() - started
    return {"clients": clients, "texts": done_texts, "wall_s": wall, "emb_per_s": done_texts / wall,
            "latencies_s": latencies, "errors": errors, "partial": partial}


async def run(args: argparse.Namespace, clients: list[int], agents: dict[str, tuple[int, str]]) -> dict[str, Any]:
    deadline = time.monotonic() + args.max_seconds
    results: dict[str, dict[int, list[dict[str, Any]]]] = {name: {c: [] for c in clients} for name in agents}
    idle_cpu: dict[str, float] = dict.fromkeys(agents, 0.0)
    idle_wall: dict[str, float] = dict.fromkeys(agents, 0.0)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        for _, url in agents.values():  # warm-up, not counted: every batch size once
            await level(session, url, max(clients), 2, args.texts_per_request, deadline, args.request_timeout)
        for r in range(args.rounds):
            order = list(agents) if r % 2 == 0 else list(reversed(agents))
            for c in clients:
                for name in order:
                    if time.monotonic() >= deadline:
                        break
                    await asyncio.sleep(args.settle_s)  # the last agent's thread pool stops spinning
                    others = {o: (pid, cpu_seconds(pid)) for o, (pid, _) in agents.items() if o != name}
                    t0 = time.perf_counter()
                    results[name][c].append(await level(session, agents[name][1], c, args.requests_per_client,
                                                        args.texts_per_request, deadline, args.request_timeout))
                    for o, (pid, before) in others.items():
                        idle_cpu[o] += cpu_seconds(pid) - before
                        idle_wall[o] += time.perf_counter() - t0
    summary: dict[str, Any] = {}
    for name, per_level in results.items():
        rows = []
        for c, runs in per_level.items():
            if not runs:
                continue
            lat = [x for run_ in runs for x in run_["latencies_s"]]
            rows.append({"clients": c, "rounds": len(runs),
                         "emb_per_s_median": statistics.median(r_["emb_per_s"] for r_ in runs),
                         "emb_per_s_rounds": [r_["emb_per_s"] for r_ in runs],
                         "latency_p50_s": pct(lat, 50), "latency_p95_s": pct(lat, 95),
                         "requests": len(lat), "errors": sum(len(r_["errors"]) for r_ in runs),
                         "error_samples": [e for r_ in runs for e in r_["errors"]][:3],
                         "partial": any(r_["partial"] for r_ in runs)})
        summary[name] = rows
    return {"levels": summary, "idle_agent_cpu_share": {
        o: idle_cpu[o] / idle_wall[o] if idle_wall[o] else None for o in agents},
        "timed_out": time.monotonic() >= deadline}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,4,16", help="concurrency levels, comma-separated")
    parser.add_argument("--requests-per-client", type=int, default=40)
    parser.add_argument("--texts-per-request", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--settle-s", type=float, default=1.0,
                        help="pause before each level, so that the agent measured last is idle again")
    parser.add_argument("--max-seconds", type=float, default=600, help="bound on the whole run")
    parser.add_argument("--request-timeout", type=float, default=60)
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,4 clients, 5 requests each, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests_per_client, args.rounds = "1,4", 5, 1
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    if not clients or min(clients) < 1 or args.texts_per_request < 1:
        raise SystemExit("--clients and --texts-per-request must be positive")

    state = args.state_dir or Path(tempfile.mkdtemp(prefix="edgefleet-embed-load-"))
    load_before = os.getloadavg()
    pending = {"EDGEFLEET_SCHEDULER__MAX_PENDING": str(max(16, 2 * max(clients)))}
    with Processes() as procs:
        agents: dict[str, tuple[int, str]] = {}
        for name, env in AGENTS.items():  # one after the other; each its own state dir
            state_dir = state / name
            build_demo_bundles(state_dir / "models")
            proc, url = start_agent(procs, state_dir, {**pending, **env}, tag=name)
            agents[name] = (proc.pid, require_loopback(url))
        results = asyncio.run(run(args, clients, agents))
    results["loadavg"] = {"before": load_before, "after": os.getloadavg()}
    results["config"] = {"clients": clients, "requests_per_client": args.requests_per_client,
                         "texts_per_request": args.texts_per_request, "rounds": args.rounds,
                         "env": {k: v for k, v in os.environ.items() if k.startswith("EDGEFLEET_BATCHING")}}
    report(results, args)


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    cfg, la = results["config"], results["loadavg"]
    print(f"load average before/after: {' '.join(f'{x:.2f}' for x in la['before'])} / "
          f"{' '.join(f'{x:.2f}' for x in la['after'])}")
    print(f"{EMBEDDING_MODEL}: {cfg['texts_per_request']} text(s) per request, {cfg['requests_per_client']} "
          f"requests per client, {cfg['rounds']} round(s); env {cfg['env'] or '(defaults)'}")
    if results["timed_out"]:
        print(f"NOTE: --max-seconds {args.max_seconds:.0f} ran out; some figures are partial or missing")
    levels = results["levels"]
    print(f"\n{'agent':10} {'C':>3} {'emb/s':>8} {'lat p50':>8} {'p95':>6} ms")
    for name, rows in levels.items():
        for r in rows:
            flags = (" PARTIAL" if r["partial"] else "") + (
                f" errors={r['errors']} {r['error_samples']}" if r["errors"] else "")
            print(f"{name:10} {r['clients']:>3} {r['emb_per_s_median']:8.1f} {ms(r['latency_p50_s']):>8} "
                  f"{ms(r['latency_p95_s']):>6}{flags}")
    print(f"\n{'batched / unbatched':20} {'C':>3} {'emb/s':>6} {'lat p50':>8}")
    unbatched = {r["clients"]: r for r in levels.get("unbatched", [])}
    for r in levels.get("batched", []):
        u = unbatched.get(r["clients"])
        if u:
            print(f"{'':20} {r['clients']:>3} {ratio(r['emb_per_s_median'], u['emb_per_s_median']):>6} "
                  f"{ratio(r['latency_p50_s'], u['latency_p50_s']):>8}")
    shares = ", ".join(f"{k} {v * 100:.1f} %" for k, v in results["idle_agent_cpu_share"].items() if v is not None)
    print(f"\nCPU used by the idle agent while the other was measured (share of one core): {shares}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted (every process this benchmark started has been stopped)")
