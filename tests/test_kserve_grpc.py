"""KServe v2 over gRPC with NVIDIA's unmodified tritonclient[grpc] against the demo ONNX model.

The agent runs as its own process (`edgefleet serve --demo`): tritonclient registers
its own copy of the `inference.*` messages in protobuf's default pool, so the agent's
generated code cannot be imported into this test process (that is also why the agent
imports it only when gRPC is switched on). Raw contents go through tritonclient's
`InferenceServerClient` as its documentation shows; typed contents through the stub
and messages tritonclient ships (`tritonclient.grpc.service_pb2*`), which is how a
user sends them. Results are compared with a direct onnxruntime run.
"""

from __future__ import annotations

import filecmp
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from agent_process import AgentProcess, serve
from conftest import CHAT, EMBED, demo_config, start_agent
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parent.parent
KEY = "grpc-test-key-1234"
AUTH = {"authorization": f"Bearer {KEY}"}
OUTPUT = "last_hidden_state"
IDS = np.array([[101, 7592, 2088, 999, 102], [101, 2307, 102, 0, 0]], dtype=np.int64)
FEEDS = {"input_ids": IDS, "attention_mask": (IDS != 0).astype(np.int64), "token_type_ids": np.zeros_like(IDS)}


@pytest.fixture(scope="module")
def agent(state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentProcess]:
    with serve(state_dir, tmp_path_factory.mktemp("grpc"), server__api_key=KEY) as running:
        yield running


