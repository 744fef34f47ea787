"""Requests for packaging/smoke-arm64.sh: what a user asks an installed agent, timed.

Runs on the build host's Python against agents listening on loopback: the arm64 one under
qemu-user and the host's own as the reference. HTTP with the standard library; KServe v2
over gRPC (GRPC_ADDR given) with NVIDIA's tritonclient, as the tests use it (scripts/setup.sh
--test). Prints one JSON object per agent and, with two, how far the arm64 results are from
the host's (close, not bit-identical: the int8 kernels differ between x86 and ARM).

    python smoke_requests.py wait URL TIMEOUT_S [PID]
    python smoke_requests.py embed URL MODEL REPEAT [GRPC_ADDR]   -> JSON on stdout
    python smoke_requests.py chat URL MODEL              -> JSON on stdout
    python smoke_requests.py compare ARM64.json HOST.json
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import urllib.error
import urllib.request
from typing import Any

TEXTS = ["The quick brown fox jumps over the lazy dog.", "edge devices serve models locally"]
# "hello world" as BERT-uncased word pieces, [CLS] ... [SEP]: KServe v2 takes tensors, not text
TOKEN_IDS = [101, 7592, 2088, 102]


def _request(url: str, body: dict[str, Any] | None = None, timeout: float = 600) -> tuple[int, Any, float]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload, status = resp.read(), resp.status
    except urllib.error.HTTPError as exc:
        payload, status = exc.read(), exc.code
    elapsed = time.perf_counter() - start
    try:
        return status, json.loads(payload or b"null"), elapsed
    except ValueError:
        return status, payload.decode(errors="replace"), elapsed


def wait(url: str, timeout_s: float, pid: int | None = None) -> int:
    """Until /readyz says 200 (the models answered), the timeout, or process `pid` exits."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if pid is not None and not os.path.exists(f"/proc/{pid}"):
            print(f"the agent (pid {pid}) exited before it was ready", file=sys.stderr)
            return 1
        try:
            if _request(f"{url}/readyz", timeout=10)[0] == 200:
                print(f"ready after {time.monotonic() - start:.1f} s")
                return 0
        except OSError:
            pass
        time.sleep(1)
    print(f"not ready after {timeout_s} s", file=sys.stderr)
    return 1


def embed(url: str, model: str, repeat: int, grpc_addr: str | None = None) -> int:
    """/v1/embeddings and KServe v2 infer (HTTP, and gRPC at `grpc_addr`), each `repeat` times;
    the first is timed apart (warm-up)."""
    out: dict[str, Any] = {"embed_s": [], "infer_s": []}
    for _ in range(repeat):
        status, body, took = _request(f"{url}/v1/embeddings", {"model": model, "input": TEXTS})
        if status != 200:
            print(f"/v1/embeddings: {status} {body}", file=sys.stderr)
            return 1
        out["embed_s"].append(took)
        out["embeddings"] = [item["embedding"] for item in body["data"]]
    status, meta, _ = _request(f"{url}/v2/models/{model}")
    if status != 200:
        print(f"/v2/models/{model}: {status} {meta}", file=sys.stderr)
        return 1
    n = len(TOKEN_IDS)
    values = {"input_ids": TOKEN_IDS, "attention_mask": [1] * n, "token_type_ids": [0] * n}
    inputs = [{"name": i["name"], "datatype": i["datatype"], "shape": [1, n], "data": values[i["name"]]}
              for i in meta["inputs"]]
    for _ in range(repeat):
        status, body, took = _request(f"{url}/v2/models/{model}/infer", {"id": "smoke", "inputs": inputs})
        if status != 200:
            print(f"/v2/models/{model}/infer: {status} {body}", file=sys.stderr)
            return 1
        out["infer_s"].append(took)
        first = body["outputs"][0]
        out["infer"] = {"name": first["name"], "shape": first["shape"], "data": first["data"]}
    if grpc_addr is not None:
        out["grpc_s"], out["grpc"] = _grpc_infer(grpc_addr, model, meta, repeat)
    print(json.dumps(out))
    return 0


