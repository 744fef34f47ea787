"""Prompts that would hold the model for minutes are refused before the model works on
them, a client that leaves frees the model at once, and no request gets more than
its share of model time."""

from __future__ import annotations

import asyncio
import random
import time

import aiohttp
from conftest import CHAT, EMBED

CHAT_OK = {"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}


async def admitted(agent) -> float:
    return await agent.metric("edgefleet_scheduler_admitted_total", model=CHAT)


async def test_a_50000_message_chat_is_refused_at_once_and_the_model_stays_free(agent):
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "word"} for i in range(50_000)]
    before = await admitted(agent)
    started = time.monotonic()
    status, body, _ = await agent.post("/v1/chat/completions", json={"model": CHAT, "messages": messages})
    took = time.monotonic() - started
    print(f"50,000-message chat refused in {took:.3f}s")
    assert status == 400 and body["error"]["code"] == "prompt_too_large", body
    assert body["error"]["param"] == "messages" and "2048" in body["error"]["message"]
    assert took < 1.0
    assert await admitted(agent) == before  # never queued: the model did not see it
    started = time.monotonic()
    status, body, _ = await agent.post("/v1/chat/completions", json=CHAT_OK)
    assert status == 200 and time.monotonic() - started < 10


async def test_a_prompt_over_the_character_limit_is_refused_before_tokenizing(agent):
    before = await admitted(agent)
    status, body, _ = await agent.post("/v1/completions", json={"model": CHAT, "prompt": "x" * 300_000})
    assert status == 400 and body["error"]["code"] == "prompt_too_large" and body["error"]["param"] == "prompt"
    assert await admitted(agent) == before


async def test_a_prompt_of_special_tokens_stops_tokenizing_once_it_cannot_fit(agent):
    # 25,000 special tokens under the character limit: one llama.cpp call would take seconds
    # (quadratic in their number); in pieces it stops at the context size.
    prompt = "<|im_end|>" * 25_000
    started = time.monotonic()
    status, body, _ = await agent.post("/v1/completions", json={"model": CHAT, "prompt": prompt})
    took = time.monotonic() - started
    print(f"25,000 special tokens refused in {took:.3f}s")
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    assert "more than" in body["error"]["message"]
    assert took < 2.0


async def test_tokenizing_in_pieces_gives_the_tokens_of_one_call(agent):
    backend = _backend(agent)
    turns = "".join(f"<|im_start|>user\nquestion {i}?<|im_end|>\n<|im_start|>assistant\nanswer {i}<|im_end|>\n"
                    for i in range(300))
    pieces = backend._pieces(turns)
    assert len(pieces) > 5 and "".join(pieces) == turns
    whole = backend._llm.tokenize(turns.encode(), add_bos=True, special=True)
    joined = [t for i, p in enumerate(pieces) for t in backend._llm.tokenize(p.encode(), add_bos=i == 0, special=True)]
    assert joined == whole


def _backend(agent):
    from agent.context import MODELS

    return agent.app[MODELS].get(CHAT).backend


async def test_a_client_that_leaves_during_a_long_prompt_frees_the_model_quickly(make_agent):
    async with make_agent(models=(CHAT,)) as agent:
        words = " ".join(random.Random(7).choice(["sea", "ship", "storm", "gull", "tide", "salt", "wind"])
                         for _ in range(1900))  # ~1,900 tokens of prompt: seconds to evaluate on a CPU
        async with aiohttp.ClientSession() as session:
            try:
                async with session.post(agent.url + "/v1/completions",
                                        json={"model": CHAT, "prompt": words, "max_tokens": 100},
                                        timeout=aiohttp.ClientTimeout(total=0.3)):
                    pass
            except TimeoutError:
                pass
        left = time.monotonic()
        while await agent.metric("edgefleet_queue_depth", model=CHAT) > 0:
            assert time.monotonic() - left < 5, "the model was still busy 5 s after the client left"
            await asyncio.sleep(0.02)
        print(f"model free {time.monotonic() - left:.3f}s after the client left")
        assert await agent.metric("edgefleet_scheduler_cancelled_total", model=CHAT) == 1
        status, _, _ = await agent.post("/v1/chat/completions", json=CHAT_OK)
        assert status == 200


async def test_the_model_time_limit_ends_generation_and_refuses_big_embeddings(make_agent, state_dir):
    from dataclasses import replace

    from conftest import demo_config, start_agent

    from agent.config import LimitsConfig

    config = demo_config(state_dir)
    config = replace(config, limits=LimitsConfig(max_model_time_s=1.0))
    async with start_agent(config) as agent:
        status, body, _ = await agent.post("/v1/completions", json={
            "model": CHAT, "prompt": "Tell a long story.", "max_tokens": 1500, "logit_bias": {"2": -100}})
        assert status == 200, body
        assert body["choices"][0]["finish_reason"] == "length"
        assert 0 < body["usage"]["completion_tokens"] < 1500
        texts = [f"sentence number {i} " * 60 for i in range(512)]
        status, body, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": texts})
        assert status == 400 and body["error"]["code"] == "model_time_exceeded", body
        status, body, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": texts[:4]})
        assert status == 200
