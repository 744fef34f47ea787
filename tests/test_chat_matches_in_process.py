"""Greedy chat through the agent is exactly what llama-cpp-python gives in-process."""

from __future__ import annotations

import llama_cpp
import pytest
from conftest import CHAT

from runtime.devices import choose_llama_placement, describe_cpu
from runtime.gguf.gguf_backend import extra_buffer_types
from runtime.gguf.llama_params import kv_cache_args

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "List three fruits."}],
]


@pytest.fixture(scope="module")
def in_process_llm(state_dir):
    placement = choose_llama_placement(describe_cpu(), gpu_offload_supported=False)
    with extra_buffer_types(placement.use_extra_bufts):  # as the agent loads it (AMX-safe)
        llm = llama_cpp.Llama(
            model_path=str(state_dir / "models" / CHAT / "current" / "model.gguf"),
            n_ctx=2048, n_threads=placement.n_threads, n_threads_batch=placement.n_threads_batch,
            flash_attn=True,  # the bundle's defaults, as the agent loads it
            **kv_cache_args("q8_0"),
            verbose=False,
        )
    yield llm
    llm.close()


@pytest.mark.cpu_path
@pytest.mark.parametrize("messages", PROMPTS)
async def test_temperature_zero_chat_equals_in_process_create_chat_completion(agent, in_process_llm, messages):
    in_process_llm.reset()
    want = in_process_llm.create_chat_completion(messages=messages, max_tokens=48, temperature=0, seed=7)
    status, got, _ = await agent.post("/v1/chat/completions", json={
        "model": CHAT, "messages": messages, "max_tokens": 48, "temperature": 0, "seed": 7})
    assert status == 200, got
    assert got["choices"][0]["message"]["content"] == want["choices"][0]["message"]["content"]
    assert got["choices"][0]["finish_reason"] == want["choices"][0]["finish_reason"]
    assert got["usage"] == want["usage"]