def _grpc_infer(addr: str, model: str, meta: dict[str, Any], repeat: int) -> tuple[list[float], dict[str, Any]]:
    """The same tensors as the HTTP infer, over gRPC (raw contents), `repeat` times."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    n = len(TOKEN_IDS)
    values = {"input_ids": TOKEN_IDS, "attention_mask": [1] * n, "token_type_ids": [0] * n}
    inputs = []
    for spec in meta["inputs"]:
        tensor = grpcclient.InferInput(spec["name"], [1, n], spec["datatype"])
        tensor.set_data_from_numpy(np.array([values[spec["name"]]], dtype=np.int64))
        inputs.append(tensor)
    name = meta["outputs"][0]["name"]
    times = []
    with grpcclient.InferenceServerClient(addr) as client:
        for _ in range(repeat):
            start = time.perf_counter()
            result = client.infer(model, inputs, outputs=[grpcclient.InferRequestedOutput(name)],
                                  client_timeout=600)
            times.append(time.perf_counter() - start)
    array = result.as_numpy(name)
    return times, {"name": name, "shape": list(array.shape), "data": array.tolist()}


def chat(url: str, model: str) -> int:
    body = {"model": model, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]}
    status, reply, took = _request(f"{url}/v1/chat/completions", body)
    if status != 200:
        print(f"/v1/chat/completions: {status} {reply}", file=sys.stderr)
        return 1
    print(json.dumps({"chat_s": took, "text": reply["choices"][0]["message"]["content"],
                      "usage": reply.get("usage")}))
    return 0


def _flat(x: Any) -> list[float]:
    return [v for item in x for v in _flat(item)] if isinstance(x, list) else [float(x)]


def compare(arm_path: str, host_path: str) -> int:
    with open(arm_path) as a_file, open(host_path) as h_file:
        arm, host = json.load(a_file), json.load(h_file)
    worst_cos, worst_abs = 1.0, 0.0
    for a, h in zip(arm["embeddings"], host["embeddings"], strict=True):
        dot = sum(x * y for x, y in zip(a, h, strict=True))
        cos = dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in h))
        worst_cos = min(worst_cos, cos)
        worst_abs = max(worst_abs, *(abs(x - y) for x, y in zip(a, h, strict=True)))
    a, h = _flat(arm["infer"]["data"]), _flat(host["infer"]["data"])
    infer_abs = max(abs(x - y) for x, y in zip(a, h, strict=True))
    same_shape = arm["infer"]["shape"] == host["infer"]["shape"]
    print(f"embeddings arm64 vs host: 1 - cosine <= {1 - worst_cos:.1e}, max |diff| {worst_abs:.1e}; "
          f"v2 infer {arm['infer']['name']} {arm['infer']['shape']}: max |diff| {infer_abs:.1e}"
          f"{'' if same_shape else ' (SHAPES DIFFER)'}")
    grpc_ok = True
    if "grpc" in arm and "grpc" in host:
        g = _flat(arm["grpc"]["data"])
        grpc_vs_host = max(abs(x - y) for x, y in zip(g, _flat(host["grpc"]["data"]), strict=True))
        grpc_vs_http = max(abs(x - y) for x, y in zip(g, a, strict=True))
        grpc_ok = arm["grpc"]["shape"] == arm["infer"]["shape"] and grpc_vs_http <= 1e-6
        print(f"v2 infer over gRPC {arm['grpc']['shape']}: arm64 vs host max |diff| {grpc_vs_host:.1e}; "
              f"arm64 gRPC vs arm64 HTTP max |diff| {grpc_vs_http:.1e}")
    for name, run in (("arm64 (qemu)", arm), ("host", host)):
        print(f"{name}: " + "; ".join(f"{label} first {run[key][0] * 1000:.0f} ms, then median "
                                      f"{_median(run[key][1:]) * 1000:.0f} ms"
                                      for label, key in (("/v1/embeddings (2 texts)", "embed_s"),
                                                         ("v2 infer HTTP", "infer_s"), ("v2 infer gRPC", "grpc_s"))
                                      if key in run))
    return 0 if worst_cos > 0.99 and same_shape and grpc_ok else 1


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def main(argv: list[str]) -> int:
    command, *args = argv
    if command == "wait":
        return wait(args[0], float(args[1]), int(args[2]) if len(args) > 2 else None)
    if command == "embed":
        return embed(args[0], args[1], int(args[2]), args[3] if len(args) > 3 else None)
    if command == "chat":
        return chat(args[0], args[1])
    if command == "compare":
        return compare(args[0], args[1])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
