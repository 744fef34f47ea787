"""Chat serving under concurrent load: the agent against llama.cpp's own llama-server, in one run.

    .venv/bin/python bench/bench_load.py [--clients 1,2,4,8] [--requests-per-client 3]
        [--llama-server PATH|none] [--json PATH] [--quick]

Both servers run as their own processes on loopback, on the same GGUF file (the demo chat
model, SmolLM2-135M-Instruct Q4_1, taken from the demo bundle the agent serves), with the same
thread counts and weight repacking choice as the agent's (`-nr` on AMX CPUs). llama-server gets
`--parallel 8 -c 8192` (8 slots of 1024 tokens); the agent uses its [batching] settings, so
`EDGEFLEET_BATCHING__GGUF_SLOTS=1 .venv/bin/python bench/bench_load.py` measures it with
continuous batching off. --llama-server defaults to where shared/PEERS.md (next to the
checkouts) builds it from the llama-cpp-python sdist the agent uses, so both run the same
kernels; `--llama-server none` measures the agent alone.

Every request is an OpenAI streamed chat completion (stream=true, SSE) with a unique prompt
(unique text at its very start, so llama-server's prompt cache cannot reuse another request's
prefix), temperature 0 and every end-of-generation token banned by logit_bias, so every answer
is exactly --max-tokens (128) tokens; the usage chunk (stream_options.include_usage) is checked
and answers of another length are counted and reported.

What it measures, in this order:
  load      for each concurrency C in --clients: C closed-loop clients, --requests-per-client
            requests each, after one warm-up request that is not counted; the agent at C, then
            llama-server at C, so that machine noise hits both. Per level: aggregate decode
            tokens/s (all completion tokens / wall time of the level), time to first token
            (request sent -> first content delta) p50/p95/max, inter-token latency (gaps
            between content deltas, all streams pooled) p50/p95/p99, and tokens/s relative to
            the same server's 1-client figure.
  ttft      one client, no other load: a unique ~376-token prompt, median TTFT of --ttft-rounds,
            alternating the servers.
  starve    --steady-clients (8) clients stream steadily (closed loop, starts staggered); once
            each has finished a request, a newcomer sends a unique ~1,000-token prompt. Reported:
            the largest gap between two tokens of any running stream while the newcomer waited
            and its prompt was processed (send -> its first token), the running streams' usual
            gaps (p50/p99 outside that window), the newcomer's TTFT (which includes waiting for
            a free slot when all are busy), and the slowest TTFT of the steady clients' requests
            (each client's first request left out).

How to read it: the ratios are what carry over between machines. tok/s xC1 near C means
requests really run together; agent/llama-server near 1.0 means the agent's scheduler does what
llama.cpp's own server does with the same kernels. A starvation gap much larger than the usual
gap means a long prompt stalls everyone else's stream while it is processed.

The load generator only talks to loopback addresses (--agent-url and --llama-url, for servers
started elsewhere, must be loopback) and is bounded: a fixed number of requests, a per-request
timeout and --max-seconds for the whole run (past it, no new request starts and the figures
say so). Every process it starts runs in its own session and is killed on exit, error or
Ctrl-C. `--quick` is a smoke run (1 and 2 clients, 1 request each, 32 tokens, small
starvation phase) to check that it works; its figures mean little.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402

from agent.cli.demo import CHAT_MODEL, build_demo_bundles  # noqa: E402

LLAMA_SERVER_DEFAULT = Path(
    "/tmp/llama-server-build/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server"
)
SYSTEM = "You are a storyteller. Answer at length."
USER = "Write a long story about a lighthouse keeper."
WORDS = (
    "river", "stone", "garden", "window", "morning", "signal", "harbor", "engine", "letter", "market", "winter",
    "copper", "island", "forest", "ladder", "candle", "orbit", "valley", "thunder", "station", "meadow", "bridge",
    "lantern", "archive", "compass", "quiet", "bright", "narrow", "ancient", "gentle", "rapid", "hollow",
    "silver", "distant", "careful", "sudden", "patient", "carries", "follows", "remembers", "builds", "watches",
    "counts", "gathers", "measures", "answers", "repairs", "because", "while", "after", "before", "under",
    "across", "beyond", "during", "without", "toward",
)


# --- processes ---------------------------------------------------------------------------

class Processes:
    """Everything this benchmark starts, each in its own session; all killed on exit."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)  # its own session: pgid == pid
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(reversed(self.procs)):
            self.stop(proc)

    def __enter__(self) -> Processes:
        # SIGTERM (and SIGHUP) end the run like Ctrl-C does, through the finally blocks.
        def interrupt(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt(f"signal {signum}")

        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, interrupt)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # even where started with SIGINT ignored
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_loopback(url: str) -> str:
    host = urlsplit(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"{url}: this load generator only talks to loopback addresses")
    return url.rstrip("/")


