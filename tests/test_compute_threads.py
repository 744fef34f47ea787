"""llama.cpp computes a model's tokens on that model's thread alone.

llama.cpp's CPU backend runs each graph on an OpenMP team, and libgomp keeps a team for
every thread that ever computed. Once it counts more team threads than CPUs it stops
spinning at barriers: each compute thread then sleeps and is woken at every barrier of
the graph, about a hundred times a token, and single-stream decode on the 2-core VM lost
about 10% to it (a load-time check decoding on the loading thread was enough). What a
user sees is the speed; what this test checks is the cause, on the agent as its own
process: while a stream decodes, the busy threads do not go to sleep once per barrier.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

from agent_process import serve
from conftest import CHAT

TOKENS = 96


def thread_counters(pid: int) -> dict[str, tuple[float, int]]:
    """Per thread: (seconds on a CPU, voluntary context switches)."""
    counters = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            ran = int((task / "schedstat").read_text().split()[0]) / 1e9
            status = (task / "status").read_text()
        except OSError:  # the thread ended meanwhile
            continue
        voluntary = int(status.split("\nvoluntary_ctxt_switches:")[1].split()[0])
        counters[task.name] = (ran, voluntary)
    return counters


def stream_tokens(port: int, tokens: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    conn.request("POST", "/v1/completions", body=json.dumps({
        "model": CHAT, "prompt": "Write a long story about a lighthouse keeper.", "max_tokens": tokens,
        "temperature": 0, "stream": True, "logit_bias": {"2": -100},
    }), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    pieces = sum(1 for line in response if line.startswith(b"data: {"))
    conn.close()
    return pieces


def test_decode_threads_spin_at_barriers_instead_of_sleeping_at_each(state_dir, tmp_path):
    with serve(state_dir, tmp_path) as agent:
        stream_tokens(agent.port, 8)  # the model thread's team exists from here on
        before = thread_counters(agent.proc.pid)
        assert stream_tokens(agent.port, TOKENS) >= TOKENS
        after = thread_counters(agent.proc.pid)
    busy = sorted(
        ((after[t][0] - before[t][0], after[t][1] - before[t][1]) for t in after if t in before),
        reverse=True,
    )[:2]  # the model thread and its OpenMP worker: the two that computed the tokens
    for cpu_s, voluntary in busy:
        assert voluntary / TOKENS < 10, (
            f"a compute thread slept {voluntary / TOKENS:.0f} times a token ({cpu_s:.1f} s on a CPU): "
            "libgomp stopped spinning, so some other thread has run a llama.cpp graph"
        )
