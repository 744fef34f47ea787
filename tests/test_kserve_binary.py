"""The KServe v2 binary tensor data extension over HTTP, with NVIDIA's unmodified
tritonclient[http] (sync and aio) as the client.

Results are compared with a direct onnxruntime run of the same ONNX file. FP16,
BOOL and BYTES go through a tiny identity model whose ONNX protobuf is written
out by hand (tests/onnx_models.py; the `onnx` package is not a dependency). Malformed bodies are
sent with plain aiohttp, since tritonclient never builds them.
"""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient
from conftest import EMBED, free_port, start_agent
from onnx_models import identity_bundle
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor, serialize_byte_tensor

from agent.config import AgentConfig, ModelEntry, ServerConfig
from agent.kserve.tensors import TensorError, from_raw, to_raw

INFER = f"/v2/models/{EMBED}/infer"
OUTPUT = "last_hidden_state"
IDS = np.array([[101, 7592, 2088, 999, 102], [101, 2307, 102, 0, 0]], dtype=np.int64)
FEEDS = {"input_ids": IDS, "attention_mask": (IDS != 0).astype(np.int64), "token_type_ids": np.zeros_like(IDS)}


def direct_run(state_dir: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The demo bundle's own ONNX file run by onnxruntime, outside the agent."""
    session = ort.InferenceSession(str(state_dir / "models" / EMBED / "current" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (hidden,) = session.run([OUTPUT], feeds)
    return hidden


def host(url: str) -> str:
    return url.removeprefix("http://")


def triton_inputs(feeds: dict[str, np.ndarray], binary: bool) -> list[httpclient.InferInput]:
    """What tritonclient's documentation shows: InferInput + set_data_from_numpy."""
    inputs = []
    for name, array in feeds.items():
        tensor = httpclient.InferInput(name, list(array.shape), httpclient.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array, binary_data=binary)
        inputs.append(tensor)
    return inputs


def sync_infer(url: str, model: str, feeds: dict[str, np.ndarray], binary_in: bool,
               outputs: dict[str, bool] | None, **kwargs: Any) -> httpclient.InferResult:
    """The synchronous (gevent) client; call it in a thread, the agent runs in this loop."""
    client = httpclient.InferenceServerClient(host(url))
    try:
        requested = None if outputs is None else [
            httpclient.InferRequestedOutput(name, binary_data=binary) for name, binary in outputs.items()]
        return client.infer(model, triton_inputs(feeds, binary_in), outputs=requested, **kwargs)
    finally:
        client.close()


async def aio_infer(url: str, model: str, feeds: dict[str, np.ndarray], binary_in: bool,
                    outputs: dict[str, bool] | None, **kwargs: Any) -> httpclient.InferResult:
    async with aioclient.InferenceServerClient(host(url)) as client:
        requested = None if outputs is None else [
            aioclient.InferRequestedOutput(name, binary_data=binary) for name, binary in outputs.items()]
        return await client.infer(model, triton_inputs(feeds, binary_in), outputs=requested, **kwargs)


async def triton_infer(kind: str, url: str, model: str, feeds: dict[str, np.ndarray], binary_in: bool,
                       outputs: dict[str, bool] | None, **kwargs: Any) -> httpclient.InferResult:
    if kind == "sync":
        return await asyncio.to_thread(sync_infer, url, model, feeds, binary_in, outputs, **kwargs)
    return await aio_infer(url, model, feeds, binary_in, outputs, **kwargs)


def was_binary(result: httpclient.InferResult, name: str) -> bool:
    """Whether the server sent this output as binary data (else as JSON `data`)."""
    output = result.get_output(name)
    has_size = "binary_data_size" in output.get("parameters", {})
    assert has_size != ("data" in output), output
    return has_size


# --- the unmodified client against the demo ONNX model ----------------------------


@pytest.mark.parametrize("kind", ["sync", "aio"])
@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, True), (False, True), (True, False), (False, False)],
                         ids=["binary-binary", "json-binary", "binary-json", "json-json"])
async def test_tritonclient_infer_equals_a_direct_onnxruntime_run(agent, state_dir, kind, binary_in, binary_out):
    result = await triton_infer(kind, agent.url, EMBED, FEEDS, binary_in, {OUTPUT: binary_out}, request_id="r-7")
    got = result.as_numpy(OUTPUT)
    assert was_binary(result, OUTPUT) is binary_out
    assert got.dtype == np.float32 and got.shape == (2, 5, 384)
    np.testing.assert_array_equal(got, direct_run(state_dir, FEEDS))
    response = result.get_response()
    assert response["id"] == "r-7" and response["model_name"] == EMBED


