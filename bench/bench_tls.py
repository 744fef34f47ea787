"""What TLS costs on the local endpoint: request latency over TLS against plain, same run.

    .venv/bin/python bench/bench_tls.py [--rounds 5] [--requests 200]

Two `edgefleet serve` processes serve the demo embedding model (all-MiniLM-L6-v2,
int8 ONNX) on loopback, one plain and one with TLS (an ECDSA P-256 certificate from a
CA the bench makes; TLS 1.3, what both ends choose). Requests go one after another,
as a client on the device sends them:
  models           GET /v1/models (no model work: the HTTP and TLS overhead alone)
  embed            POST /v1/embeddings, one short text
each on one keep-alive connection (`keepalive`), and on a new connection per request
(`new-conn`: a full TCP + TLS handshake each time, no session resumption: the worst
case); and KServe v2 ModelInfer through tritonclient.grpc on one channel (`grpc-infer`).
Clients: stdlib http.client (verifying the certificate), tritonclient.grpc with
``ssl=True``. Rounds alternate the servers so machine noise hits both alike; figures are
medians of per-round mean latencies, and the TLS/plain ratios are what to read.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from tls_certs import Authority  # noqa: E402

from agent.cli.demo import EMBEDDING_MODEL, build_demo_bundles  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_agent(bundles: Path, work: Path, name: str, tls: dict[str, str]) -> tuple[subprocess.Popen, int, int]:
    """`edgefleet serve` with the embedding model from `bundles` (each agent has its own state
    dir: one agent holds one); (process, HTTP port, gRPC port)."""
    port, grpc_port = free_port(), free_port()
    lines = [f'state_dir = "{work / name}"', "[server]", 'host = "127.0.0.1"', f"port = {port}",
             f"grpc_port = {grpc_port}", *(f'{k} = "{v}"' for k, v in tls.items()),
             "[[models]]", f'name = "{EMBEDDING_MODEL}"', f'path = "{bundles / EMBEDDING_MODEL / "current"}"',
             "[telemetry]", "enabled = false"]
    config = work / f"{name}.toml"
    config.write_text("\n".join(lines) + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "agent", "serve", "--config", str(config)], cwd=ROOT,
                            env={**os.environ, "EDGEFLEET_CONFIG": ""}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, port, grpc_port


def connect(port: int, context: ssl.SSLContext | None) -> http.client.HTTPConnection:
    if context is None:
        return http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    return http.client.HTTPSConnection("127.0.0.1", port, timeout=30, context=context)


def wait_ready(proc: subprocess.Popen, port: int, context: ssl.SSLContext | None) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("an agent exited at start")
        try:
            conn = connect(port, context)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                conn.close()
                return
            conn.close()
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("an agent did not become ready")


EMBED_BODY = json.dumps({"model": EMBEDDING_MODEL, "input": ["the cost of TLS on a small request"]})


def http_calls(port: int, context: ssl.SSLContext | None, path: str, keepalive: bool) -> Callable[[int], None]:
    """`n` requests one after another: on one connection opened first (keepalive), or each on a
    new connection; every status is checked."""
    method, body = ("POST", EMBED_BODY) if path == "/v1/embeddings" else ("GET", None)
    headers = {"Content-Type": "application/json"} if body else {}

    def one(conn: http.client.HTTPConnection) -> None:
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise SystemExit(f"{path}: HTTP {response.status}")

    def run(n: int) -> None:
        if keepalive:
            conn = connect(port, context)
            for _ in range(n):
                one(conn)
            conn.close()
            return
        for _ in range(n):
            conn = connect(port, context)
            one(conn)
            conn.close()
    return run


def timed(run: Callable[[int], None], n: int) -> float:
    """Mean seconds per request over `n`."""
    started = time.perf_counter()
    run(n)
    return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200, help="requests per case per server per round")
    args = parser.parse_args()

    import tritonclient.grpc as grpcclient

    work = Path(tempfile.mkdtemp(prefix="edgefleet-bench-tls-"))
    bundles = work / "bundles" / "models"
    build_demo_bundles(bundles)
    ca = Authority(work / "pki")
    server = ca.server()
    verify = ssl.create_default_context(cafile=str(ca.ca.cert))
    procs: list[subprocess.Popen] = []
    try:
        plain_proc, plain_port, plain_grpc = start_agent(bundles, work, "plain", {})
        procs.append(plain_proc)
        tls_proc, tls_port, tls_grpc = start_agent(bundles, work, "tls", {
            "tls_cert_file": str(server.cert), "tls_key_file": str(server.key)})
        procs.append(tls_proc)
        wait_ready(plain_proc, plain_port, None)
        wait_ready(tls_proc, tls_port, verify)

        ids = np.array([[101, 7592, 2088, 2003, 1037, 3231, 102]], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}

        def grpc_calls(client: grpcclient.InferenceServerClient) -> Callable[[int], None]:
            inputs = []
            for name, array in feeds.items():
                tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            def run(n: int) -> None:
                for _ in range(n):
                    client.infer(EMBEDDING_MODEL, inputs).as_numpy("last_hidden_state")
            return run

        triton = {
            "plain": grpcclient.InferenceServerClient(f"127.0.0.1:{plain_grpc}"),
            "tls": grpcclient.InferenceServerClient(f"127.0.0.1:{tls_grpc}", ssl=True,
                                                    root_certificates=str(ca.ca.cert)),
        }
        servers = {"plain": (plain_port, None), "tls": (tls_port, verify)}
        cases = {f"{label} {mode}": (path, mode == "keepalive")
                 for label, path in (("models", "/v1/models"), ("embed", "/v1/embeddings"))
                 for mode in ("keepalive", "new-conn")}
        calls = {(case, kind): http_calls(*servers[kind], path, keepalive)
                 for case, (path, keepalive) in cases.items() for kind in servers}
        for kind in servers:
            calls[("grpc-infer keepalive", kind)] = grpc_calls(triton[kind])
        for call in calls.values():  # warm up
            timed(call, 10)
        results: dict[tuple[str, str], list[float]] = {key: [] for key in calls}
        for _ in range(args.rounds):
            for key, call in calls.items():
                results[key].append(timed(call, args.requests))
        for client in triton.values():
            client.close()
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)

    print(f"{args.rounds} rounds x {args.requests} requests per case, one client, loopback; "
          f"median of per-round means")
    print(f"{'case':<26}{'plain ms':>10}{'tls ms':>10}{'tls-plain ms':>14}{'tls/plain':>11}")
    for case in [*cases, "grpc-infer keepalive"]:
        plain = statistics.median(results[(case, "plain")]) * 1000
        tls = statistics.median(results[(case, "tls")]) * 1000
        print(f"{case:<26}{plain:>10.3f}{tls:>10.3f}{tls - plain:>+14.3f}{tls / plain:>10.2f}x")


if __name__ == "__main__":
    main()
