"""Reading several waiting prompts in one llama.cpp call against one call per prompt.

    .venv/bin/python bench/bench_prompts.py [--rounds 6] [--cases 4x48,8x48,2x64,4x16]

Why: the batching engine reads the prompts of requests that wait together in one call, an
equal piece of each (runtime/gguf/gguf_batch.py, `_read_prompts_together`), as llama-server
reads every waiting prompt in one batch. This bench shows what that saves on this machine,
on the context the engine makes (the demo chat model, 8 slots of 2048 cells, the agent's KV
cache type, thread counts and weight-repacking choice: the engine itself, loaded as the agent
loads it), and that each prompt's final logits are the same bits either way (the engine
measures the same at start, `splits_free`).

Each case NxL is N distinct prompts of L tokens. Per round, alternating: the N prompts read
one call each, then all N in one call (sequence ids 0..N-1, in order, so llama.cpp puts
them in one ubatch). Prints the median of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.cli.demo import CHAT_MODEL, build_demo_bundles  # noqa: E402
from runtime.devices import MachineSettings, describe_cpu  # noqa: E402
from runtime.gguf.gguf_backend import GgufBackend  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--cases", default="4x48,8x48,2x64,4x16", help="NxL: N prompts of L tokens")
    args = parser.parse_args()
    cases = [tuple(int(x) for x in case.split("x")) for case in args.cases.split(",")]

    import numpy as np

    state_dir = Path(tempfile.mkdtemp(prefix="edgefleet-bench-prompts-"))
    chat = {b.name: b for b in build_demo_bundles(state_dir / "models")}[CHAT_MODEL]
    backend = GgufBackend(chat, MachineSettings(cpu=describe_cpu()))  # as the agent loads it
    engine = backend.engine
    if engine is None:
        raise SystemExit("continuous batching is off for the demo model: no engine to measure")
    for n, length in cases:
        if n > engine.slots or n * length > engine._call_rows:
            raise SystemExit(f"case {n}x{length}: the engine's calls hold {engine.slots} prompts and "
                             f"{engine._call_rows} tokens")
    lib, ctx, batch = engine._lib, engine._ctx, engine._batch

    def decode(n_tokens: int) -> None:
        batch.n_tokens = n_tokens
        if lib.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")

    def clear() -> None:
        for seq in range(engine.slots):
            lib.llama_memory_seq_rm(engine._mem, seq, -1, -1)

    def one_call_each(prompts: list[list[int]]) -> list[np.ndarray]:
        finals = []
        for seq, prompt in enumerate(prompts):
            for pos, token in enumerate(prompt):
                engine._put(pos, token, pos, seq, pos == len(prompt) - 1)
            decode(len(prompt))
            finals.append(engine._row(len(prompt) - 1).copy())
        return finals

    def one_call(prompts: list[list[int]]) -> list[np.ndarray]:
        i = 0
        for seq, prompt in enumerate(prompts):
            for pos, token in enumerate(prompt):
                engine._put(i, token, pos, seq, pos == len(prompt) - 1)
                i += 1
        decode(i)
        ends = np.cumsum([len(p) for p in prompts]) - 1
        return [engine._row(int(end)).copy() for end in ends]

    n_vocab = backend._llm.n_vocab()
    print(f"# {describe_cpu().arch}; {'; '.join(backend.placement.reasons)}; KV {chat.manifest.gguf.kv_type}; "
          f"{args.rounds} rounds, alternating; medians")
    print(f"{'prompts':>8} {'tokens':>7} {'one call each':>14} {'one call':>9} {'ratio':>6}  same bits")
    for n, length in cases:
        prompts = [[(13 + 7919 * (seq * 1000 + i)) % n_vocab for i in range(length)] for seq in range(n)]
        one_call_each(prompts)  # warm
        clear()
        each_s, together_s, same = [], [], True
        for _ in range(args.rounds):
            began = time.perf_counter()
            a = one_call_each(prompts)
            each_s.append(time.perf_counter() - began)
            clear()
            began = time.perf_counter()
            b = one_call(prompts)
            together_s.append(time.perf_counter() - began)
            clear()
            same = same and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        each, together = statistics.median(each_s), statistics.median(together_s)
        print(f"{n:>8} {length:>7} {each * 1000:>11.0f} ms {together * 1000:>6.0f} ms {together / each:>6.2f}  "
              f"{'yes' if same else 'NO'}")
    backend.close()


if __name__ == "__main__":
    main()