def wait_ready(url: str, proc: subprocess.Popen | None, log: Path | None, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.25)
    tail = log.read_text(errors="replace")[-2000:] if log is not None and log.exists() else ""
    raise SystemExit(f"{url} did not become ready\n{tail}")


def start_agent(procs: Processes, state_dir: Path, env_extra: dict[str, str] | None = None,
                tag: str = "agent") -> tuple[subprocess.Popen, str]:
    """`python -m agent serve --demo` on a free loopback port, as bench_inference.py starts it."""
    port = free_port()
    env = {**os.environ, "EDGEFLEET_CONFIG": "", **(env_extra or {})}
    log = state_dir / f"{tag}.log"
    # --grpc-port 0: --demo would otherwise take the fixed gRPC port 8081 (two agents, or another run, collide)
    proc = procs.start([sys.executable, "-m", "agent", "serve", "--demo", "--state-dir", str(state_dir),
                        "--port", str(port), "--grpc-port", "0"], env, log)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/readyz", proc, log)
    return proc, url


def start_llama_server(procs: Processes, binary: Path, gguf: Path, placement: Any, kv_type: str,
                       log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [str(binary), "-m", str(gguf), "--parallel", "8", "-c", "8192",
            "-t", str(placement.n_threads), "-tb", str(placement.n_threads_batch),
            "-ctk", kv_type, "-ctv", kv_type,  # the agent's KV cache type: the same work for both
            "--host", "127.0.0.1", "--port", str(port)]
    if not placement.use_extra_bufts:  # AMX: repacking crashes (PEERS.md); the agent turns it off too
        argv.insert(3, "-nr")
    bindir = str(binary.parent)
    env = {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
        p for p in (bindir, os.environ.get("LD_LIBRARY_PATH", "")) if p)}
    proc = procs.start(argv, env, log)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/health", proc, log)
    return proc, url


# --- prompts -----------------------------------------------------------------------------

class Prompts:
    """Unique prompts; long ones sized in tokens with the model's own tokenizer."""

    def __init__(self, gguf: Path | None) -> None:
        self.nonce = f"{random.getrandbits(32):08x}"
        self.count = 0
        self.rng = random.Random(self.nonce)
        self.llm = None
        self.eog = [0, 2, 4]  # SmolLM2: <|endoftext|>, <|im_end|>, <reponame>
        if gguf is not None:
            import llama_cpp

            self.llm = llama_cpp.Llama(str(gguf), vocab_only=True, verbose=False)
            vocab = self.llm._model.vocab
            self.eog = [t for t in range(self.llm.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, t)]

    def tag(self) -> str:
        """Unique from the first character on: a prompt cache finds no common prefix beyond the
        chat template's few tokens."""
        self.count += 1
        return f"{self.rng.getrandbits(40):010x} (ticket {self.count} of run {self.nonce})."

    def chat(self) -> list[dict[str, str]]:
        """A short unique prompt (about 60 tokens with the chat template)."""
        return [{"role": "system", "content": f"{self.tag()} {SYSTEM}"}, {"role": "user", "content": USER}]

    def _tokens(self, messages: list[dict[str, str]]) -> int:
        assert self.llm is not None
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return len(self.llm.tokenize((text + "<|im_start|>assistant\n").encode(), add_bos=False, special=True))

    def long(self, tokens: int) -> list[dict[str, str]]:
        """A unique prompt of about `tokens` tokens (chat template included)."""
        head = f"{self.tag()} You summarize notes."
        words: list[str] = ["Summarize these notes in one story:"]

        def messages() -> list[dict[str, str]]:
            return [{"role": "system", "content": head}, {"role": "user", "content": " ".join(words)}]

        if self.llm is None:  # no tokenizer: about 1.3 tokens a word
            words += [self.rng.choice(WORDS) for _ in range(int(tokens / 1.3))]
            return messages()
        while self._tokens(messages()) < tokens - 12:
            words += [self.rng.choice(WORDS) for _ in range(8)]
        while self._tokens(messages()) < tokens:
            words.append(self.rng.choice(WORDS))
        return messages()


