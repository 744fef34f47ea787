"""What repeatable greedy output costs: the agent's prompt evaluation against
llama-cpp-python's own prefix cache, in one process, in one run.

    .venv/bin/python bench/bench_determinism.py [--rounds 5] [--tokens 64]

Both sides load the demo chat model with the same placement (threads, AMX
rule, n_batch) in this process. The baseline is `Llama.generate` as
llama-cpp-python ships it: it reuses every cached token, including tokens it
generated one at a time, and re-evaluates the last prompt token alone on an
exact repeat, which is why its greedy output can change between a first and a
second identical request. The agent (`GgufBackend.generate`, its batching engine)
measures at start whether a prompt's bits depend on how it is split into calls. Where
they do not (the q8_0 KV cache on the CPU), it too reuses every cached token, the
answer's included, in any of its slots; where they do, it evaluates prompts in
chunks aligned to position 0 and reuses only whole chunks evaluated that way
(docs/architecture.md, "Repeatable greedy output"). Either way its answers repeat.

Scenarios, each timed as time to first token (TTFT) and decode tokens/s:
  cold        a prompt neither side has seen (its system prompt is new each
              round: the agent's other slots hold nothing to reuse either)
  repeat      the same prompt again (the baseline reuses all of it, the agent
              all of it or all whole chunks)
  follow-up   the same long system prompt with a new question (shared prefix)
  next-turn   the previous prompt + the answer + a new question (the baseline
              also reuses the generated tokens; the agent where splits are free)
  sampled-next-turn  the same at temperature 0.7 without a seed: nothing to
              repeat, so the agent reuses every cached token too
Rounds alternate the two sides; figures are medians and the ratio
agent / baseline is what to read (TTFT: lower is better; decode: higher).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.cli.demo import CHAT_MODEL, build_demo_bundles  # noqa: E402
from runtime.backend import GenerationRequest  # noqa: E402
from runtime.bundle import read_bundle  # noqa: E402
from runtime.devices import MachineSettings, describe_cpu  # noqa: E402
from runtime.gguf.gguf_backend import GgufBackend, extra_buffer_types  # noqa: E402
from runtime.gguf.llama_params import LLAMA_SAMPLING_DEFAULTS, kv_cache_args  # noqa: E402

SYSTEM = ("You are the on-call assistant of a fleet of edge devices. Answer briefly, name the device, "
          "say what to check first, and never invent figures. ") * 6


class Clock:
    """A JobContext that notes when the first and last pieces of text arrive."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.stamps: list[float] = []
        self.text: list[str] = []

    def cancelled(self) -> bool:
        return False

    def emit(self, item: object) -> None:
        self.stamps.append(time.perf_counter())
        self.text.append(getattr(item, "text", ""))


def agent_run(backend: GgufBackend, tokens: list[int], max_tokens: int,
              temp: float = 0.0) -> tuple[float, float, list[int]]:
    clock = Clock(time.perf_counter())
    # logit_bias on EOS: every run makes exactly max_tokens tokens
    result = backend.generate(GenerationRequest(prompt=tokens, max_tokens=max_tokens, temperature=temp,
                                                logit_bias={backend._llm.token_eos(): -100.0}), clock)
    assert result.completion_tokens == max_tokens
    ttft = clock.stamps[0] - clock.start
    decode = (len(clock.stamps) - 1) / (clock.stamps[-1] - clock.stamps[0])
    generated = backend._llm.input_ids[len(tokens):len(tokens) + max_tokens].tolist()
    return ttft, decode, generated


def baseline_run(llm, tokens: list[int], max_tokens: int, temp: float = 0.0) -> tuple[float, float, list[int]]:
    import llama_cpp

    eos = llm.token_eos()
    bias = llama_cpp.LogitsProcessorList([lambda ids, scores: _ban(scores, eos)])
    start = time.perf_counter()
    stamps, out = [], []
    for token in llm.generate(tokens, temp=temp, top_p=1.0, logits_processor=bias, **LLAMA_SAMPLING_DEFAULTS):
        stamps.append(time.perf_counter())
        out.append(token)
        if len(out) == max_tokens:
            break
    return stamps[0] - start, (len(stamps) - 1) / (stamps[-1] - stamps[0]), out


def _ban(scores, token: int):
    scores = scores.copy()
    scores[token] -= 100.0
    return scores