@pytest.fixture(scope="module")
def client(agent: AgentProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(agent.grpc) as triton:
        yield triton


@pytest.fixture(scope="module")
def stub(agent: AgentProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(agent.grpc) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def direct_run(state_dir: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(state_dir / "models" / EMBED / "current" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    (hidden,) = session.run([OUTPUT], feeds)
    return hidden


def triton_inputs(feeds: dict[str, np.ndarray]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array in feeds.items():
        tensor = grpcclient.InferInput(name, list(array.shape), grpcclient.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def refusal(call) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """(status code name, message) of a call that must fail through tritonclient."""
    with pytest.raises(grpcclient.InferenceServerException) as info:
        call()
    return str(info.value.status()), info.value.message()


def typed_request(feeds: dict[str, np.ndarray], **extra: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=EMBED, **extra)
    for name, array in feeds.items():
        tensor = request.inputs.add(name=name, datatype="INT64", shape=list(array.shape))
        tensor.contents.int64_contents.extend(array.ravel().tolist())
    return request


def test_health_and_metadata_through_tritonclient(client: grpcclient.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()  # no key needed, like /v2/health
    assert client.is_model_ready(EMBED, headers=AUTH)
    server = client.get_server_metadata(headers=AUTH)
    assert server.name == "edgefleet" and server.version
    meta = client.get_model_metadata(EMBED, headers=AUTH)
    assert meta.name == EMBED and meta.platform == "onnxruntime_onnx" and len(meta.versions) == 1
    assert {(t.name, t.datatype) for t in meta.inputs} == {
        ("input_ids", "INT64"), ("attention_mask", "INT64"), ("token_type_ids", "INT64")}
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [(OUTPUT, "FP32", [-1, -1, 384])]


def test_raw_contents_give_onnxruntimes_answer(client: grpcclient.InferenceServerClient, state_dir: Path) -> None:
    result = client.infer(EMBED, triton_inputs(FEEDS), outputs=[grpcclient.InferRequestedOutput(OUTPUT)],
                          request_id="r-1", headers=AUTH)
    np.testing.assert_allclose(result.as_numpy(OUTPUT), direct_run(state_dir, FEEDS), rtol=1e-5, atol=1e-5)
    response = result.get_response()
    assert response.id == "r-1" and response.model_name == EMBED and len(response.raw_output_contents) == 1


def test_typed_contents_give_the_same_answer(stub: pb_grpc.GRPCInferenceServiceStub, state_dir: Path) -> None:
    response = stub.ModelInfer(typed_request(FEEDS), metadata=tuple(AUTH.items()))
    (output,) = response.outputs
    assert output.name == OUTPUT and output.datatype == "FP32" and list(output.shape) == [2, 5, 384]
    hidden = np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(output.shape)
    np.testing.assert_allclose(hidden, direct_run(state_dir, FEEDS), rtol=1e-5, atol=1e-5)


def test_the_aio_client_works_too(agent: AgentProcess, state_dir: Path) -> None:
    import asyncio

    import tritonclient.grpc.aio as aioclient

    async def infer() -> np.ndarray:
        async with aioclient.InferenceServerClient(agent.grpc) as triton:
            inputs = []
            for name, array in FEEDS.items():
                tensor = aioclient.InferInput(name, list(array.shape), "INT64")
                tensor.set_data_from_numpy(array)
                inputs.append(tensor)
            result = await triton.infer(EMBED, inputs, headers=AUTH)
            return result.as_numpy(OUTPUT)

    hidden = asyncio.run(infer())
    np.testing.assert_allclose(hidden, direct_run(state_dir, FEEDS), rtol=1e-5, atol=1e-5)


def test_bad_tensors_get_invalid_argument_with_a_clear_message(
        client: grpcclient.InferenceServerClient, stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    def infer(feeds: dict[str, np.ndarray], shape: list[int] | None = None, datatype: str | None = None):  # type: ignore[no-untyped-def]
        inputs = triton_inputs(feeds)
        if shape is not None or datatype is not None:  # what a buggy client sends: header and data disagree
            first = inputs[0]._get_tensor()
            if shape is not None:
                del first.shape[:]
                first.shape.extend(shape)
            if datatype is not None:
                first.datatype = datatype
        return lambda: client.infer(EMBED, inputs, headers=AUTH)

    code, message = refusal(infer(FEEDS, shape=[2, 6]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "input_ids" in message and "needs 96" in message, message
    code, message = refusal(infer(FEEDS, datatype="FP32"))
    assert code == "StatusCode.INVALID_ARGUMENT" and "input_ids" in message, message
    code, message = refusal(infer({**FEEDS, "input_ids": IDS.astype(np.int32)}))
    assert code == "StatusCode.INVALID_ARGUMENT" and "input_ids" in message, message
    code, message = refusal(infer({**FEEDS, "pixels": IDS}))
    assert code == "StatusCode.INVALID_ARGUMENT" and "pixels" in message, message
    code, message = refusal(lambda: client.infer(EMBED, triton_inputs(FEEDS), headers=AUTH,
                                                 outputs=[grpcclient.InferRequestedOutput("logits")]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "logits" in message, message
    code, message = refusal(lambda: client.infer(EMBED, [], headers=AUTH))
    assert code == "StatusCode.INVALID_ARGUMENT" and "no inputs" in message, message

    # typed contents in the wrong field, or fewer values than the shape holds
    wrong_field = typed_request(FEEDS)
    values = list(wrong_field.inputs[0].contents.int64_contents)
    wrong_field.inputs[0].contents.ClearField("int64_contents")
    wrong_field.inputs[0].contents.fp32_contents.extend(values)
    short = typed_request(FEEDS)
    del short.inputs[1].contents.int64_contents[-1]
    both = typed_request(FEEDS)
    both.raw_input_contents.extend([IDS.tobytes()] * 3)
    for request, words in ((wrong_field, "int64_contents"), (short, "holds 10 values"), (both, "both")):
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, metadata=tuple(AUTH.items()))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT and words in info.value.details(), \
            info.value.details()


def test_non_utf8_bytes_and_oversize_messages_are_refused(
        stub: pb_grpc.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient) -> None:
    request = pb.ModelInferRequest(model_name=EMBED)
    tensor = request.inputs.add(name="input_ids", datatype="BYTES", shape=[1])
    tensor.contents.bytes_contents.append(b"\xff\xfe")
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, metadata=tuple(AUTH.items()))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()

    huge = np.zeros((1, 1_200_000), dtype=np.int64)  # 9.6 MB: past server.max_body_bytes (8 MiB)
    code, message = refusal(lambda: client.infer(
        EMBED, triton_inputs({"input_ids": huge, "attention_mask": huge, "token_type_ids": huge}), headers=AUTH))
    assert code == "StatusCode.RESOURCE_EXHAUSTED", message
    assert client.is_server_ready()  # and it still serves
    assert client.infer(EMBED, triton_inputs(FEEDS), headers=AUTH).as_numpy(OUTPUT).shape == (2, 5, 384)


def test_unknown_model_version_and_a_chat_model_are_refused(client: grpcclient.InferenceServerClient) -> None:
    code, message = refusal(lambda: client.infer("no-such-model", triton_inputs(FEEDS), headers=AUTH))
    assert code == "StatusCode.NOT_FOUND" and "no-such-model" in message
    code, message = refusal(lambda: client.infer(EMBED, triton_inputs(FEEDS), model_version="999", headers=AUTH))
    assert code == "StatusCode.NOT_FOUND" and "999" in message
    code, message = refusal(lambda: client.get_model_metadata(CHAT, headers=AUTH))
    assert code == "StatusCode.INVALID_ARGUMENT" and "does not take tensors" in message
    code, _ = refusal(lambda: client.is_model_ready("no-such-model", headers=AUTH))
    assert code == "StatusCode.NOT_FOUND"


def test_the_api_key_is_checked_from_metadata(client: grpcclient.InferenceServerClient) -> None:
    for headers in (None, {"authorization": "Bearer wrong-key-0000"}, {"authorization": KEY}):
        code, message = refusal(lambda h=headers: client.infer(EMBED, triton_inputs(FEEDS), headers=h))
        assert code == "StatusCode.UNAUTHENTICATED" and "API key" in message
        code, _ = refusal(lambda h=headers: client.get_model_metadata(EMBED, headers=h))
        assert code == "StatusCode.UNAUTHENTICATED"
    assert client.infer(EMBED, triton_inputs(FEEDS), headers=AUTH).as_numpy(OUTPUT).shape == (2, 5, 384)


def test_bytes_that_are_not_a_message_get_invalid_argument_after_the_key_check(agent: AgentProcess) -> None:
    """Garbage sent as a request: UNAUTHENTICATED without the key (the key is checked first),
    INVALID_ARGUMENT with it, in our words (no Python exception named), one log line a call."""
    garbage = b"\xff\xff\xff\xff\x0f"  # field 0 and wire type 7: no protobuf parser reads this
    before = agent.log().count("is not a valid inference.ModelInferRequest")
    with grpc.insecure_channel(agent.grpc) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
        for metadata in ((), (("authorization", "Bearer wrong-key-0000"),)):
            with pytest.raises(grpc.RpcError) as info:
                infer(garbage, metadata=metadata, timeout=30)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED, info.value.details()
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as info:
                infer(garbage, metadata=tuple(AUTH.items()), timeout=30)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert "not a valid inference.ModelInferRequest" in info.value.details()
            assert "Error" not in info.value.details() and "Exception" not in info.value.details()
        # the service still serves real requests on the same channel
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelInfer(typed_request(FEEDS), metadata=tuple(AUTH.items())).outputs[0].name == OUTPUT
    log = agent.log()
    assert log.count("is not a valid inference.ModelInferRequest") - before == 3, log[-3000:]
    assert "Traceback" not in log and "DecodeError" not in log, log[-3000:]


def test_two_authorization_entries_are_refused(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    for second in (f"Bearer {KEY}", "Bearer wrong-key-0000"):
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(typed_request(FEEDS), metadata=(("authorization", f"Bearer {KEY}"),
                                                            ("authorization", second)))
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert "2 Authorization headers" in info.value.details()


def test_grpc_calls_are_counted_in_metrics(agent: AgentProcess, client: grpcclient.InferenceServerClient) -> None:
    import urllib.request

    client.infer(EMBED, triton_inputs(FEEDS), headers=AUTH)
    request = urllib.request.Request(agent.url + "/metrics", headers=AUTH)
    with urllib.request.urlopen(request, timeout=10) as resp:
        text = resp.read().decode()
    # go-grpc-prometheus's names, apart from HTTP's requests (tests/test_metrics_names.py)
    handled = [line for line in text.splitlines() if line.startswith("grpc_server_handled_total{")
               and 'grpc_method="ModelInfer"' in line and 'grpc_service="inference.GRPCInferenceService"' in line]
    assert [line for line in handled if 'grpc_code="OK"' in line]
    assert [line for line in handled if 'grpc_code="UNAUTHENTICATED"' in line]
    assert "GRPCInferenceService" not in "".join(line for line in text.splitlines() if "edgefleet_http" in line)


async def test_grpc_is_off_unless_configured(state_dir: Path) -> None:
    from agent.kserve.grpc_server import GRPC_PORT

    async with start_agent(demo_config(state_dir, models=(EMBED,))) as running:
        assert GRPC_PORT not in running.app


def test_generated_code_is_what_the_upstream_proto_gives(tmp_path: Path) -> None:
    subprocess.run([str(REPO / "scripts" / "gen_grpc.sh"), str(tmp_path)], check=True, cwd=REPO)
    generated = sorted(p.name for p in (tmp_path / "agent/kserve/proto").iterdir())
    assert generated == ["open_inference_grpc_pb2.py", "open_inference_grpc_pb2.pyi", "open_inference_grpc_pb2_grpc.py"]
    for name in generated:
        assert filecmp.cmp(tmp_path / "agent/kserve/proto" / name, REPO / "agent/kserve/proto" / name,
                           shallow=False), f"{name} differs from a fresh scripts/gen_grpc.sh run"
