"""Chat serving under concurrent load: the agent against llama.cpp's own llama-server, in one run.

    .venv/bin/python bench/bench_load.py [--clients 1,2,4,8] [--requests-per-client 3]
        [--llama-server PATH|none] [--peers default,tuned] [--ab-env KEY=VALUE]
        [--json PATH] [--quick]

All servers run as their own processes on loopback, on the same GGUF file (the demo chat
model, SmolLM2-135M-Instruct Q4_1, taken from the demo bundle the agent serves), with the same
thread counts and weight repacking choice as the agent's (`-nr` on AMX CPUs). llama-server runs
in two configurations at once (issue 29): as users run it (`--parallel 8 -c 16384 -t N`,
"llama-server") and tuned like the agent (`-kvu -ctk KV -ctv KV -fa on` with the bundle's KV
cache type, "llama-server-tuned"); ratios are taken against the better of the two at each
level. The agent uses its [batching] settings, so
`EDGEFLEET_BATCHING__GGUF_SLOTS=1 .venv/bin/python bench/bench_load.py` measures it with
continuous batching off. `--ab-env KEY=VALUE` starts a second agent ("agent-B") with that
environment, measured interleaved with the others: `--ab-env EDGEFLEET_BENCH_OLD_PATHS=wake,write,sample`
is the agent with the per-token paths issue 29 replaced (a loop wake-up per token per stream,
one socket write per SSE event, one argmax per greedy row). --llama-server defaults to where
shared/PEERS.md (next to the checkouts) builds it from the llama-cpp-python sdist the agent
uses, so all run the same kernels; `--llama-server none` measures the agent alone.

Every request is an OpenAI streamed chat completion (stream=true, SSE) with a unique prompt
(unique text at its very start, so llama-server's prompt cache cannot reuse another request's
prefix), temperature 0 and every end-of-generation token banned by logit_bias, so every answer
is exactly --max-tokens (128) tokens; the usage chunk (stream_options.include_usage) is checked
and answers of another length are counted and reported.

What it measures, in this order:
  single    one stream's decode tokens/s (first to last token), the agent against
            llama-cpp-python in this process with the agent's settings, --single-rounds
            alternated (the measurement of bench/bench_inference.py).
  load      for each concurrency C in --clients: C closed-loop clients, --requests-per-client
            requests each, after one warm-up request that is not counted; every server at C
            in turn, the order rotated per level, so that machine noise hits all. Per level: aggregate decode
            tokens/s (all completion tokens / wall time of the level), time to first token
            (request sent -> first content delta) p50/p95/max, inter-token latency (gaps
            between content deltas, all streams pooled) p50/p95/p99, and tokens/s relative to
            the same server's 1-client figure, and the CPU time of the server's main thread
            per token (the agent's event loop: what its Python costs, which a shared machine
            slows but does not inflate).
  ttft      one client, no other load: a unique ~310-token prompt, median TTFT of --ttft-rounds,
            alternating the servers.
  kernels   llama.cpp's own `llama-batched-bench` from the same build (next to --llama-server,
            or --batched-bench), no server at all: prompt reading at the TTFT prompt's length
            and decode at every --clients level with the load test's prompt and answer
            lengths, for the agent's attention settings (its KV cache type, flash attention on)
            and for llama-server's default ones (f16 KV, flash attention auto), --kernel-rounds
            interleaved, the best of each. Where a goal is out of reach because of the kernels
            (the agent's KV cache type reads prompts slower than the default's f16 on some
            CPUs, and an f16 cache breaks the repeatable-greedy rule, docs/architecture.md),
            this shows it: the goals table prints the kernels' own ratio beside the figure.
  starve    --steady-clients (8) clients stream steadily (closed loop, starts staggered); once
            each has finished a request, a newcomer sends a unique ~1,000-token prompt. Reported:
            the largest gap between two tokens of any running stream while the newcomer waited
            and its prompt was processed (send -> its first token), the running streams' usual
            gaps (p50/p99 outside that window), the newcomer's TTFT (which includes waiting for
            a free slot when all are busy), and the slowest TTFT of the steady clients' requests
            (each client's first request left out).

At the end, issue 29's goals with PASS or MISS each: tokens/s against the better llama-server
>= 0.97 at 1 client, >= 1.0 at 4, >= 1.05 at 8; TTFT alone <= 1.0; TTFT p50 under load <= 1.0
(the worst level above 1 client); single stream >= 0.97 of in-process llama-cpp-python.

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


def placement_args(placement: Any) -> list[str]:
    """The agent's threads and repacking choice as llama.cpp's tools take them, so that every
    peer and the kernels' bench run what the agent runs."""
    argv = ["-t", str(placement.n_threads)]
    if placement.n_threads_batch != placement.n_threads:
        argv += ["-tb", str(placement.n_threads_batch)]
    if not placement.use_extra_bufts:  # AMX: repacking crashes (PEERS.md); the agent turns it off too
        argv.append("-nr")
    return argv


