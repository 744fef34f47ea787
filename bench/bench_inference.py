"""Agent over HTTP against the same libraries in-process, in one run.

    .venv/bin/python bench/bench_inference.py [--rounds 5] [--tokens 256]

Decode: single-stream tokens/s for the demo chat model, llama-cpp-python
in-process vs the agent's /v1/completions streamed over loopback HTTP
(the agent runs as its own process, as it does in production). Both use the
same prompt, greedy sampling, EOS banned so every run makes exactly --tokens
tokens, and the same llama.cpp placement (threads, repacking). Decode speed
is timed from the first streamed token to the last, so prompt processing is
left out of both. Embeddings: direct onnxruntime (tokenize, run, mean-pool)
vs the agent's /v1/embeddings, batches of 8 sentences.

Rounds alternate baseline and agent so that machine noise hits both alike;
the figures are medians, and the ratio is what to read.

The agent is started in its own session, as systemd starts it in its own
cgroup; `--same-session` keeps it in the benchmark's session instead (Linux
autogroup then schedules client and agent as one group). On the 2-core
development VM the two gave the same ratio within the run-to-run noise (±4%).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.cli.demo import CHAT_MODEL, EMBEDDING_MODEL, build_demo_bundles  # noqa: E402
from runtime.devices import choose_llama_placement, describe_cpu, llama_gpu_offload_supported  # noqa: E402
from runtime.gguf.gguf_backend import extra_buffer_types  # noqa: E402
from runtime.gguf.llama_params import kv_cache_args  # noqa: E402

PROMPT = "Write a long story about a lighthouse keeper."
EOS = 2
SENTENCES = [
    "The cat sits on the mat.", "Edge devices run models locally.", "A storm is coming from the west.",
    "Quarterly revenue grew by eight percent.", "She plays the violin every evening.",
    "The train to Berlin leaves at noon.", "Sensors report temperature every second.",
    "Bread rises when the yeast is warm.",
]


def in_process_decode(llm, tokens: int) -> float:
    stamps = []
    for chunk in llm.create_completion(PROMPT, max_tokens=tokens, temperature=0, stream=True,
                                       logit_bias={EOS: -100}):
        if chunk["choices"][0]["text"]:
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def post(conn: http.client.HTTPConnection, path: str, payload: dict) -> http.client.HTTPResponse:
    try:
        conn.request("POST", path, body=json.dumps(payload), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
    except (BrokenPipeError, ConnectionResetError, http.client.RemoteDisconnected):
        # The agent closes keep-alive connections idle past server.keepalive_timeout_s (the
        # in-process baseline can take that long on a busy machine): reconnect, as clients do.
        conn.close()
        conn.request("POST", path, body=json.dumps(payload), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
    if resp.status != 200:
        raise SystemExit(f"{path}: HTTP {resp.status}: {resp.read()[:300]!r}")
    return resp


def agent_decode(conn: http.client.HTTPConnection, tokens: int) -> float:
    resp = post(conn, "/v1/completions", {"model": CHAT_MODEL, "prompt": PROMPT, "max_tokens": tokens,
                                          "temperature": 0, "stream": True, "logit_bias": {str(EOS): -100}})
    stamps = []
    for line in resp:
        if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def in_process_embed(session, tokenizer, rounds: int) -> float:
    import numpy as np

    started = time.perf_counter()
    for _ in range(rounds):
        enc = tokenizer.encode_batch(SENTENCES)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        (hidden,) = session.run(None, {"input_ids": ids, "attention_mask": mask,
                                       "token_type_ids": np.zeros_like(ids)})
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    return rounds * len(SENTENCES) / (time.perf_counter() - started)


#: Pause after an in-process run before the agent is measured: thread pools that spin after
#: their work (onnxruntime's, libgomp's) would otherwise take the agent's CPU.
SETTLE_S = 0.5


def agent_embed(conn: http.client.HTTPConnection, rounds: int, encoding: str) -> float:
    import numpy as np

    started = time.perf_counter()
    for _ in range(rounds):
        resp = post(conn, "/v1/embeddings", {"model": EMBEDDING_MODEL, "input": SENTENCES,
                                             "encoding_format": encoding})
        data = json.loads(resp.read())["data"]
        if encoding == "base64":  # decoded as the openai client does
            [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in data]
    return rounds * len(SENTENCES) / (time.perf_counter() - started)


def start_agent(state_dir: Path, same_session: bool = False) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "agent", "serve", "--demo", "--state-dir", str(state_dir),
                             "--port", str(port)], cwd=ROOT, env={**os.environ, "EDGEFLEET_CONFIG": ""},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=not same_session)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the agent did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--embed-batches", type=int, default=30)
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--same-session", action="store_true",
                        help="run the agent in the benchmark's session (see the module docstring)")
    args = parser.parse_args()

    import llama_cpp
    import onnxruntime as ort
    from tokenizers import Tokenizer

    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    bundles = {b.name: b for b in build_demo_bundles(state_dir / "models")}
    placement = choose_llama_placement(describe_cpu(), llama_gpu_offload_supported())
    chat = bundles[CHAT_MODEL]
    with extra_buffer_types(placement.use_extra_bufts):  # the agent's own choice (AMX-safe)
        llm = llama_cpp.Llama(str(chat.weights), n_ctx=chat.manifest.gguf.n_ctx, n_threads=placement.n_threads,
                              n_threads_batch=placement.n_threads_batch, n_gpu_layers=placement.n_gpu_layers,
                              flash_attn=chat.manifest.gguf.flash_attn, verbose=False,
                              **kv_cache_args(chat.manifest.gguf.kv_type))  # the agent's KV cache type
    embed = bundles[EMBEDDING_MODEL]
    options = ort.SessionOptions()
    options.intra_op_num_threads = placement.n_threads
    session = ort.InferenceSession(str(embed.weights), sess_options=options, providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(embed.file("tokenizer.json")))
    tokenizer.enable_truncation(max_length=256)
    tokenizer.enable_padding()

    proc, url = start_agent(state_dir, args.same_session)
    conn = http.client.HTTPConnection(url.removeprefix("http://"))  # keep-alive, as clients do
    try:
        agent_decode(conn, 16), in_process_decode(llm, 16)  # warm both
        agent_embed(conn, 2, "base64"), in_process_embed(session, tokenizer, 2)
        base_tps, agent_tps, base_eps, agent_b64, agent_float = [], [], [], [], []
        for _ in range(args.rounds):
            base_tps.append(in_process_decode(llm, args.tokens))
            agent_tps.append(agent_decode(conn, args.tokens))
            base_eps.append(in_process_embed(session, tokenizer, args.embed_batches))
            time.sleep(SETTLE_S)  # onnxruntime's pool here spins a while after a run, on the agent's cores
            agent_b64.append(agent_embed(conn, args.embed_batches, "base64"))
            agent_float.append(agent_embed(conn, args.embed_batches, "float"))
    finally:
        conn.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)

    def row(name: str, unit: str, base: list[float], agent: list[float]) -> None:
        b, a = statistics.median(base), statistics.median(agent)
        print(f"{name:34} {b:9.1f} {a:9.1f} {unit:8} ratio {a / b:.3f}")

    print(f"cpu: {placement.reasons}; rounds={args.rounds}, tokens={args.tokens}")
    print(f"{'':34} {'in-proc':>9} {'agent':>9}")
    row("decode, 1 stream (tokens/s)", "tok/s", base_tps, agent_tps)
    row("embeddings, batch 8, base64 (emb/s)", "emb/s", base_eps, agent_b64)
    row("embeddings, batch 8, float JSON", "emb/s", base_eps, agent_float)


if __name__ == "__main__":
    main()