@pytest.mark.parametrize("kind", ["sync", "aio"])
async def test_tritonclient_without_requested_outputs_gets_every_output_as_binary(agent, state_dir, kind):
    # No outputs named: tritonclient sets the request-wide binary_data_output.
    result = await triton_infer(kind, agent.url, EMBED, FEEDS, True, None)
    assert was_binary(result, OUTPUT)
    np.testing.assert_array_equal(result.as_numpy(OUTPUT), direct_run(state_dir, FEEDS))


async def test_compressed_requests_from_tritonclient_are_understood(agent, state_dir):
    result = await triton_infer("sync", agent.url, EMBED, FEEDS, True, {OUTPUT: True},
                                request_compression_algorithm="gzip", response_compression_algorithm="deflate")
    np.testing.assert_array_equal(result.as_numpy(OUTPUT), direct_run(state_dir, FEEDS))


async def test_server_and_model_metadata_through_tritonclient(agent):
    def ask() -> tuple[dict, dict, bool, bool, list]:
        client = httpclient.InferenceServerClient(host(agent.url))
        try:
            return (client.get_server_metadata(), client.get_model_metadata(EMBED),
                    client.is_model_ready(EMBED), client.is_server_ready(), client.get_model_repository_index())
        finally:
            client.close()

    server, model, model_ready, server_ready, index = await asyncio.to_thread(ask)
    assert {"binary_tensor_data", "model_repository"} <= set(server["extensions"])
    assert server["name"] == "edgefleet"
    assert [(t["name"], t["datatype"], t["shape"]) for t in model["inputs"]] == [
        (name, "INT64", [-1, -1]) for name in FEEDS]
    assert model_ready and server_ready
    # The advertised repository extension is really there.
    assert {m["name"]: m["state"] for m in index}[EMBED] == "ready"


async def test_aio_client_reads_metadata_too(agent):
    async with aioclient.InferenceServerClient(host(agent.url)) as client:
        assert "binary_tensor_data" in (await client.get_server_metadata())["extensions"]
        assert await client.is_model_ready(EMBED)
        assert not await client.is_model_ready("no-such-model")


# --- bad tensors through the client: our message reaches the user -----------------


def with_input(**changes: np.ndarray) -> dict[str, np.ndarray]:
    return {**FEEDS, **changes}


CLIENT_ERRORS = [
    ("wrong dtype", with_input(input_ids=IDS.astype(np.float32)), None, "input 'input_ids' must be int64"),
    ("wrong rank", with_input(input_ids=IDS.ravel()), None, "input 'input_ids' must have shape"),
    ("unknown input", {**FEEDS, "pixels": IDS}, None, "unknown input tensor 'pixels'"),
    ("unknown output", FEEDS, "logits", "unknown output tensor 'logits'"),
]


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("case", CLIENT_ERRORS, ids=[c[0] for c in CLIENT_ERRORS])
async def test_bad_tensors_raise_inference_server_exception_with_our_message(agent, case, binary_in):
    _, feeds, output, message = case
    with pytest.raises(InferenceServerException) as caught:
        await triton_infer("sync", agent.url, EMBED, feeds, binary_in, {output or OUTPUT: True})
    assert caught.value.status() == "400"
    assert message in caught.value.message()


async def test_classification_is_refused_with_a_clear_message(agent):
    async with aioclient.InferenceServerClient(host(agent.url)) as client:
        with pytest.raises(InferenceServerException) as caught:
            await client.infer(EMBED, triton_inputs(FEEDS, True),
                               outputs=[aioclient.InferRequestedOutput(OUTPUT, class_count=3)])
    assert caught.value.status() == "400"
    assert "classification extension is not supported" in caught.value.message()


# --- FP16, BOOL and BYTES through an identity model --------------------------------


@pytest.fixture(scope="module")
async def identity_agent(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Any]:
    state = tmp_path_factory.mktemp("identity-state")
    identity_bundle(state / "models" / "identity" / "current")
    config = AgentConfig(state_dir=str(state), server=ServerConfig(port=free_port()),
                         models=[ModelEntry(name="identity")])
    async with start_agent(config) as running:
        yield running


