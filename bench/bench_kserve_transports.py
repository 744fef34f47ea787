"""KServe v2 over gRPC against KServe v2 over HTTP, and both against onnxruntime in-process.

    .venv/bin/python bench/bench_kserve_transports.py [--rounds 5] [--requests 200] [--tokens 16]

One embedding-sized tensor request: the demo model (all-MiniLM-L6-v2, int8 ONNX)
with three INT64 inputs of shape [1, tokens] and its [1, tokens, 384] FP32 output,
sent by NVIDIA's unmodified clients, as their users send it:
  http-binary   tritonclient.http, binary tensors both ways (its default)
  http-json     tritonclient.http, JSON tensors both ways
  grpc-raw      tritonclient.grpc, raw_input_contents / raw_output_contents (its default)
The agent runs as its own process (`edgefleet serve --demo`, HTTP and gRPC ports);
the in-process baseline is `InferenceSession.run` on the same file with the same
thread count. Requests go one after another on one connection; rounds alternate the
transports so that machine noise hits all alike; the figures are medians of
per-round mean latencies, and the ratios are what to read.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.cli.demo import EMBEDDING_MODEL, build_demo_bundles  # noqa: E402
from runtime.devices import choose_onnx_placement, describe_cpu  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_agent(state_dir: Path) -> tuple[subprocess.Popen, int, int]:
    http_port, grpc_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "serve", "--demo", "--state-dir", str(state_dir),
         "--port", str(http_port), "--grpc-port", str(grpc_port)],
        cwd=ROOT, env={**os.environ, "EDGEFLEET_CONFIG": ""}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return proc, http_port, grpc_port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the agent did not become ready")


def feeds(tokens: int) -> dict[str, np.ndarray]:
    ids = np.array([[101] + [7592 + i for i in range(tokens - 2)] + [102]], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}


def timed(call, n: int) -> float:
    """Mean seconds per call over n calls."""
    started = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - started) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=200, help="requests per transport per round")
    parser.add_argument("--tokens", type=int, default=16, help="sequence length of the request")
    args = parser.parse_args()

    import onnxruntime as ort
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    state_dir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    bundle = {b.name: b for b in build_demo_bundles(state_dir / "models")}[EMBEDDING_MODEL]
    placement = choose_onnx_placement(describe_cpu(), ort.get_available_providers(), (), 0)
    options = ort.SessionOptions()
    options.intra_op_num_threads = placement.intra_op_threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(bundle.weights), sess_options=options, providers=["CPUExecutionProvider"])
    data = feeds(args.tokens)
    want = session.run(["last_hidden_state"], data)[0]

    proc, http_port, grpc_port = start_agent(state_dir)
    http = httpclient.InferenceServerClient(f"127.0.0.1:{http_port}")
    grpc = grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}")

    def http_call(binary: bool):
        inputs = []
        for name, array in data.items():
            tensor = httpclient.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array, binary_data=binary)
            inputs.append(tensor)
        out = [httpclient.InferRequestedOutput("last_hidden_state", binary_data=binary)]
        return lambda: http.infer(EMBEDDING_MODEL, inputs, outputs=out).as_numpy("last_hidden_state")

    def grpc_call():
        inputs = []
        for name, array in data.items():
            tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        out = [grpcclient.InferRequestedOutput("last_hidden_state")]
        return lambda: grpc.infer(EMBEDDING_MODEL, inputs, outputs=out).as_numpy("last_hidden_state")

    calls = {
        "in-process": lambda: session.run(["last_hidden_state"], data)[0],
        "http-binary": http_call(True),
        "http-json": http_call(False),
        "grpc-raw": grpc_call(),
    }
    try:
        for name, call in calls.items():  # warm up, and check every path gives the same tensor
            got = call()
            if not np.array_equal(got, want):
                raise SystemExit(f"{name}: the output differs from onnxruntime in-process")
            timed(call, 10)
        results: dict[str, list[float]] = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                results[name].append(timed(call, args.requests))
    finally:
        http.close()
        grpc.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    med = {name: statistics.median(v) for name, v in results.items()}
    print(f"# {placement.reasons}; inputs 3 x [1, {args.tokens}] INT64, output [1, {args.tokens}, 384] FP32; "
          f"{args.rounds} rounds x {args.requests} requests")
    print(f"{'transport':<12} {'latency':>10} {'/ in-process':>13} {'/ http-binary':>14}")
    for name, seconds in med.items():
        print(f"{name:<12} {seconds * 1e6:>8.0f}us {seconds / med['in-process']:>13.2f} "
              f"{seconds / med['http-binary']:>14.2f}")
    print(f"grpc-raw / http-binary latency ratio: {med['grpc-raw'] / med['http-binary']:.2f}")


if __name__ == "__main__":
    main()