# --- one streamed request ----------------------------------------------------------------

@dataclass
class Stream:
    sent: float = 0.0
    stamps: list[float] = field(default_factory=list)  # arrival of each non-empty content delta
    done: float = 0.0
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    error: str | None = None
    retried: bool = False

    @property
    def ttft(self) -> float | None:
        return self.stamps[0] - self.sent if self.stamps else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


class Target:
    """One server under test and the request shape both servers get."""

    def __init__(self, name: str, url: str, session: aiohttp.ClientSession, eog: list[int],
                 deadline: float, request_timeout_s: float) -> None:
        self.name, self.url, self.session = name, require_loopback(url), session
        self.eog, self.deadline, self.request_timeout_s = eog, deadline, request_timeout_s
        self.temperature = 0.0

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    async def chat(self, messages: list[dict[str, str]], max_tokens: int) -> Stream:
        payload = {"model": CHAT_MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": self.temperature,
                   "stream": True, "stream_options": {"include_usage": True},
                   "logit_bias": {str(t): -100 for t in self.eog}}
        for attempt in range(3):
            result = Stream(sent=time.perf_counter(), retried=attempt > 0)
            try:
                await self._stream(payload, result)
                break
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
                # The connection broke before an answer (run() opens one per request, so this
                # should not happen): send again, timed from the new start, and count it.
                result.error = f"{type(exc).__name__}: {exc}"
                if result.stamps:
                    break
            except (TimeoutError, aiohttp.ClientError) as exc:
                result.error = f"{type(exc).__name__}: {exc}"
                break
        result.done = time.perf_counter()
        return result

    async def _stream(self, payload: dict[str, Any], result: Stream) -> None:
        timeout = aiohttp.ClientTimeout(total=max(1.0, min(self.request_timeout_s,
                                                           self.deadline - time.monotonic() + 30)))
        async with self.session.post(self.url + "/v1/chat/completions", json=payload, timeout=timeout) as resp:
            if resp.status != 200:
                result.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return
            async for line in resp.content:
                now = time.perf_counter()
                if not line.startswith(b"data: "):
                    continue  # blank separators and ": ping" comments
                data = line[6:].strip()
                if data == b"[DONE]":
                    return
                chunk = json.loads(data)
                if chunk.get("usage"):
                    result.completion_tokens = chunk["usage"].get("completion_tokens")
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens")
                for choice in chunk.get("choices") or ():
                    if (choice.get("delta") or {}).get("content"):
                        result.stamps.append(now)
        result.error = "the stream ended without [DONE]"


# --- statistics --------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return "-" if not a or not b else f"{a / b:.2f}"


def summarize(streams: list[Stream], wall: float, max_tokens: int) -> dict[str, Any]:
    ok = [s for s in streams if s.error is None and s.stamps]
    tokens = sum(s.completion_tokens if s.completion_tokens is not None else len(s.stamps) for s in ok)
    ttfts = [s.ttft for s in ok if s.ttft is not None]
    gaps = [g for s in ok for g in s.gaps]
    return {
        "requests": len(streams), "errors": len(streams) - len(ok),
        "error_samples": [s.error for s in streams if s.error][:3],
        "retried": sum(1 for s in streams if s.retried),
        "short_answers": sum(1 for s in ok if (s.completion_tokens or len(s.stamps)) != max_tokens),
        "tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else None,
        "ttft_p50_s": pct(ttfts, 50), "ttft_p95_s": pct(ttfts, 95), "ttft_max_s": max(ttfts, default=None),
        "itl_p50_s": pct(gaps, 50), "itl_p95_s": pct(gaps, 95), "itl_p99_s": pct(gaps, 99),
        "prompt_tokens_max": max((s.prompt_tokens or 0 for s in ok), default=0),
    }


# --- phases ------------------------------------------------------------------------------

SETTLE_S = 1.0  # pause before each measurement: the server measured last goes idle (threads stop polling)


