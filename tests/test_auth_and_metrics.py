"""The optional API key, and what /metrics tells an operator."""

from __future__ import annotations

import openai
import pytest
from conftest import CHAT, EMBED, openai_client

KEY = "edge-test-key-123"


async def test_api_key_is_required_when_set_and_health_stays_open(make_agent):
    async with make_agent(models=(EMBED,), api_key=KEY) as agent:
        status, body, headers = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "x"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert headers["WWW-Authenticate"] == "Bearer"
        status, body, _ = await agent.post(f"/v2/models/{EMBED}/infer", json={"inputs": []},
                                           headers={"Authorization": "Bearer wrong-key-xyz"})
        assert status == 401 and isinstance(body["error"], str)
        assert (await agent.get("/metrics"))[0] == 401
        for public in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready"):
            assert (await agent.get(public))[0] == 200
        async with openai_client(agent.url, api_key=KEY) as client:
            assert len((await client.embeddings.create(model=EMBED, input="x")).data) == 1
        async with openai_client(agent.url, api_key="nope-nope") as client:
            with pytest.raises(openai.AuthenticationError):
                await client.models.list()


async def test_metrics_count_requests_tokens_and_models(agent):
    before = await agent.metric("edgefleet_generated_tokens_total", model=CHAT)
    status, body, _ = await agent.post("/v1/completions", json={"model": CHAT, "prompt": "Hi", "max_tokens": 5,
                                                                "logit_bias": {"2": -100}})
    assert status == 200, body
    assert await agent.metric("edgefleet_generated_tokens_total", model=CHAT) == before + 5
    assert await agent.metric("edgefleet_http_requests_total", route="/v1/completions", status="200") >= 1
    assert await agent.metric("edgefleet_http_request_duration_seconds_count", route="/v1/completions") >= 1
    assert await agent.metric("gen_ai_server_time_to_first_token_seconds_count", model=CHAT) >= 1
    assert await agent.metric("edgefleet_models", state="ready") == 2
    assert await agent.metric("edgefleet_queue_depth", model=CHAT) == 0
    status, text = await agent.get("/metrics")
    assert "# TYPE edgefleet_http_request_duration_seconds histogram" in text