def stock_repeat_drift(llm, chat) -> float:
    """Max |logit difference| of the last prompt token, evaluated with its prompt (cold) and
    alone on top of the cached prompt (what llama-cpp-python does on an exact repeat)."""
    import llama_cpp
    import numpy as np

    def last() -> np.ndarray:
        row = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).copy()

    drift = 0.0
    for question in ("Device 7 fan error?", "Which device is hottest?", "Name a colour.", "Reboot loop?"):
        tokens = chat(SYSTEM[: 40 * len(question)], question)
        llm.reset()
        llm.eval(tokens)
        cold = last()
        llm.n_tokens = len(tokens) - 1
        llm.eval(tokens[-1:])
        drift = max(drift, float(np.abs(last() - cold).max()))
    return drift


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    args = parser.parse_args()

    import llama_cpp

    state = ROOT / ".state"
    build_demo_bundles(state / "models")
    bundle = read_bundle(state / "models" / CHAT_MODEL / "current")
    backend = GgufBackend(bundle, MachineSettings(cpu=describe_cpu()))
    placement = backend.placement
    with extra_buffer_types(placement.use_extra_bufts):
        llm = llama_cpp.Llama(model_path=str(bundle.weights), n_ctx=bundle.manifest.gguf.n_ctx,
                              n_batch=bundle.manifest.gguf.n_batch, n_threads=placement.n_threads,
                              n_threads_batch=placement.n_threads_batch,
                              flash_attn=bundle.manifest.gguf.flash_attn, verbose=False,
                              **kv_cache_args(bundle.manifest.gguf.kv_type))  # the agent's KV cache type
    tok = backend._llm.tokenize

    def chat(system: str, question: str) -> list[int]:
        text = (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
                "<|im_start|>assistant\n")
        return tok(text.encode(), add_bos=False, special=True)

    import platform

    amx = "AMX" if describe_cpu().has_amx else "no AMX"
    print(f"# {platform.machine()} ({amx}); {'; '.join(placement.reasons)}; "
          f"baseline n_batch={bundle.manifest.gguf.n_batch}, agent prompt chunk={backend._chunk}")
    rows: dict[str, dict[str, list[float]]] = {}
    flips = 0
    for r in range(args.rounds):
        for side, run, model in (("agent", agent_run, backend), ("baseline", baseline_run, llm)):
            # Fresh state for the cold case: an unrelated prompt first.
            run(model, tok(f"Unrelated warm-up number {r} for {side}.".encode()), 4)
            system = f"Session {r} of the {side}. {SYSTEM}"  # nothing cached shares it
            first = chat(system, f"Device {r} reports a fan error. What now?")
            scenarios = {}
            scenarios["cold"] = run(model, first, args.tokens)
            scenarios["repeat"] = run(model, first, args.tokens)
            scenarios["follow-up"] = run(model, chat(system, f"Device {r} lost its network. What now?"),
                                         args.tokens)
            answer = scenarios["follow-up"][2]
            turn = (chat(system, f"Device {r} lost its network. What now?") + answer
                    + tok(b"<|im_end|>\n<|im_start|>user\nAnd after that?<|im_end|>\n<|im_start|>assistant\n",
                          add_bos=False, special=True))
            scenarios["next-turn"] = run(model, turn, args.tokens)
            # the same next turn, sampled without a seed: nothing to repeat, so all of the cache
            run(model, chat(system, f"Device {r} lost its network. What now?"), args.tokens, 0.7)
            scenarios["sampled-next-turn"] = run(model, turn, args.tokens, 0.7)
            if scenarios["repeat"][2] != scenarios["cold"][2]:
                flips += side == "baseline"
                if side == "agent":
                    raise SystemExit("agent: the repeated prompt gave different tokens; determinism is broken")
            for name, (ttft, decode, _) in scenarios.items():
                rows.setdefault(name, {}).setdefault(f"{side}_ttft", []).append(ttft)
                rows[name].setdefault(f"{side}_decode", []).append(decode)
    print(f"prompt: {len(chat(SYSTEM, 'x'))} tokens; {args.tokens} generated; medians of {args.rounds} rounds")
    print(f"{'scenario':<17} {'TTFT agent':>11} {'baseline':>9} {'ratio':>6}   "
          f"{'decode agent':>12} {'baseline':>9} {'ratio':>6}")
    for name, v in rows.items():
        med = {k: statistics.median(x) for k, x in v.items()}
        print(f"{name:<17} {med['agent_ttft'] * 1000:>9.1f}ms {med['baseline_ttft'] * 1000:>7.1f}ms "
              f"{med['agent_ttft'] / med['baseline_ttft']:>6.2f}   {med['agent_decode']:>8.1f}t/s "
              f"{med['baseline_decode']:>5.1f}t/s {med['agent_decode'] / med['baseline_decode']:>6.2f}")
    print(f"baseline repeats that changed their answer: {flips} of {args.rounds}; agent: 0")
    print(f"largest logit difference for the same prompt, cold vs cached repeat: "
          f"baseline {stock_repeat_drift(llm, chat):.4g}, agent 0 (tests/test_greedy_repeatable.py)")
    backend.close()
    llm.close()


if __name__ == "__main__":
    main()
