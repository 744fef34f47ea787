"""Energy-saving mode: a model idle past its keep-alive is unloaded (its memory is given
back), listed as unloaded, and the next request reloads it and succeeds."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import psutil
from conftest import CHAT, EMBED, demo_config, start_agent

from agent.config import ModelEntry


async def _state(agent, name: str) -> str:  # type: ignore[no-untyped-def]
    status, body = await agent.get("/v1/models")
    assert status == 200
    return next(m["state"] for m in body["data"] if m["id"] == name)


async def test_an_idle_model_unloads_gives_memory_back_and_the_next_request_reloads_it(state_dir):
    config = demo_config(state_dir, models=(CHAT, EMBED))
    config = replace(config, models=[ModelEntry(name=CHAT, keep_alive_s=1.5), ModelEntry(name=EMBED)])
    request = {"model": CHAT, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4,
               "temperature": 0}
    async with start_agent(config) as agent:
        status, _body, _ = await agent.post("/v1/chat/completions", json=request)
        assert status == 200
        loaded_rss = psutil.Process().memory_info().rss
        assert await _state(agent, CHAT) == "ready"
        for _ in range(100):
            if await _state(agent, CHAT) == "unloaded":
                break
            await asyncio.sleep(0.1)
        assert await _state(agent, CHAT) == "unloaded"
        unloaded_rss = psutil.Process().memory_info().rss
        assert loaded_rss - unloaded_rss > 20 * 2**20, (loaded_rss, unloaded_rss)  # the weights left memory
        _, card = await agent.get(f"/v1/models/{CHAT}")
        assert card["keep_alive_s"] == 1.5 and card["state"] == "unloaded"
        assert await _state(agent, EMBED) == "ready"  # no keep-alive: stays
        status, _ = await agent.get("/readyz")
        assert status == 200  # an unloaded model still answers: the agent is ready

        # two requests at once while it is unloaded: both wait for one reload, neither fails
        (s1, b1, _), (s2, _b2, _) = await asyncio.gather(agent.post("/v1/chat/completions", json=request),
                                                        agent.post("/v1/chat/completions", json=request))
        assert s1 == s2 == 200 and b1["choices"][0]["message"]["content"]
        assert await agent.metric("edgefleet_model_reloads_total", model=CHAT) == 1
        assert await agent.metric("edgefleet_model_idle_unloads_total", model=CHAT) == 1
        assert await agent.metric("edgefleet_scheduler_completed_total", model=CHAT) == 3  # across the reload