HALF = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 6.0e-8, 0.1, 3.14159], dtype=np.float16)
FLAGS = np.array([True, False, False, True])


@pytest.mark.parametrize("kind", ["sync", "aio"])
@pytest.mark.parametrize(("binary_in", "binary_out"), [(True, True), (False, True), (True, False), (False, False)],
                         ids=["binary-binary", "json-binary", "binary-json", "json-json"])
async def test_fp16_and_bool_round_trip_bit_for_bit(identity_agent, kind, binary_in, binary_out):
    feeds = {"half": HALF, "flag": FLAGS, "text": np.array([b"x"], dtype=object)}
    result = await triton_infer(kind, identity_agent.url, "identity", feeds, binary_in,
                                {"half_out": binary_out, "flag_out": binary_out})
    half = result.as_numpy("half_out")
    assert result.get_output("half_out")["datatype"] == "FP16" and half.dtype == np.float16
    assert half.tobytes() == HALF.tobytes()  # bit for bit, -0.0 and the subnormal included
    np.testing.assert_array_equal(result.as_numpy("flag_out"), FLAGS)
    assert was_binary(result, "half_out") is binary_out


async def test_bytes_round_trip_through_the_model(identity_agent):
    text = np.array([b"hello", b"", "h\u00e9llo w\u00f6rld".encode(), b"a\x00b"], dtype=object)
    feeds = {"half": HALF[:1], "flag": FLAGS[:1], "text": text}
    result = await triton_infer("aio", identity_agent.url, "identity", feeds, True, {"text_out": True})
    assert result.get_output("text_out")["datatype"] == "BYTES"
    assert result.as_numpy("text_out").tolist() == text.tolist()


async def test_bytes_that_are_not_utf8_text_are_refused_for_a_string_input(identity_agent):
    feeds = {"half": HALF[:1], "flag": FLAGS[:1], "text": np.array([b"ok", b"\xff\xfe"], dtype=object)}
    with pytest.raises(InferenceServerException) as refused:
        await triton_infer("aio", identity_agent.url, "identity", feeds, True, {"text_out": True})
    assert refused.value.status() == "400"
    assert "element 1 is not UTF-8 text" in refused.value.message()


BYTES_CASES = {
    "ascii": np.array([b"hello", b"world"], dtype=object),
    "empty elements": np.array([b"", b"x", b""], dtype=object),
    "not utf-8 and NULs": np.array([b"\xff\xfe\x00", b"a\x00\x00"], dtype=object),
    "str objects": np.array([["h\u00e9", "\u4e16\u754c"], ["", "z"]], dtype=object),
    "numpy bytes_": np.array([b"abc", b"de"], dtype=np.bytes_),
    "2-D": np.array([[b"a", b"bb"], [b"ccc", b"dddd"], [b"", b"e"]], dtype=object),
}


@pytest.mark.parametrize("name", list(BYTES_CASES))
def test_bytes_codec_matches_tritonclients_serialization(name):
    array = BYTES_CASES[name]
    reference = serialize_byte_tensor(array).item()
    assert to_raw(array) == reference
    decoded = from_raw("t", "BYTES", list(array.shape), reference)
    want = [v if isinstance(v, bytes) else v.encode("utf-8") for v in array.ravel().tolist()]
    assert decoded.shape == array.shape and decoded.ravel().tolist() == want
    assert deserialize_bytes_tensor(to_raw(array)).tolist() == want


@pytest.mark.parametrize(("raw", "shape", "message"), [
    (struct.pack("<I", 10) + b"short", [1], "says 10 bytes, only 5 follow"),
    (struct.pack("<I", 1) + b"a" + b"\x01\x00", [2], "truncated length prefix"),
    (struct.pack("<I", 1) + b"a", [2], "holds 2 BYTES elements, binary data has 1"),
    (struct.pack("<I", 1) + b"a" + struct.pack("<I", 0), [1], "more than the 1 BYTES elements"),
])
def test_bytes_codec_refuses_prefixes_that_do_not_add_up(raw, shape, message):
    with pytest.raises(TensorError, match=message):
        from_raw("t", "BYTES", shape, raw)


def test_fp16_codec_is_little_endian_ieee_half():
    big_endian = HALF.astype(">f2")
    assert to_raw(big_endian) == HALF.astype("<f2").tobytes()
    assert from_raw("h", "FP16", [HALF.size], to_raw(HALF)).tobytes() == HALF.tobytes()


