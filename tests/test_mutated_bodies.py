"""Valid requests with fields swapped for random JSON values never get a 5xx.

A seeded mutation fuzzer (the seed is in the test id, so a failure repeats): it
starts from a good request for each inference endpoint and replaces one to three
fields, or fields of a message or tensor, with values of the wrong type, range or
shape. Every answer must be a success or a 4xx in the endpoint's error convention.
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest
from conftest import CHAT, EMBED

ATOMS: list[Any] = [None, True, False, 0, -1, 1, 2**70, 1.5, -1e308, "", "x", "é", [], {}, [1], ["a"], {"a": 1}]
GOOD: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": CHAT, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    "/v1/completions": {"model": CHAT, "prompt": "hi", "max_tokens": 2},
    "/v1/embeddings": {"model": EMBED, "input": "hi"},
    f"/v2/models/{EMBED}/infer": {"inputs": [
        {"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [101, 7592, 102]},
        {"name": "attention_mask", "shape": [1, 3], "datatype": "INT64", "data": [1, 1, 1]},
        {"name": "token_type_ids", "shape": [1, 3], "datatype": "INT64", "data": [0, 0, 0]},
    ]},
}
FIELDS = {
    "/v1/chat/completions": ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                             "presence_penalty", "stop", "seed", "logit_bias", "stream", "stream_options", "n",
                             "response_format"],
    "/v1/completions": ["model", "prompt", "max_tokens", "temperature", "stop", "seed", "logit_bias", "echo",
                        "best_of"],
    "/v1/embeddings": ["model", "input", "encoding_format", "dimensions"],
    f"/v2/models/{EMBED}/infer": ["inputs", "outputs", "parameters", "id"],
}


def random_value(rnd: random.Random, depth: int = 0) -> Any:
    roll = rnd.random()
    if depth > 2 or roll < 0.6:
        return rnd.choice(ATOMS)
    if roll < 0.8:
        return [random_value(rnd, depth + 1) for _ in range(rnd.randint(0, 3))]
    keys = ["type", "text", "role", "content", "name", "shape", "datatype", "data"]
    return {rnd.choice(keys): random_value(rnd, depth + 1) for _ in range(rnd.randint(0, 3))}


def mutated(rnd: random.Random, path: str) -> dict[str, Any]:
    body = json.loads(json.dumps(GOOD[path]))
    for _ in range(rnd.randint(1, 3)):
        field = rnd.choice(FIELDS[path])
        inputs, messages = body.get("inputs"), body.get("messages")
        if field == "inputs" and rnd.random() < 0.7 and isinstance(inputs, list) and len(inputs) == 3 \
                and all(isinstance(t, dict) for t in inputs):
            rnd.choice(inputs)[rnd.choice(["name", "shape", "datatype", "data"])] = random_value(rnd)
        elif field == "messages" and rnd.random() < 0.5 and isinstance(messages, list) and messages \
                and isinstance(messages[0], dict):
            messages[0][rnd.choice(["role", "content"])] = random_value(rnd)
        else:
            body[field] = random_value(rnd)
    return body


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_mutated_requests_get_success_or_a_4xx_in_the_apis_convention(agent, seed):
    rnd = random.Random(seed)
    for _ in range(120):
        path = rnd.choice(list(GOOD))
        body = mutated(rnd, path)
        data = json.dumps(body)
        async with agent.http.post(agent.url + path, data=data,
                                   headers={"Content-Type": "application/json"}) as resp:
            text = await resp.text()
            assert resp.status < 500, f"{resp.status} for POST {path} {data}: {text}"
            if resp.status >= 400 and not text.startswith("data:"):
                error = json.loads(text)["error"]
                if path.startswith("/v2/"):
                    assert isinstance(error, str), text
                else:
                    assert isinstance(error["message"], str) and error["type"], text