async def load_level(target: Target, prompts: Prompts, clients: int, per_client: int,
                     max_tokens: int) -> dict[str, Any]:
    await asyncio.sleep(SETTLE_S)
    warm = await target.chat(prompts.chat(), max_tokens)  # not counted
    if warm.error:
        raise SystemExit(f"{target.name}: warm-up request failed: {warm.error}")
    streams: list[Stream] = []
    partial = False

    async def client() -> None:
        nonlocal partial
        for _ in range(per_client):
            if target.expired():
                partial = True
                return
            streams.append(await target.chat(prompts.chat(), max_tokens))

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    return {**summarize(streams, wall, max_tokens), "clients": clients, "partial": partial}


async def long_ttft(targets: list[Target], prompts: Prompts, tokens: int, rounds: int) -> dict[str, Any]:
    seen: dict[str, list[Stream]] = {t.name: [] for t in targets}
    for i in range(rounds):
        for target in targets if i % 2 == 0 else reversed(targets):
            await asyncio.sleep(SETTLE_S)
            if not target.expired():
                seen[target.name].append(await target.chat(prompts.long(tokens), 8))
    out = {}
    for name, streams in seen.items():
        ok = [s.ttft for s in streams if s.ttft is not None]
        out[name] = {"rounds": len(ok), "ttft_median_s": statistics.median(ok) if ok else None,
                     "prompt_tokens": max((s.prompt_tokens or 0 for s in streams), default=0),
                     "errors": [s.error for s in streams if s.error][:3]}
    return out


async def starvation(target: Target, prompts: Prompts, steady: int, newcomer_tokens: int, max_tokens: int,
                     stagger_s: float, phase_limit_s: float) -> dict[str, Any]:
    await asyncio.sleep(SETTLE_S)
    per_client: list[list[Stream]] = [[] for _ in range(steady)]
    stop = asyncio.Event()
    phase_end = time.monotonic() + phase_limit_s

    async def client(i: int) -> None:
        await asyncio.sleep(i * stagger_s)
        while not stop.is_set() and not target.expired() and time.monotonic() < phase_end:
            per_client[i].append(await target.chat(prompts.chat(), max_tokens))

    tasks = [asyncio.create_task(client(i)) for i in range(steady)]
    newcomer: Stream | None = None
    try:
        while not all(any(s.done for s in streams) for streams in per_client):
            if all(t.done() for t in tasks) or time.monotonic() >= phase_end:
                break
            await asyncio.sleep(0.05)
        else:
            newcomer = await target.chat(prompts.long(newcomer_tokens), 16)
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
    steady_streams = [s for streams in per_client for s in streams]
    later = [s for streams in per_client for s in streams[1:] if s.ttft is not None]
    out: dict[str, Any] = {"steady_clients": steady, "steady_requests": len(steady_streams),
                           "steady_errors": sum(1 for s in steady_streams if s.error),
                           "steady_error_samples": [s.error for s in steady_streams if s.error][:3],
                           "steady_ttft_p50_s": pct([s.ttft for s in later], 50),
                           "steady_ttft_max_s": max((s.ttft for s in later), default=None)}
    if newcomer is None or newcomer.ttft is None:
        out["newcomer_error"] = newcomer.error if newcomer else "the steady phase did not settle in time"
        return out
    start, first = newcomer.sent, newcomer.stamps[0]
    inside, outside = [], []
    for s in steady_streams:
        for a, b in zip(s.stamps, s.stamps[1:], strict=False):
            if b > start and a < first:
                inside.append(b - a)
            elif b < start or a > newcomer.done:
                outside.append(b - a)
    out.update({"newcomer_prompt_tokens": newcomer.prompt_tokens, "newcomer_ttft_s": newcomer.ttft,
                "max_gap_during_prefill_s": max(inside, default=None),
                "gap_during_prefill_p50_s": pct(inside, 50), "gap_during_prefill_p90_s": pct(inside, 90),
                "usual_gap_p50_s": pct(outside, 50), "usual_gap_p99_s": pct(outside, 99)})
    return out


# --- main --------------------------------------------------------------------------------

