"""The same greedy request gives the same answer every time, whatever ran before it.

llama.cpp's logits can differ in the last bits with the shape of the batch that
computed them, and on some CPUs (AMX ones among them) a greedy choice flips on
those bits. The agent evaluates every prompt the same way whether its prefix is
cached or not (docs/architecture.md, "Repeatable greedy output"), so these hold
with the prefix cache on, and the cache is seen to be used.
"""

from __future__ import annotations

import json
import random

import llama_cpp
import pytest
from conftest import CHAT, EMBED

from runtime.bundle import read_bundle
from runtime.devices import choose_llama_placement, describe_cpu
from runtime.gguf.gguf_backend import extra_buffer_types
from runtime.gguf.llama_params import kv_cache_args
from runtime.scheduling.batching import BatchingSettings

pytestmark = [pytest.mark.cpu_path, pytest.mark.slow]

SYSTEM = ("You are the assistant of a fleet of edge devices. Answer in one or two sentences, name the "
          "device, and say what to check first. ") * 10  # several prefill chunks long

PROMPTS: list[dict] = [
    {"messages": [{"role": "user", "content": "Name a colour."}]},
    {"messages": [{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": "Device 7 reports a fan error. What now?"}]},
    {"messages": [{"role": "system", "content": SYSTEM},
                  {"role": "user", "content": "Device 9 lost its network. What now?"}]},
    {"prompt": "The three laws of thermodynamics are"},
    {"prompt": SYSTEM + "\nQuestion: which device is hottest?\nAnswer:"},
]


async def ask(agent, prompt: dict, stream: bool, max_tokens: int = 24) -> tuple[str, dict, str]:
    """(text, usage, finish_reason) of one temperature-0 request, streamed or not."""
    chat = "messages" in prompt
    body = {"model": CHAT, **prompt, "max_tokens": max_tokens, "temperature": 0}
    path = "/v1/chat/completions" if chat else "/v1/completions"
    if not stream:
        status, reply, _ = await agent.post(path, json=body)
        assert status == 200, reply
        choice = reply["choices"][0]
        return (choice["message"]["content"] if chat else choice["text"]), reply["usage"], choice["finish_reason"]
    body |= {"stream": True, "stream_options": {"include_usage": True}}
    pieces, usage, finish = [], None, None
    async with agent.http.post(agent.url + path, json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk["choices"]:
                pieces.append((choice["delta"].get("content") if chat else choice["text"]) or "")
                finish = choice["finish_reason"] or finish
    return "".join(pieces), usage, finish


async def distraction(agent, i: int) -> None:
    """Other work between the repeats: sampled text, a long unrelated prompt, embeddings."""
    if i % 3 == 0:
        status, _, _ = await agent.post("/v1/completions", json={
            "model": CHAT, "prompt": f"Random story number {i}:", "max_tokens": 12, "temperature": 1.3})
    elif i % 3 == 1:
        status, _, _ = await agent.post("/v1/chat/completions", json={
            "model": CHAT, "max_tokens": 6, "temperature": 0,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"Device {i}?"}]})
    else:
        status, _, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": [f"sentence {i}"]})
    assert status == 200


async def test_five_prompts_three_times_in_any_order_give_identical_text_and_usage(agent):
    cached_before = await agent.metric("edgefleet_prompt_tokens_cached_total", model=CHAT)
    rng = random.Random(20261124)
    orders = [list(range(5)), list(reversed(range(5))), rng.sample(range(5), 5)]
    answers: dict[int, list[tuple[str, dict, str]]] = {i: [] for i in range(5)}
    step = 0
    for round_, order in enumerate(orders):
        for i in order:
            stream = (i + round_) % 2 == 1  # each prompt both streamed and not across rounds
            answers[i].append(await ask(agent, PROMPTS[i], stream))
            await distraction(agent, step)
            step += 1
    for i, runs in answers.items():
        texts = {text for text, _, _ in runs}
        assert len(texts) == 1, f"prompt {i} gave {len(texts)} different answers: {texts}"
        assert runs[0][0], f"prompt {i} gave no text"
        assert all(usage == runs[0][1] for _, usage, _ in runs), [u for _, u, _ in runs]
        assert len({finish for _, _, finish in runs}) == 1
    # The prefix cache was in use all along (the long system prompt is shared).
    assert await agent.metric("edgefleet_prompt_tokens_cached_total", model=CHAT) > cached_before


async def test_an_immediate_repeat_reuses_the_cache_and_gives_the_same_answer(agent):
    first = await ask(agent, PROMPTS[1], stream=False, max_tokens=32)
    cached = await agent.metric("edgefleet_prompt_tokens_cached_total", model=CHAT)
    again = await ask(agent, PROMPTS[1], stream=True, max_tokens=32)
    assert again == first
    assert await agent.metric("edgefleet_prompt_tokens_cached_total", model=CHAT) > cached


async def test_seeded_sampling_repeats_with_other_requests_between(agent):
    body = {"model": CHAT, "messages": PROMPTS[2]["messages"], "max_tokens": 16, "temperature": 0.9,
            "seed": 42}
    first = await agent.post("/v1/chat/completions", json=body)
    await distraction(agent, 1)
    second = await agent.post("/v1/chat/completions", json=body)
    assert first[0] == second[0] == 200
    assert first[1]["choices"][0]["message"]["content"] == second[1]["choices"][0]["message"]["content"]
    assert first[1]["usage"] == second[1]["usage"]


async def test_a_sampled_next_turn_reuses_the_whole_previous_exchange(agent):
    """Only requests that must repeat pay for it: a sampled chat (no seed) reuses every cached
    token, the previous answer included."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Device 4 is hot."}]
    status, first, _ = await agent.post("/v1/chat/completions", json={
        "model": CHAT, "messages": messages, "max_tokens": 24, "temperature": 0.7})
    assert status == 200
    cached = await agent.metric("edgefleet_prompt_tokens_cached_total", model=CHAT)
    messages += [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                 {"role": "user", "content": "And then?"}]
    status, _, _ = await agent.post("/v1/chat/completions", json={
        "model": CHAT, "messages": messages, "max_tokens": 8, "temperature": 0.7})
    assert status == 200
    reused = await agent.metric("edgefleet_prompt_tokens_cached_total", model=CHAT) - cached
    assert reused >= first["usage"]["prompt_tokens"], (reused, first["usage"])


@pytest.fixture(scope="module")
def fresh_context_llm(state_dir):
    """llama-cpp-python in-process, loaded as the agent loads the model, with the bundle's n_batch."""
    bundle = read_bundle(state_dir / "models" / CHAT / "current")
    placement = choose_llama_placement(describe_cpu(), gpu_offload_supported=False)
    with extra_buffer_types(placement.use_extra_bufts):
        llm = llama_cpp.Llama(model_path=str(bundle.weights), n_ctx=bundle.manifest.gguf.n_ctx,
                              n_batch=bundle.manifest.gguf.n_batch, n_threads=placement.n_threads,
                              n_threads_batch=placement.n_threads_batch,
                              flash_attn=bundle.manifest.gguf.flash_attn, verbose=False,
                              **kv_cache_args(bundle.manifest.gguf.kv_type))
    yield llm
    llm.close()


async def test_a_cached_prefix_answers_exactly_as_a_fresh_context_does(agent, fresh_context_llm):
    # Warm the agent's cache with the shared system prompt, then ask a new question on it.
    await ask(agent, PROMPTS[1], stream=False)
    question = {"messages": [{"role": "system", "content": SYSTEM},
                             {"role": "user", "content": "Device 3 is rebooting in a loop. What now?"}]}
    cached = await agent.metric("edgefleet_prompt_tokens_cached_total", model=CHAT)
    got = await ask(agent, question, stream=False, max_tokens=32)
    assert await agent.metric("edgefleet_prompt_tokens_cached_total", model=CHAT) > cached
    fresh_context_llm.reset()  # nothing reused: the whole prompt in n_batch chunks from position 0
    want = fresh_context_llm.create_chat_completion(messages=question["messages"], max_tokens=32, temperature=0)
    assert got[0] == want["choices"][0]["message"]["content"]
    assert got[1] == want["usage"]


class _Quiet:
    def cancelled(self) -> bool:
        return False

    def emit(self, item: object) -> None:
        pass


def test_the_last_prompt_logits_are_bit_identical_cached_or_not(state_dir):
    """Stronger than comparing greedy text: the logits the first token is sampled from are
    the same bits whether the prompt was cold, fully cached, partly cached behind another
    prompt, or cached behind generated tokens. (On this project's AMD EPYC machine,
    llama-cpp-python's own cache, which re-evaluates the last token alone, gives logits
    up to 0.38 apart for the same prompt: bench/bench_determinism.py prints it.)"""
    import numpy as np

    from runtime.backend import GenerationRequest
    from runtime.devices import MachineSettings
    from runtime.gguf.gguf_backend import GgufBackend

    # The one-at-a-time path (batching.gguf_slots = 1), whose prefill this reads directly; the
    # batching engine keeps the same rule per slot (tests/test_continuous_batching.py).
    backend = GgufBackend(read_bundle(state_dir / "models" / CHAT / "current"),
                          MachineSettings(cpu=describe_cpu(), batching=BatchingSettings(gguf_slots=1)))
    llm = backend._llm

    def prompt_logits(tokens: list[int]) -> np.ndarray:
        assert backend._prefill(tokens, _Quiet()) is not None
        row = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(llm.n_vocab(),)).copy()

    try:
        prompts = [llm.tokenize(text.encode()) for text in (
            "You are the assistant of a fleet of edge devices. Answer briefly. " * 10 + "Device 7 fan error?",
            SYSTEM + "Device 7 reports a fan error. What now?",
            SYSTEM[:400] + "Which device is hottest?",
            "Name a colour.",
        )]
        for a in prompts:
            b = a[:len(a) // 2] + llm.tokenize(b" something else entirely", add_bos=False)
            cold = prompt_logits(a)
            assert np.array_equal(prompt_logits(a), cold), f"exact repeat ({len(a)} tokens)"
            prompt_logits(b)
            assert np.array_equal(prompt_logits(a), cold), f"after a prompt with the same prefix ({len(a)})"
            backend.generate(GenerationRequest(prompt=a, max_tokens=20, temperature=0), _Quiet())
            assert np.array_equal(prompt_logits(a), cold), f"after generating on top of the prompt ({len(a)})"
    finally:
        backend.close()
