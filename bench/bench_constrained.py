"""What constrained decoding (response_format json_schema) costs: throughput against
unconstrained requests at 1 and 8 clients, the cost one constrained request puts on the
unconstrained ones beside it, and llama-server's json_schema side by side, in one run.

    .venv/bin/python bench/bench_constrained.py [--clients 1,8] [--requests-per-client 2]
        [--max-tokens 128] [--rounds 1] [--llama-server PATH|none]

Both servers as bench/bench_load.py starts them (the agent `serve --demo`, llama-server with
`--parallel 8 -c 8192`, the same threads, KV type and `-nr` on AMX), the same GGUF. Every
request is a non-streamed chat completion, temperature 0, with a unique prompt and every
end-of-generation token banned by logit_bias, so unconstrained answers are --max-tokens long;
constrained ones carry the schema below (a title and a free story: the grammar is active on
every token) and end where the JSON ends or at --max-tokens.

Per server and level C: C closed-loop clients, --requests-per-client requests each;
tokens/s = completion tokens / wall time. "mixed": at the highest level, one client sends
constrained requests and the others unconstrained; the figure is the unconstrained clients'
tokens/s per client against the same in the all-unconstrained run (1.00: no cost to them).
Rounds alternate the servers so that machine noise hits both; medians over rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp
from bench_load import (
    CHAT_MODEL,
    LLAMA_SERVER_DEFAULT,
    Processes,
    Prompts,
    build_demo_bundles,
    start_agent,
    start_llama_server,
)

SCHEMA = {"type": "object", "properties": {"title": {"type": "string", "maxLength": 40},
                                           "story": {"type": "string"}},
          "required": ["title", "story"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "story", "schema": SCHEMA, "strict": True}}
#: Where shared/PEERS.md's recipe was run by hand for this bench (tried before bench_load's).
LOCAL_BUILD = Path("/tmp/lsrv/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin/llama-server")


async def one(http: aiohttp.ClientSession, url: str, prompts: Prompts, constrained: bool,
              max_tokens: int) -> int:
    body: dict[str, Any] = {"model": CHAT_MODEL, "messages": prompts.chat(), "max_tokens": max_tokens,
                            "temperature": 0, "logit_bias": {str(t): -100 for t in prompts.eog}}
    if constrained:
        body["response_format"] = FORMAT
    async with http.post(url + "/v1/chat/completions", json=body) as resp:
        answer = await resp.json(content_type=None)
        if resp.status != 200:
            raise SystemExit(f"{url}: {resp.status} {answer}")
    return int(answer["usage"]["completion_tokens"])


async def level(url: str, prompts: Prompts, kinds: list[bool], requests: int, max_tokens: int) -> list[float]:
    """Clients of the given kinds (True: constrained) at once; tokens/s of each client."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900)) as http:
        await one(http, url, prompts, False, 8)  # warm-up

        async def client(constrained: bool) -> float:
            start, tokens = time.monotonic(), 0
            for _ in range(requests):
                tokens += await one(http, url, prompts, constrained, max_tokens)
            return tokens / (time.monotonic() - start)

        return list(await asyncio.gather(*(client(k) for k in kinds)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8")
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--llama-server", default=None, help="binary, or `none` for the agent alone")
    args = parser.parse_args()
    levels = [int(c) for c in args.clients.split(",")]
    binary = None
    if args.llama_server != "none":
        candidates = [Path(args.llama_server)] if args.llama_server else [LOCAL_BUILD, LLAMA_SERVER_DEFAULT]
        binary = next((c for c in candidates if c.exists()), None)
        if binary is None:
            print("no llama-server binary (shared/PEERS.md builds one): the agent's ratios only")
    from runtime.devices import choose_llama_placement, describe_cpu

    placement = choose_llama_placement(describe_cpu(), gpu_offload_supported=False)
    with tempfile.TemporaryDirectory() as tmp, Processes() as procs:
        state = Path(tmp)
        build_demo_bundles(state / "models")
        gguf = next((state / "models").rglob("*.gguf"))
        prompts = Prompts(gguf)
        servers = {"edgefleet": start_agent(procs, state)[1]}
        if binary is not None:
            servers["llama-server"] = start_llama_server(procs, binary, gguf, placement, "q8_0",
                                                         state / "llama-server.log")[1]
        results: dict[tuple[str, str, int], list[float]] = {}
        top = max(levels)
        for _ in range(args.rounds):
            for clients in levels:
                for name, url in servers.items():
                    for mode, kinds in (("plain", [False] * clients), ("json_schema", [True] * clients)):
                        rates = asyncio.run(level(url, prompts, kinds, args.requests_per_client, args.max_tokens))
                        results.setdefault((name, mode, clients), []).append(sum(rates))
                        if mode == "plain" and clients == top:
                            results.setdefault((name, "plain per client", clients), []).append(
                                statistics.mean(rates))
            for name, url in servers.items():
                rates = asyncio.run(level(url, prompts, [True] + [False] * (top - 1), args.requests_per_client,
                                          args.max_tokens))
                results.setdefault((name, "mixed", top), []).append(statistics.mean(rates[1:]))

    def fig(name: str, mode: str, clients: int) -> float:
        return statistics.median(results[(name, mode, clients)])

    print(f"SmolLM2-135M-Instruct Q4_1, {args.max_tokens}-token answers, {args.rounds} round(s), "
          f"{args.requests_per_client} requests per client; tokens/s (json_schema / plain)")
    header = "| clients | " + " | ".join(f"{n} plain | {n} json_schema | ratio" for n in servers) + " |"
    print(header)
    print("|" + " --- |" * (1 + 3 * len(servers)))
    for clients in levels:
        cells = []
        for name in servers:
            plain, con = fig(name, "plain", clients), fig(name, "json_schema", clients)
            cells += [f"{plain:.1f}", f"{con:.1f}", f"{con / plain:.2f}"]
        print(f"| {clients} | " + " | ".join(cells) + " |")
    for name in servers:
        alone, mixed = fig(name, "plain per client", top), fig(name, "mixed", top)
        print(f"{name}: an unconstrained client beside 1 constrained + {top - 2} unconstrained: "
              f"{mixed:.1f} tok/s against {alone:.1f} among {top} unconstrained ({mixed / alone:.2f})")


if __name__ == "__main__":
    main()
