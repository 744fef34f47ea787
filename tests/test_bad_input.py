"""Bad requests get a 4xx in the API's own error convention, and the agent keeps serving."""

from __future__ import annotations

import pytest
from conftest import CHAT, EMBED

CHAT_OK = {"model": CHAT, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
IDS = {"name": "input_ids", "shape": [1, 3], "datatype": "INT64", "data": [101, 7592, 102]}
MASK = {"name": "attention_mask", "shape": [1, 3], "datatype": "INT64", "data": [1, 1, 1]}
TYPES = {"name": "token_type_ids", "shape": [1, 3], "datatype": "INT64", "data": [0, 0, 0]}

OPENAI_CASES = [
    # (id, path, raw body or json, status, param, code)
    ("malformed json", "/v1/chat/completions", b'{"model": "x", "messages": [', 400, None, None),
    ("body not an object", "/v1/chat/completions", [1, 2], 400, None, None),
    ("empty body", "/v1/chat/completions", b"", 400, None, None),
    ("no model", "/v1/chat/completions", {"messages": CHAT_OK["messages"]}, 400, "model", None),
    ("unknown model", "/v1/chat/completions", {**CHAT_OK, "model": "gpt-9"}, 404, "model", "model_not_found"),
    ("empty messages", "/v1/chat/completions", {**CHAT_OK, "messages": []}, 400, "messages", None),
    ("messages wrong type", "/v1/chat/completions", {**CHAT_OK, "messages": "hi"}, 400, "messages", None),
    ("bad role", "/v1/chat/completions", {**CHAT_OK, "messages": [{"role": "robot", "content": "x"}]},
     400, "messages.[0].role", None),
    ("content wrong type", "/v1/chat/completions", {**CHAT_OK, "messages": [{"role": "user", "content": 5}]},
     400, "messages.[0].content", None),
    ("temperature wrong type", "/v1/chat/completions", {**CHAT_OK, "temperature": "hot"}, 400, "temperature", None),
    ("temperature out of range", "/v1/chat/completions", {**CHAT_OK, "temperature": 7}, 400, "temperature", None),
    ("max_tokens wrong type", "/v1/chat/completions", {**CHAT_OK, "max_tokens": "many"}, 400, "max_tokens", None),
    ("max_tokens zero", "/v1/chat/completions", {**CHAT_OK, "max_tokens": 0}, 400, "max_tokens", None),
    ("huge max_tokens", "/v1/chat/completions", {**CHAT_OK, "max_tokens": 10**9}, 400, "max_tokens",
     "context_length_exceeded"),
    ("stream wrong type", "/v1/chat/completions", {**CHAT_OK, "stream": "yes"}, 400, "stream", None),
    ("n > 1", "/v1/chat/completions", {**CHAT_OK, "n": 3}, 400, "n", None),
    ("tools", "/v1/chat/completions", {**CHAT_OK, "tools": [{"type": "function"}]}, 400, "tools[0]", None),
    ("response format", "/v1/chat/completions", {**CHAT_OK, "response_format": {"type": "yaml"}}, 400,
     "response_format.type", None),
    ("logprobs", "/v1/chat/completions", {**CHAT_OK, "logprobs": "yes"}, 400, "logprobs", None),
    ("prompt wrong type", "/v1/completions", {"model": CHAT, "prompt": {"a": 1}}, 400, "prompt", None),
    ("logit_bias key outside the vocabulary", "/v1/chat/completions", {**CHAT_OK, "logit_bias": {"99999999": 5}},
     400, "logit_bias", None),
    ("logit_bias key negative", "/v1/chat/completions", {**CHAT_OK, "logit_bias": {"-5": 5}}, 400, "logit_bias",
     None),
    ("empty prompt", "/v1/completions", {"model": CHAT, "prompt": ""}, 400, "prompt", None),
    ("token id outside the vocabulary", "/v1/completions", {"model": CHAT, "prompt": [1, 10**9]}, 400,
     "prompt", None),
    ("chat on embedding model", "/v1/chat/completions", {**CHAT_OK, "model": EMBED}, 400, "model",
     "unsupported_operation"),
    ("embedding input wrong type", "/v1/embeddings", {"model": EMBED, "input": 42}, 400, "input", None),
    ("embedding empty string", "/v1/embeddings", {"model": EMBED, "input": [""]}, 400, "input", None),
    ("embedding bad format", "/v1/embeddings", {"model": EMBED, "input": "x", "encoding_format": "hex"},
     400, "encoding_format", None),
    ("wrong dimensions", "/v1/embeddings", {"model": EMBED, "input": "x", "dimensions": 12}, 400,
     "dimensions", None),
]


async def assert_still_serving(agent):
    status, body, _ = await agent.post("/v1/chat/completions", json=CHAT_OK)
    assert status == 200, body
    status, body, _ = await agent.post(f"/v2/models/{EMBED}/infer", json={"inputs": [IDS, MASK, TYPES]})
    assert status == 200, body


@pytest.mark.parametrize("case", OPENAI_CASES, ids=[c[0] for c in OPENAI_CASES])
async def test_openai_errors_use_openai_json_and_the_agent_keeps_serving(agent, case):
    _, path, body, status, param, code = case
    raw = isinstance(body, bytes)
    kwargs = {"data": body, "headers": {"Content-Type": "application/json"}} if raw else {"json": body}
    got_status, got, _ = await agent.post(path, **kwargs)
    assert got_status == status, got
    error = got["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and "Traceback" not in error["message"]
    assert error["param"] == param
    if code:
        assert error["code"] == code
    await assert_still_serving(agent)


async def test_prompt_longer_than_the_context_is_context_length_exceeded(agent):
    long_prompt = "word " * 3000
    status, body, _ = await agent.post("/v1/completions", json={"model": CHAT, "prompt": long_prompt, "max_tokens": 4})
    assert status == 400
    assert body["error"]["code"] == "context_length_exceeded"
    assert "maximum context length is 2048" in body["error"]["message"]


async def test_streamed_request_that_cannot_fit_gets_a_json_400_not_a_broken_stream(agent):
    too_long = {**CHAT_OK, "max_tokens": 5000, "stream": True}
    status, body, headers = await agent.post("/v1/chat/completions", json=too_long)
    assert status == 400
    assert headers["Content-Type"].startswith("application/json")
    assert body["error"]["code"] == "context_length_exceeded"


async def test_oversized_body_is_413_and_nothing_is_lost(make_agent):
    async with make_agent(max_body_bytes=4096) as agent:
        big = {**CHAT_OK, "messages": [{"role": "user", "content": "x" * 10000}]}
        status, body, _ = await agent.post("/v1/chat/completions", json=big)
        assert status == 413
        assert body["error"]["code"] == "request_too_large"
        status, body, _ = await agent.post(f"/v2/models/{EMBED}/infer", json={"inputs": [{**IDS, "data": [1] * 5000}]})
        assert status == 413 and isinstance(body["error"], str)
        await assert_still_serving(agent)


KSERVE_CASES = [
    ("wrong shape", {"inputs": [{**IDS, "shape": [3]}, MASK, TYPES]}, "must have shape"),
    ("shape does not match data", {"inputs": [{**IDS, "shape": [1, 4]}, MASK, TYPES]}, "holds 4 values"),
    ("wrong dtype", {"inputs": [{**IDS, "datatype": "FP32"}, MASK, TYPES]}, "must be int64"),
    ("unknown datatype", {"inputs": [{**IDS, "datatype": "COMPLEX"}, MASK, TYPES]}, "unknown datatype"),
    ("datatype not a string", {"inputs": [{**IDS, "datatype": ["INT64"]}, MASK, TYPES]}, "unknown datatype"),
    ("astronomical shape", {"inputs": [{**IDS, "shape": [2**40, 2**40]}, MASK, TYPES]}, "holds"),
    ("unknown tensor", {"inputs": [IDS, MASK, TYPES, {**IDS, "name": "pixels"}]}, "unknown input tensor 'pixels'"),
    ("missing tensor", {"inputs": [IDS, MASK]}, "missing input tensor 'token_type_ids'"),
    ("data not numbers", {"inputs": [{**IDS, "data": ["a", "b", "c"]}, MASK, TYPES]}, "is not INT64"),
    ("no inputs", {"inputs": []}, "non-empty 'inputs'"),
    ("unknown output", {"inputs": [IDS, MASK, TYPES], "outputs": [{"name": "logits"}]}, "unknown output tensor"),
]


@pytest.mark.parametrize("case", KSERVE_CASES, ids=[c[0] for c in KSERVE_CASES])
async def test_kserve_errors_use_v2_json_and_the_agent_keeps_serving(agent, case):
    _, body, fragment = case
    status, got, _ = await agent.post(f"/v2/models/{EMBED}/infer", json=body)
    assert status == 400, got
    assert set(got) == {"error"} and fragment in got["error"], got
    await assert_still_serving(agent)


def _empty(tensor: dict) -> dict:
    return {**tensor, "shape": [1, 0], "data": []}


async def test_tensors_the_model_cannot_run_are_400_in_our_words_and_onnxruntime_stays_quiet(agent, capfd):
    """A zero-size tensor is refused before the model runs; shapes that disagree with each other
    are refused by onnxruntime. Neither answer quotes onnxruntime's source or node names, and
    onnxruntime writes nothing of its own to stderr (the agent's log is the one place to look)."""
    cases = [({"inputs": [_empty(IDS), _empty(MASK), _empty(TYPES)]}, "input 'input_ids' has shape [1, 0]"),
             ({"inputs": [_empty(IDS), MASK, TYPES]}, "input 'input_ids' has shape [1, 0]"),
             ({"inputs": [IDS, {**MASK, "shape": [1, 2], "data": [1, 1]}, TYPES]}, "input_ids [1, 3], "
              "attention_mask [1, 2], token_type_ids [1, 3]")]
    for body, fragment in cases:
        status, got, _ = await agent.post(f"/v2/models/{EMBED}/infer", json=body)
        assert status == 400, got
        assert fragment in got["error"], got
        for internal in ("onnxruntime_src", "ONNXRuntimeError", "Node", "node", "Status Message"):
            assert internal not in got["error"], got
    await assert_still_serving(agent)
    err = capfd.readouterr().err
    assert "onnxruntime" not in err, err


async def test_kserve_unknown_model_is_404_in_v2_json(agent):
    status, got, _ = await agent.post("/v2/models/nope/infer", json={"inputs": [IDS]})
    assert status == 404 and "nope" in got["error"]
    status, _ = await agent.get("/v2/models/nope/ready")
    assert status == 404


async def test_unknown_route_and_method_are_json_errors(agent):
    status, body = await agent.get("/v1/nothing-here")
    assert status == 404 and "error" in body
    status, body = await agent.get("/v1/chat/completions")
    assert status == 405 and "error" in body
