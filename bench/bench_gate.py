"""What the request gate costs: requests per second through it with 1,000 keys against none.

    .venv/bin/python bench/bench_gate.py [--seconds 5] [--clients 16] [--rounds 3]

Two agents run in this process on loopback, serving no model, each answering
``GET /v1/models`` (the cheapest call that still passes the gate's whole path:
authentication, the route's scope, the key's limits, the response headers):
  open        no keys file and no api_key: the gate lets every call through as anonymous
  keys-1000   a keys file of 1,000 keys, each with a request and token limit; every call
              carries one of them (chosen in turn), so each is looked up, hashed, compared
              in constant time, counted against its own bucket, and answered with the six
              x-ratelimit-* headers
  unlimited   the same with keys that have no limits (no buckets, no headers)
`--clients` aiohttp clients send back to back for `--seconds` per round; rounds alternate
the two so that machine noise hits both alike. The figure to read is the ratio of the
medians, printed last. It also prints what one gate decision costs alone (no HTTP).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.app import create_app  # noqa: E402
from agent.config import AgentConfig, ServerConfig  # noqa: E402
from agent.http.server import start_server  # noqa: E402
from security.gate import RequestGate  # noqa: E402
from security.identity import KeyLimits  # noqa: E402
from security.keys_file import KeyEntry, KeysDocument, hash_secret, new_secret, write_keys_file  # noqa: E402

KEYS = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_keys(path: Path, limited: bool) -> tuple[KeysDocument, list[str]]:
    secrets, entries = [], []
    limits = KeyLimits(requests_per_minute=1_000_000, tokens_per_minute=10_000_000) if limited else KeyLimits()
    for n in range(KEYS):
        secret, key_id = new_secret()
        secrets.append(secret)
        entries.append(KeyEntry(scopes=["infer", "embeddings"], name=f"app-{n:04d}", id=key_id,
                                sha256=hash_secret(secret.encode()).hex(), limits=limits))
    document = KeysDocument(keys=entries)
    write_keys_file(path, document)
    return document, secrets


async def hammer(url: str, secrets: list[str] | None, seconds: float, clients: int) -> float:
    """Requests per second that `clients` concurrent clients get through in `seconds`."""
    turn = itertools.cycle(secrets or [None])
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(http: aiohttp.ClientSession) -> None:
        nonlocal done
        while time.perf_counter() < deadline:
            secret = next(turn)
            headers = {"Authorization": f"Bearer {secret}"} if secret else {}
            async with http.get(url, headers=headers) as response:
                await response.read()
                assert response.status == 200, response.status
            done += 1

    started = time.perf_counter()
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return done / (time.perf_counter() - started)


def decision_cost_us(document: KeysDocument, secrets: list[str], calls: int = 20_000) -> float:
    """Microseconds for one authenticate + authorize + admit with 1,000 keys, no I/O."""
    gate = RequestGate(document, None, 30)
    credentials = [f"Bearer {s}" for s in secrets]
    started = time.perf_counter()
    for n in range(calls):
        identity = gate.authenticate(credentials[n % KEYS], None, "127.0.0.1")
        gate.authorize(identity, "infer", None)
        with gate.admit(identity, "infer"):
            pass
    return (time.perf_counter() - started) / calls * 1e6


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        document, secrets = make_keys(Path(tmp) / "api-keys.json", limited=True)
        unlimited_secrets = make_keys(Path(tmp) / "unlimited.json", limited=False)[1]
        base = AgentConfig(state_dir=tmp, models=[])

        def server(keys_file: str) -> ServerConfig:
            return ServerConfig(port=free_port(), api_keys_file=keys_file)

        configs = {"open": dataclasses.replace(base, server=server("absent.json")),
                   "keys-1000": dataclasses.replace(base, server=server("api-keys.json")),
                   "unlimited": dataclasses.replace(base, server=server("unlimited.json"))}
        secrets_of = {"open": None, "keys-1000": secrets, "unlimited": unlimited_secrets}
        runners = {}
        for name, config in configs.items():
            runners[name] = await start_server(create_app(config), config.server)
        results: dict[str, list[float]] = {name: [] for name in configs}
        try:
            for name, config in configs.items():  # warm-up
                await hammer(f"http://127.0.0.1:{config.server.port}/v1/models", secrets_of[name], 1.0, args.clients)
            for round_ in range(args.rounds):
                order = list(configs) if round_ % 2 == 0 else list(reversed(configs))
                for name in order:
                    rps = await hammer(f"http://127.0.0.1:{configs[name].server.port}/v1/models",
                                       secrets_of[name], args.seconds, args.clients)
                    results[name].append(rps)
                    print(f"round {round_ + 1} {name:10} {rps:8.0f} requests/s", flush=True)
        finally:
            for runner in runners.values():
                await runner.cleanup()
    median = {name: statistics.median(values) for name, values in results.items()}
    print(f"one gate decision with {KEYS} keys (authenticate + authorize + admit, no HTTP): "
          f"{decision_cost_us(document, secrets):.1f} µs")
    print(f"median requests/s: open {median['open']:.0f}, {KEYS} keys with limits {median['keys-1000']:.0f}, "
          f"{KEYS} keys without limits {median['unlimited']:.0f}")
    print(f"ratio keys/open = {median['keys-1000'] / median['open']:.3f} "
          f"(without limits: {median['unlimited'] / median['open']:.3f})")


if __name__ == "__main__":
    asyncio.run(main())