# --- malformed raw bodies: 400 in v2 error JSON, never a 500 -----------------------


def header_and_binary(inputs: list[dict[str, Any]], binary: bytes, **extra: Any) -> tuple[bytes, int]:
    header = json.dumps({"inputs": inputs, **extra}).encode()
    return header + binary, len(header)


def binary_input(name: str, array: np.ndarray, datatype: str = "INT64", **params: Any) -> dict[str, Any]:
    return {"name": name, "shape": list(array.shape), "datatype": datatype,
            "parameters": {"binary_data_size": array.nbytes, **params}}


GOOD_INPUTS = [binary_input(name, array) for name, array in FEEDS.items()]
GOOD_BINARY = b"".join(array.tobytes() for array in FEEDS.values())
GOOD_BODY, GOOD_LENGTH = header_and_binary(GOOD_INPUTS, GOOD_BINARY)


def replace_input(index: int, **changes: Any) -> list[dict[str, Any]]:
    inputs = json.loads(json.dumps(GOOD_INPUTS))
    inputs[index].update(changes)
    return inputs


def with_size(size: Any) -> list[dict[str, Any]]:
    return replace_input(0, parameters={"binary_data_size": size})


def body_of(inputs: list[dict[str, Any]], binary: bytes = GOOD_BINARY, **extra: Any) -> tuple[bytes, str]:
    body, length = header_and_binary(inputs, binary, **extra)
    return body, str(length)


BYTES_RUNS_PAST = struct.pack("<I", 100) + b"abc"
MALFORMED: list[tuple[str, tuple[bytes, str | None], str]] = [
    ("header length past the body", (GOOD_BODY, str(len(GOOD_BODY) + 1)), "the body has only"),
    ("header length not a number", (GOOD_BODY, "abc"), "must be a non-negative integer"),
    ("header length negative", (GOOD_BODY, "-5"), "must be a non-negative integer"),
    ("header length a float", (GOOD_BODY, "12.0"), "must be a non-negative integer"),
    ("header length zero (raw request)", (GOOD_BODY, "0"), "raw binary request"),
    ("header not JSON", (GOOD_BODY, str(GOOD_LENGTH + 3)), "are not a JSON inference header"),
    ("header cut short", (GOOD_BODY, str(GOOD_LENGTH - 1)), "are not a JSON inference header"),
    ("binary data left over", (GOOD_BODY + b"\0" * 8, str(GOOD_LENGTH)), "add up to 240 bytes, but 248"),
    ("binary data missing", (GOOD_BODY[:-8], str(GOOD_LENGTH)), "add up to 240 bytes, but 232"),
    ("size disagrees with shape x dtype", body_of(with_size(72), GOOD_BINARY[:-8]),
     "binary_data_size is 72, but shape [2, 5] of INT64 is 80 bytes"),
    ("size negative", body_of(with_size(-80)), "must be a non-negative integer"),
    ("size not an integer", body_of(with_size(80.5)), "must be a non-negative integer"),
    ("size a string", body_of(with_size("80")), "must be a non-negative integer"),
    ("size a boolean", body_of(with_size(True)), "must be a non-negative integer"),
    ("both data and binary_data_size", body_of(replace_input(0, data=IDS.ravel().tolist())),
     "has both 'data' and parameters.binary_data_size"),
    ("neither data nor binary", body_of(replace_input(0, parameters={})), "no data"),
    ("binary without the header", (GOOD_BODY[:GOOD_LENGTH], None), f"no {'Inference-Header-Content-Length'}"),
    ("BYTES prefix runs past the data", body_of(
        [{"name": "input_ids", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 7}},
         *GOOD_INPUTS[1:]], BYTES_RUNS_PAST + GOOD_BINARY[80:]), "says 100 bytes, only 3 follow"),
    ("huge shape, tiny body", body_of(replace_input(0, shape=[2**40, 2**40])), "holds more than"),
    ("zero-size shape with huge dims", body_of(replace_input(0, shape=[0, 2**62], parameters={
        "binary_data_size": 0}), GOOD_BINARY[80:]), "holds more than"),
    ("binary_data not a boolean", body_of(GOOD_INPUTS, outputs=[{"name": OUTPUT, "parameters": {"binary_data": 1}}]),
     "binary_data must be true or false"),
    ("binary_data_output not a boolean", body_of(GOOD_INPUTS, parameters={"binary_data_output": "yes"}),
     "binary_data_output must be true or false"),
    ("shared memory", body_of(replace_input(0, parameters={"shared_memory_region": "r", "binary_data_size": 80})),
     "shared memory is not supported"),
    ("classification", body_of(GOOD_INPUTS, outputs=[{"name": OUTPUT, "parameters": {"classification": 2}}]),
     "classification extension is not supported"),
    ("BOOL bytes other than 0 and 1", body_of(
        [{"name": "input_ids", "shape": [2], "datatype": "BOOL", "parameters": {"binary_data_size": 2}},
         *GOOD_INPUTS[1:]], b"\x01\x07" + GOOD_BINARY[80:]), "BOOL bytes must be 0 or 1"),
]