def print_load(levels: dict[str, list[dict[str, Any]]]) -> None:
    print(f"\n{'server':13} {'C':>2} {'req':>4} {'tok/s':>7} {'xC1':>5} {'TTFT p50':>9} {'p95':>6} {'max':>6} "
          f"{'ITL p50':>8} {'p95':>6} {'p99':>6}  ms")
    for name, rows in levels.items():
        base = rows[0]["tokens_per_s"] if rows and rows[0]["clients"] == 1 else None
        for r in rows:
            flags = "".join([" PARTIAL" if r["partial"] else "",
                             f" errors={r['errors']} {r['error_samples']}" if r["errors"] else "",
                             f" short_answers={r['short_answers']}" if r["short_answers"] else "",
                             f" retried={r['retried']}" if r["retried"] else ""])
            print(f"{name:13} {r['clients']:>2} {r['requests']:>4} {r['tokens_per_s'] or 0:7.1f} "
                  f"{ratio(r['tokens_per_s'], base):>5} {ms(r['ttft_p50_s']):>9} {ms(r['ttft_p95_s']):>6} "
                  f"{ms(r['ttft_max_s']):>6} {ms(r['itl_p50_s']):>8} {ms(r['itl_p95_s']):>6} "
                  f"{ms(r['itl_p99_s']):>6}{flags}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,2,4,8", help="concurrency levels, comma-separated")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--llama-server",
                        default=str(LLAMA_SERVER_DEFAULT) if LLAMA_SERVER_DEFAULT.exists() else "none",
                        help="llama-server binary, or `none` to measure the agent alone")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (greedy, the default) or sampled; the agent treats greedy requests as repeatable")
    parser.add_argument("--ttft-tokens", type=int, default=376, help="long-prompt TTFT: prompt length in tokens")
    parser.add_argument("--ttft-rounds", type=int, default=5)
    parser.add_argument("--steady-clients", type=int, default=8)
    parser.add_argument("--newcomer-tokens", type=int, default=1000,
                        help="starvation: the newcomer's prompt, in tokens (llama-server's slots hold 1024)")
    parser.add_argument("--stagger-ms", type=float, default=400,
                        help="starvation: delay between steady clients' starts")
    parser.add_argument("--no-starvation", action="store_true")
    parser.add_argument("--max-seconds", type=float, default=1200, help="bound on the whole run")
    parser.add_argument("--request-timeout", type=float, default=300)
    parser.add_argument("--state-dir", type=Path, default=None)
    parser.add_argument("--agent-url", default=None, help="a loopback agent already running (not started here)")
    parser.add_argument("--llama-url", default=None, help="a loopback llama-server already running")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,2 clients, 1 request each, 32 tokens")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.requests_per_client, args.max_tokens = "1,2", 1, 32
        args.ttft_rounds, args.steady_clients, args.newcomer_tokens, args.stagger_ms = 1, 2, 400, 100
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    for url in (args.agent_url, args.llama_url):
        if url:
            require_loopback(url)

    from runtime.devices import choose_llama_placement, describe_cpu, llama_gpu_offload_supported

    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="edgefleet-load-"))
    bundles = {b.name: b for b in build_demo_bundles(state_dir / "models")}
    gguf = Path(bundles[CHAT_MODEL].weights).resolve()
    placement = choose_llama_placement(describe_cpu(), llama_gpu_offload_supported())
    prompts = Prompts(gguf)
    binary = None if args.llama_server == "none" else Path(args.llama_server)
    if binary is not None and not binary.exists() and not args.llama_url:
        raise SystemExit(f"{binary}: no such llama-server (build it as PEERS.md says, or pass --llama-server none)")

    results: dict[str, Any] = {"config": {
        "clients": clients, "requests_per_client": args.requests_per_client, "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "cpu": list(placement.reasons), "gguf": str(gguf), "llama_server": str(binary) if binary else args.llama_url,
        "agent_env": {k: v for k, v in os.environ.items() if k.startswith("EDGEFLEET_BATCHING")},
        "eog_banned": prompts.eog, "loadavg_before": os.getloadavg()}}
    with Processes() as procs:
        agent_url = args.agent_url or start_agent(procs, state_dir)[1]
        llama_url = args.llama_url
        if llama_url is None and binary is not None:
            llama_url = start_llama_server(procs, binary, gguf, placement, bundles[CHAT_MODEL].manifest.gguf.kv_type,
                                           state_dir / "llama-server.log")[1]
        results.update(asyncio.run(run(args, clients, prompts, agent_url, llama_url)))
    results["config"]["loadavg_after"] = os.getloadavg()
    report(results, args)


