"""GGUF embeddings (llama.cpp embedding mode) beside ONNX ones, in-process, per input.

    .venv/bin/python bench/bench_gguf_embeddings.py [--inputs 32] [--threads 0]

Builds the demo bundles in a temporary state dir, lays out the demo SmolLM2 GGUF as an
embedding bundle (mean pooling, as tests/test_gguf_embeddings.py does), loads both
backends as the agent does and embeds the same `--inputs` short sentences with each,
after one warm-up call. Prints inputs per second and tokens per second. `--threads`
is runtime.threads (0: the agent's automatic choice). On a machine whose cores are
busy with other work, llama.cpp's threads wait on each other: read the figure on a
quiet machine (or compare `--threads 1`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from agent.cli.demo import EMBEDDING_MODEL, build_demo_bundles
from runtime.backend import ModelLimits, load_backend
from runtime.bundle import read_bundle
from runtime.devices import MachineSettings, describe_cpu
from runtime.scheduling.batching import BatchingSettings


class Ctx:
    limits = ModelLimits()

    def cancelled(self) -> bool:
        return False

    def emit(self, item: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    from test_gguf_embeddings import GGUF_EMBED, lay_out_gguf_embedding

    texts = [f"Sentence number {i}: the quick brown fox jumps over the lazy dog." for i in range(args.inputs)]
    machine = MachineSettings(cpu=describe_cpu(), threads=args.threads, cpu_repack=None, batching=BatchingSettings())
    with tempfile.TemporaryDirectory() as temp:
        state = Path(temp)
        build_demo_bundles(state / "models")
        lay_out_gguf_embedding(state)
        for name in (GGUF_EMBED, EMBEDDING_MODEL):
            backend = load_backend(read_bundle(state / "models" / name / "current", name=name), machine)
            backend.embed(texts[:2], None, Ctx())
            started = time.perf_counter()
            result = backend.embed(texts, None, Ctx())
            took = time.perf_counter() - started
            print(f"{name:24} {len(texts)} inputs, {result.prompt_tokens} tokens, {took * 1000:.0f} ms: "
                  f"{len(texts) / took:.1f} inputs/s, {result.prompt_tokens / took:.0f} tokens/s, "
                  f"dim {result.vectors.shape[1]}")
            backend.close()


if __name__ == "__main__":
    main()