async def post_raw(agent: Any, body: bytes, length: str | None) -> tuple[int, str, bytes]:
    headers = {"Content-Type": "application/octet-stream"}
    if length is not None:
        headers["Inference-Header-Content-Length"] = length
    async with agent.http.post(agent.url + INFER, data=body, headers=headers) as resp:
        return resp.status, resp.content_type, await resp.read()


@pytest.mark.parametrize("case", MALFORMED, ids=[c[0] for c in MALFORMED])
async def test_malformed_binary_requests_get_400_in_v2_error_json(agent, case):
    _, (body, length), message = case
    status, content_type, raw = await post_raw(agent, body, length)
    assert status == 400, raw
    assert content_type == "application/json"
    error = json.loads(raw)
    assert set(error) == {"error"} and message in error["error"], error


async def test_the_good_raw_body_those_cases_start_from_is_accepted(agent, state_dir):
    status, content_type, raw = await post_raw(agent, GOOD_BODY, str(GOOD_LENGTH))
    assert status == 200 and content_type == "application/json", raw  # no binary asked for: JSON
    (output,) = json.loads(raw)["outputs"]
    got = np.array(output["data"], dtype=np.float32).reshape(output["shape"])
    np.testing.assert_array_equal(got, direct_run(state_dir, FEEDS))


async def test_binary_response_framing_as_triton_sends_it(agent, state_dir):
    body, length = body_of(GOOD_INPUTS, parameters={"binary_data_output": True})
    async with agent.http.post(agent.url + INFER, data=body,
                               headers={"Inference-Header-Content-Length": length}) as resp:
        raw = await resp.read()
        assert resp.status == 200 and resp.content_type == "application/octet-stream"
        header_length = int(resp.headers["Inference-Header-Content-Length"])
    header = json.loads(raw[:header_length])
    (output,) = header["outputs"]
    assert output["parameters"] == {"binary_data_size": 2 * 5 * 384 * 4} and "data" not in output
    assert len(raw) == header_length + output["parameters"]["binary_data_size"]
    got = np.frombuffer(raw[header_length:], dtype="<f4").reshape(output["shape"])
    np.testing.assert_array_equal(got, direct_run(state_dir, FEEDS))


async def test_an_outputs_binary_data_false_overrides_binary_data_output(agent):
    body, length = body_of(GOOD_INPUTS, parameters={"binary_data_output": True},
                           outputs=[{"name": OUTPUT, "parameters": {"binary_data": False}}])
    status, content_type, raw = await post_raw(agent, body, length)
    assert status == 200 and content_type == "application/json"
    assert len(json.loads(raw)["outputs"][0]["data"]) == 2 * 5 * 384


async def test_the_agent_keeps_serving_after_malformed_bodies(agent, state_dir):
    for _, (body, length), _ in MALFORMED:
        await post_raw(agent, body, length)
    result = await triton_infer("aio", agent.url, EMBED, FEEDS, True, {OUTPUT: True})
    np.testing.assert_array_equal(result.as_numpy(OUTPUT), direct_run(state_dir, FEEDS))


async def test_a_binary_body_over_the_limit_is_413_in_v2_json(make_agent):
    async with make_agent(models=(EMBED,), max_body_bytes=4096) as small:
        ids = np.ones((1, 1000), dtype=np.int64)  # 8000 bytes of binary data
        feeds = {"input_ids": ids, "attention_mask": ids, "token_type_ids": np.zeros_like(ids)}
        with pytest.raises(InferenceServerException) as caught:
            await triton_infer("aio", small.url, EMBED, feeds, True, {OUTPUT: True})
        assert caught.value.status() == "413" and "too large" in caught.value.message()