def tool_env(binary: Path) -> dict[str, str]:
    """The environment for a llama.cpp tool from a build tree: its shared libraries beside it."""
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(
        p for p in (str(binary.parent), os.environ.get("LD_LIBRARY_PATH", "")) if p)}


def peer_args(placement: Any, tuned: bool, kv_type: str) -> list[str]:
    """llama-server's settings: as users run it (`--parallel 8 -c 16384 -t N`), or `tuned` like
    the agent (one unified KV cache, the agent's KV cache type, flash attention on)."""
    argv = ["--parallel", "8", "-c", "16384", *placement_args(placement)]
    if tuned:
        argv += ["-kvu", "-ctk", kv_type, "-ctv", kv_type, "-fa", "on"]
    return argv


def start_llama_server(procs: Processes, binary: Path, gguf: Path, args: list[str],
                       log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    argv = [str(binary), "-m", str(gguf), *args, "--host", "127.0.0.1", "--port", str(port)]
    proc = procs.start(argv, tool_env(binary), log)
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
        #: the server's process id where this run started it (its loop thread's CPU time is read)
        self.pid: int | None = None

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

    loop_cpu = main_thread_cpu_s(target.pid)
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - started
    out = {**summarize(streams, wall, max_tokens), "clients": clients, "partial": partial}
    if loop_cpu is not None and out["tokens"]:
        after = main_thread_cpu_s(target.pid) or loop_cpu
        out["main_thread_cpu_ms_per_token"] = (after - loop_cpu) * 1000 / out["tokens"]
    return out


def main_thread_cpu_s(pid: int | None) -> float | None:
    """CPU seconds of a process's main thread (the agent's event loop; llama-server's HTTP
    thread) from /proc/PID/task/PID/schedstat: a machine shared with other work slows it
    down but does not add to it, so it compares the agent's Python per token across runs."""
    if pid is None:
        return None
    try:
        return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


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


#: Issue 29's goals for tokens/s, agent over the better llama-server, by clients.
GOALS = {1: 0.97, 4: 1.0, 8: 1.05}
PEERS = ("llama-server", "llama-server-tuned")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,2,4,8", help="concurrency levels, comma-separated")
    parser.add_argument("--requests-per-client", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--llama-server",
                        default=str(LLAMA_SERVER_DEFAULT) if LLAMA_SERVER_DEFAULT.exists() else "none",
                        help="llama-server binary, or `none` to measure the agent alone")
    parser.add_argument("--peers", default="default,tuned",
                        help="llama-server configurations to run: default (as users run it), tuned (like the agent)")
    parser.add_argument("--ab-env", action="append", default=[], metavar="KEY=VALUE",
                        help="also run a second agent with this environment (an A/B in the same run), "
                             "e.g. EDGEFLEET_BENCH_OLD_PATHS=wake,write,sample for the per-token paths")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 (greedy, the default) or sampled; the agent treats greedy requests as repeatable")
    parser.add_argument("--ttft-tokens", type=int, default=310, help="TTFT alone: prompt length in tokens")
    parser.add_argument("--ttft-rounds", type=int, default=5)
    parser.add_argument("--single-rounds", type=int, default=3,
                        help="single stream against in-process llama-cpp-python (0: skip)")
    parser.add_argument("--steady-clients", type=int, default=8)
    parser.add_argument("--newcomer-tokens", type=int, default=1000,
                        help="starvation: the newcomer's prompt, in tokens (llama-server's slots hold 2048)")
    parser.add_argument("--stagger-ms", type=float, default=400,
                        help="starvation: delay between steady clients' starts")
    parser.add_argument("--no-starvation", action="store_true")
    parser.add_argument("--batched-bench", default=None,
                        help="llama-batched-bench binary for the kernels' figures (default: next to "
                             "--llama-server), or `none`")
    parser.add_argument("--kernel-rounds", type=int, default=2,
                        help="kernels: rounds of llama-batched-bench per configuration (0: skip)")
    parser.add_argument("--max-seconds", type=float, default=2400, help="bound on the whole run")
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
        args.single_rounds = min(args.single_rounds, 1)
    clients = [int(c) for c in args.clients.split(",") if c.strip()]
    for url in (args.agent_url, args.llama_url):
        if url:
            require_loopback(url)

    from runtime.devices import choose_llama_placement, describe_cpu, llama_gpu_offload_supported

    state_dir = args.state_dir or Path(tempfile.mkdtemp(prefix="edgefleet-load-"))
    bundles = {b.name: b for b in build_demo_bundles(state_dir / "models")}
    chat = bundles[CHAT_MODEL]
    gguf = Path(chat.weights).resolve()
    placement = choose_llama_placement(describe_cpu(), llama_gpu_offload_supported())
    prompts = Prompts(gguf)
    binary = None if args.llama_server == "none" else Path(args.llama_server)
    if binary is not None and not binary.exists() and not args.llama_url:
        raise SystemExit(f"{binary}: no such llama-server (build it as PEERS.md says, or pass --llama-server none)")
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    kv_type = chat.manifest.gguf.kv_type
    ab = dict(kv.split("=", 1) for kv in args.ab_env)

    results: dict[str, Any] = {"config": {
        "clients": clients, "requests_per_client": args.requests_per_client, "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "cpu": list(placement.reasons), "gguf": str(gguf), "llama_server": str(binary) if binary else args.llama_url,
        "peer_args": {"llama-server" if peer == "default" else "llama-server-tuned":
                      " ".join(peer_args(placement, peer == "tuned", kv_type)) for peer in peers if binary},
        "agent_env": {k: v for k, v in os.environ.items()
                      if k.startswith(("EDGEFLEET_BATCHING", "EDGEFLEET_BENCH", "EDGEFLEET_TUNING"))},
        "ab_env": ab, "eog_banned": prompts.eog, "loadavg_before": os.getloadavg()}}
    with Processes() as procs:
        pids: dict[str, int] = {}
        urls: dict[str, str] = {}
        if args.agent_url:
            urls["agent"] = args.agent_url
        else:
            proc, urls["agent"] = start_agent(procs, state_dir)
            pids["agent"] = proc.pid
        if ab:
            (state_dir / "b").mkdir(exist_ok=True)
            proc, urls["agent-B"] = start_agent(procs, state_dir / "b", ab, tag="agent-b")
            pids["agent-B"] = proc.pid
        if args.llama_url:
            urls["llama-server"] = args.llama_url
        elif binary is not None:
            for peer in peers:
                name = "llama-server" if peer == "default" else "llama-server-tuned"
                proc, urls[name] = start_llama_server(procs, binary, gguf,
                                                      peer_args(placement, peer == "tuned", kv_type),
                                                      state_dir / f"{name}.log")
                pids[name] = proc.pid
        single = None
        if args.single_rounds:
            single = single_stream(args, chat, placement, urls["agent"], prompts.eog)
        results.update(asyncio.run(run(args, clients, prompts, urls, pids)))
        results["single"] = single
    batched = batched_bench_binary(args, binary)
    if batched is not None and args.kernel_rounds > 0:
        load_prompt = max((r.get("prompt_tokens_max") or 0 for r in results["load"].get("agent", [])), default=0)
        results["kernels"] = kernel_figures(batched, gguf, placement, kv_type, args.ttft_tokens,
                                            load_prompt or 64, args.max_tokens, clients, args.kernel_rounds)
    results["config"]["loadavg_after"] = os.getloadavg()
    report(results, args)


def batched_bench_binary(args: argparse.Namespace, server: Path | None) -> Path | None:
    """The llama-batched-bench to run: --batched-bench, else the one built beside llama-server
    (PEERS.md builds both), else none."""
    if args.batched_bench == "none":
        return None
    if args.batched_bench:
        path = Path(args.batched_bench)
        if not path.exists():
            raise SystemExit(f"{path}: no such llama-batched-bench (build it as PEERS.md says, or pass none)")
        return path
    if server is not None and (server.parent / "llama-batched-bench").exists():
        return server.parent / "llama-batched-bench"
    return None


#: the attention settings compared at the kernels: the agent's and llama-server's default
KERNEL_CONFIGS = ("agent", "llama-server")


def kernel_figures(binary: Path, gguf: Path, placement: Any, kv_type: str, ttft_tokens: int, load_prompt: int,
                   max_tokens: int, clients: list[int], rounds: int) -> dict[str, Any]:
    """llama-batched-bench's prompt and decode speeds for the agent's attention settings and
    llama-server's default ones, same build, same threads and repacking choice as the servers,
    rounds interleaved; the best (shortest) time of each is kept, as noise only ever adds."""
    base = ["-m", str(gguf), "-b", "2048", "-ub", "512", *placement_args(placement), "--output-format", "jsonl"]
    attention = {"agent": ["-fa", "on", "-ctk", kv_type, "-ctv", kv_type], "llama-server": ["-fa", "auto"]}
    levels = sorted(set(clients))
    runs = {  # name -> argv tail
        "prompt": ["-c", str(ttft_tokens + 64), "-npp", str(ttft_tokens), "-ntg", "1", "-npl", "1"],
        "decode": ["-c", str(max(levels) * (load_prompt + max_tokens) + 64), "-npp", str(load_prompt),
                   "-ntg", str(max_tokens), "-npl", ",".join(map(str, levels))],
    }
    env = tool_env(binary)
    best: dict[str, dict[str, dict[int, dict[str, float]]]] = {c: {"prompt": {}, "decode": {}} for c in KERNEL_CONFIGS}
    for _ in range(rounds):
        for config in KERNEL_CONFIGS:
            for what, tail in runs.items():
                time.sleep(SETTLE_S)
                out = subprocess.run([str(binary), *base, *attention[config], *tail], capture_output=True,
                                     text=True, env=env, timeout=600, check=False)
                rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
                if out.returncode != 0 or not rows:
                    raise SystemExit(f"llama-batched-bench failed (exit {out.returncode}): {out.stderr[-800:]}")
                for row in rows:
                    kept = best[config][what].get(row["pl"])
                    if kept is None or row["t"] < kept["t"]:
                        best[config][what][row["pl"]] = row
    print(f"  kernels: llama-batched-bench, {rounds} rounds", file=sys.stderr, flush=True)
    return {"binary": str(binary), "rounds": rounds, "kv_type": kv_type, "ttft_tokens": ttft_tokens,
            "load_prompt_tokens": load_prompt, "max_tokens": max_tokens,
            "args": {c: " ".join(base[2:] + attention[c]) for c in KERNEL_CONFIGS},
            "prompt_s": {c: best[c]["prompt"][1]["t_pp"] for c in KERNEL_CONFIGS},
            "decode_tokens_per_s": {c: {pl: row["speed_tg"] for pl, row in best[c]["decode"].items()}
                                    for c in KERNEL_CONFIGS}}


def single_stream(args: argparse.Namespace, chat: Any, placement: Any, agent_url: str,
                  eog: list[int]) -> dict[str, Any]:
    """Decode tokens/s of one stream: the agent (streamed over HTTP, first to last token) against
    llama-cpp-python in this process with the agent's settings, rounds alternated
    (bench/bench_inference.py's measurement, with this run's request shape)."""
    import llama_cpp

    from runtime.gguf.gguf_backend import extra_buffer_types
    from runtime.gguf.llama_params import kv_cache_args

    with extra_buffer_types(placement.use_extra_bufts):
        llm = llama_cpp.Llama(str(chat.weights), n_ctx=chat.manifest.gguf.n_ctx, n_threads=placement.n_threads,
                              n_threads_batch=placement.n_threads_batch, n_gpu_layers=placement.n_gpu_layers,
                              flash_attn=chat.manifest.gguf.flash_attn, verbose=False,
                              **kv_cache_args(chat.manifest.gguf.kv_type))
    bias = {t: -100.0 for t in eog}

    def in_process() -> float:
        stamps = []
        for part in llm.create_completion(USER, max_tokens=args.max_tokens, temperature=0, stream=True,
                                          logit_bias=bias):
            if part["choices"][0]["text"]:
                stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    def agent() -> float:
        body = json.dumps({"model": CHAT_MODEL, "prompt": USER, "max_tokens": args.max_tokens, "temperature": 0,
                           "stream": True, "logit_bias": {str(t): -100 for t in eog}}).encode()
        req = urllib.request.Request(agent_url + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        stamps = []
        with urllib.request.urlopen(req, timeout=args.request_timeout) as resp:
            for line in resp:
                if line.startswith(b"data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    agent(), in_process()  # warm both
    base, ours = [], []
    for _ in range(args.single_rounds):
        time.sleep(SETTLE_S)
        base.append(in_process())
        time.sleep(SETTLE_S)
        ours.append(agent())
    return {"in_process_tokens_per_s": statistics.median(base), "agent_tokens_per_s": statistics.median(ours),
            "rounds": args.single_rounds}


async def run(args: argparse.Namespace, clients: list[int], prompts: Prompts, urls: dict[str, str],
              pids: dict[str, int]) -> dict[str, Any]:
    deadline = time.monotonic() + args.max_seconds
    # A fresh connection per request (a loopback connect is far below a millisecond): llama-server
    # closes keep-alive connections after a few requests or seconds idle, and a pooled connection
    # it has closed fails the next request ("Can not write request body"); all servers alike.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        targets = [Target(name, url, session, prompts.eog, deadline, args.request_timeout)
                   for name, url in urls.items()]
        for target in targets:
            target.temperature = args.temperature
            target.pid = pids.get(target.name)
        levels: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
        for n, c in enumerate(clients):
            # interleaved, the order turned each level, so that machine noise hits every server
            for target in targets[n % len(targets):] + targets[:n % len(targets)]:
                if target.expired():
                    continue
                levels[target.name].append(await load_level(target, prompts, c, args.requests_per_client,
                                                            args.max_tokens))
                print(f"  {target.name} at {c} clients: {levels[target.name][-1]['tokens_per_s'] or 0:.1f} tok/s",
                      file=sys.stderr, flush=True)
        for rows in levels.values():
            rows.sort(key=lambda r: r["clients"])
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


def _best_peer(rows: dict[str, dict[int, dict[str, Any]]], clients: int, key: str,
               higher: bool) -> tuple[str, float] | None:
    """The better llama-server configuration's figure at `clients` (higher or lower is better)."""
    seen = [(name, rows[name][clients][key]) for name in PEERS
            if name in rows and clients in rows[name] and rows[name][clients].get(key)]
    if not seen:
        return None
    return (max if higher else min)(seen, key=lambda item: item[1])


def goals(results: dict[str, Any]) -> list[tuple[str, str, str, bool | None]]:
    """(goal, figure, bound, met) for issue 29's goals against the better llama-server."""
    rows = {name: {r["clients"]: r for r in levels} for name, levels in results["load"].items()}
    out: list[tuple[str, str, str, bool | None]] = []
    agent = rows.get("agent", {})
    for c, bound in GOALS.items():
        best = _best_peer(rows, c, "tokens_per_s", higher=True)
        if c in agent and best and agent[c]["tokens_per_s"]:
            value = agent[c]["tokens_per_s"] / best[1]
            out.append((f"tok/s at {c} client{'s' if c > 1 else ''} / {best[0]}", f"{value:.2f}", f">= {bound}",
                        value >= bound))
    ttft = results["ttft_long"]
    peers = [(name, ttft[name]["ttft_median_s"]) for name in PEERS if name in ttft and ttft[name]["ttft_median_s"]]
    if peers and ttft.get("agent", {}).get("ttft_median_s"):
        name, best_s = min(peers, key=lambda item: item[1])
        value = ttft["agent"]["ttft_median_s"] / best_s
        figure = f"{value:.2f}"
        kernels = results.get("kernels")
        if kernels:  # the same prompt read by the kernels alone, agent's settings / default's
            figure += f" (kernels {kernels['prompt_s']['agent'] / kernels['prompt_s']['llama-server']:.2f})"
        out.append((f"TTFT alone / {name}", figure, "<= 1.0", value <= 1.0))
    loaded = []
    for c in sorted(agent):
        best = _best_peer(rows, c, "ttft_p50_s", higher=False)
        if c > 1 and best and agent[c]["ttft_p50_s"]:
            loaded.append((c, agent[c]["ttft_p50_s"] / best[1]))
    if loaded:
        worst = max(loaded, key=lambda item: item[1])
        figures = ", ".join(f"{v:.2f}@{c}" for c, v in loaded)
        out.append(("TTFT p50 under load (worst level)", figures, "<= 1.0", worst[1] <= 1.0))
    single = results.get("single")
    if single:
        value = single["agent_tokens_per_s"] / single["in_process_tokens_per_s"]
        out.append(("single stream / in-process llama-cpp-python", f"{value:.2f}", ">= 0.97", value >= 0.97))
    return out


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    cfg = results["config"]
    print(f"cpu: {'; '.join(cfg['cpu'])}")
    print(f"load average before/after: {' '.join(f'{x:.2f}' for x in cfg['loadavg_before'])} / "
          f"{' '.join(f'{x:.2f}' for x in cfg['loadavg_after'])}")
    print(f"{cfg['max_tokens']}-token answers (EOS banned), unique prompts, {cfg['requests_per_client']} "
          f"requests per client after 1 warm-up; agent env {cfg['agent_env'] or '(defaults)'}"
          f"{'; agent-B env ' + str(cfg['ab_env']) if cfg['ab_env'] else ''}")
    for name, argv in cfg["peer_args"].items():
        print(f"{name}: {argv}")
    if results["timed_out"]:
        print(f"NOTE: --max-seconds {args.max_seconds:.0f} ran out; some figures are partial or missing")
    levels = results["load"]
    print_load(levels)
    rows = {name: {r["clients"]: r for r in level} for name, level in levels.items()}
    if any(name in rows for name in PEERS):
        print(f"\n{'against the better llama-server':32} {'C':>2} {'tok/s':>6} {'TTFT p50':>9}")
        for name in [n for n in rows if not n.startswith("llama-server")]:
            for c, r in rows[name].items():
                tps = _best_peer(rows, c, "tokens_per_s", higher=True)
                ttft = _best_peer(rows, c, "ttft_p50_s", higher=False)
                print(f"{name:32} {c:>2} {ratio(r['tokens_per_s'], tps[1] if tps else None):>6} "
                      f"{ratio(r['ttft_p50_s'], ttft[1] if ttft else None):>9}")
    if "agent-B" in rows:
        print("\nagent / agent-B (the A/B), tok/s:", ", ".join(
            f"{c}: {ratio(r['tokens_per_s'], rows['agent-B'][c]['tokens_per_s'])}"
            for c, r in rows["agent"].items() if c in rows["agent-B"]))
    cpu = {name: {c: r["main_thread_cpu_ms_per_token"] for c, r in level.items() if "main_thread_cpu_ms_per_token" in r}
           for name, level in rows.items()}
    if any(cpu.values()):
        print("main thread CPU per token (agent: the event loop), ms:")
        for name, by_c in cpu.items():
            if by_c:
                print(f"  {name:19} " + ", ".join(f"{c}: {v:.3f}" for c, v in by_c.items()))
    print("\nTTFT, one long unique prompt, no other load (median):")
    ttft = results["ttft_long"]
    for name, t in ttft.items():
        print(f"  {name:19} {ms(t['ttft_median_s']):>6} ms  ({t['prompt_tokens']} prompt tokens, "
              f"{t['rounds']} rounds){' errors: ' + str(t['errors']) if t['errors'] else ''}")
    kernels = results.get("kernels")
    if kernels:
        print(f"\nkernels alone (llama-batched-bench, same build, best of {kernels['rounds']} interleaved rounds):")
        for config in KERNEL_CONFIGS:
            print(f"  {config:13} {kernels['args'][config]}")
        decode = kernels["decode_tokens_per_s"]
        print(f"  {'':13} {'prompt ' + str(kernels['ttft_tokens']) + ' tok':>16}  decode tok/s at "
              + ", ".join(f"{pl}" for pl in decode["agent"]) + f" seqs ({kernels['load_prompt_tokens']}-token "
              f"prompt, {kernels['max_tokens']}-token answers)")
        for config in KERNEL_CONFIGS:
            print(f"  {config:13} {kernels['prompt_s'][config] * 1000:>13.0f} ms  "
                  + ", ".join(f"{v:.1f}" for v in decode[config].values()))
        print("  agent's settings / default's: prompt time "
              f"{kernels['prompt_s']['agent'] / kernels['prompt_s']['llama-server']:.2f}, decode "
              + ", ".join(f"{decode['agent'][pl] / decode['llama-server'][pl]:.2f}@{pl}"
                          for pl in decode["agent"] if pl in decode["llama-server"]))
    single = results.get("single")
    if single:
        print(f"\nsingle stream decode: agent {single['agent_tokens_per_s']:.1f} tok/s, in-process llama-cpp-python "
              f"{single['in_process_tokens_per_s']:.1f} tok/s (median of {single['rounds']})")
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
    table = goals(results)
    if table:
        print("\nissue 29 goals (agent against the better llama-server configuration, same run):")
        print(f"  {'goal':46} {'figure':>22} {'bound':>8}  verdict")
        for what, figure, bound, met in table:
            print(f"  {what:46} {figure:>22} {bound:>8}  {'PASS' if met else 'MISS'}")
    results["goals"] = [{"goal": g, "figure": f, "bound": b, "met": m} for g, f, b, m in table]
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nfigures written to {args.json}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted (every process this benchmark started has been stopped)")