async def run(args: argparse.Namespace, clients: list[int], prompts: Prompts, agent_url: str,
              llama_url: str | None) -> dict[str, Any]:
    deadline = time.monotonic() + args.max_seconds
    # A fresh connection per request (a loopback connect is far below a millisecond): llama-server
    # closes keep-alive connections after a few requests or seconds idle, and a pooled connection
    # it has closed fails the next request ("Can not write request body"); both servers alike.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        targets = [Target("agent", agent_url, session, prompts.eog, deadline, args.request_timeout)]
        if llama_url:
            targets.append(Target("llama-server", llama_url, session, prompts.eog, deadline, args.request_timeout))
        for target in targets:
            target.temperature = args.temperature
        levels: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for c in clients:
            for target in targets:
                if target.expired():
                    continue
                levels[target.name].append(await load_level(target, prompts, c, args.requests_per_client,
                                                            args.max_tokens))
                print(f"  {target.name} at {c} clients: {levels[target.name][-1]['tokens_per_s'] or 0:.1f} tok/s",
                      file=sys.stderr, flush=True)
        ttft = await long_ttft(targets, prompts, args.ttft_tokens, args.ttft_rounds)
        starve = {}
        if not args.no_starvation:
            for target in targets:
                if not target.expired():
                    starve[target.name] = await starvation(
                        target, prompts, args.steady_clients, args.newcomer_tokens, args.max_tokens,
                        args.stagger_ms / 1000, phase_limit_s=max(30.0, args.request_timeout))
        return {"load": levels, "ttft_long": ttft, "starvation": starve,
                "timed_out": time.monotonic() >= deadline}


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    cfg = results["config"]
    print(f"cpu: {'; '.join(cfg['cpu'])}")
    print(f"load average before/after: {' '.join(f'{x:.2f}' for x in cfg['loadavg_before'])} / "
          f"{' '.join(f'{x:.2f}' for x in cfg['loadavg_after'])}")
    print(f"{cfg['max_tokens']}-token answers (EOS banned), unique prompts, {cfg['requests_per_client']} "
          f"requests per client after 1 warm-up; agent env {cfg['agent_env'] or '(defaults)'}")
    if results["timed_out"]:
        print(f"NOTE: --max-seconds {args.max_seconds:.0f} ran out; some figures are partial or missing")
    levels = results["load"]
    print_load(levels)
    if "llama-server" in levels:
        print(f"\n{'agent / llama-server':22} {'C':>2} {'tok/s':>6} {'TTFT p50':>9}")
        ls_rows = {r["clients"]: r for r in levels["llama-server"]}
        for r in levels["agent"]:
            peer = ls_rows.get(r["clients"])
            if peer:
                print(f"{'':22} {r['clients']:>2} {ratio(r['tokens_per_s'], peer['tokens_per_s']):>6} "
                      f"{ratio(r['ttft_p50_s'], peer['ttft_p50_s']):>9}")
    print("\nTTFT, one long unique prompt, no other load (median):")
    ttft = results["ttft_long"]
    for name, t in ttft.items():
        print(f"  {name:13} {ms(t['ttft_median_s']):>6} ms  ({t['prompt_tokens']} prompt tokens, "
              f"{t['rounds']} rounds){' errors: ' + str(t['errors']) if t['errors'] else ''}")
    if "llama-server" in ttft:
        print(f"  agent / llama-server {ratio(ttft['agent']['ttft_median_s'], ttft['llama-server']['ttft_median_s'])}")
    for name, s in results["starvation"].items():
        errors = f", errors {s['steady_errors']} {s['steady_error_samples']}" if s["steady_errors"] else ""
        print(f"\nstarvation ({name}): {s['steady_clients']} steady clients, {s['steady_requests']} requests{errors}")
        if "newcomer_error" in s:
            print(f"  newcomer: {s['newcomer_error']}")
            continue
        print(f"  newcomer: {s['newcomer_prompt_tokens']} prompt tokens, TTFT {ms(s['newcomer_ttft_s'])} ms")
        print(f"  running streams, gaps while it waited and prefilled: p50 {ms(s['gap_during_prefill_p50_s'])} / "
              f"p90 {ms(s['gap_during_prefill_p90_s'])} / largest {ms(s['max_gap_during_prefill_s'])} ms; "
              f"usual gap p50 {ms(s['usual_gap_p50_s'])} / p99 {ms(s['usual_gap_p99_s'])} ms")
        print(f"  steady requests' TTFT p50 {ms(s['steady_ttft_p50_s'])} ms, slowest {ms(s['steady_ttft_max_s'])} ms")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted (every process this benchmark started has been stopped)")
