"""KServe v2 over gRPC: readiness that follows the registry, and BYTES tensors that reach a
model's string input, with NVIDIA's unmodified tritonclient[grpc].

One agent process (`serve --demo` plus two identity models from tests/onnx_models.py:
`identity` takes FP16, BOOL and BYTES; `strings` only a 1-D ONNX string `text`, so that
typed contents can reach it: FP16 has none). ServerReady / ModelReady must give the same answer as HTTP's
/v2/health/ready and /v2/models/{name}/ready, before and after a SIGHUP adds a model whose
bundle does not load. Typed BYTES contents go through the stub and messages tritonclient
ships (`tritonclient.grpc.service_pb2*`), raw ones through `InferenceServerClient`.
"""

from __future__ import annotations

import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from agent_process import AgentProcess, serve
from conftest import EMBED
from onnx_models import identity_bundle, identity_onnx
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

KEY = "grpc-ready-key-0001"
AUTH = {"authorization": f"Bearer {KEY}"}
BUNDLE_TOML = 'format = "onnx"\nfile = "model.onnx"\ntask = "tensor"\nversion = "1"\n'


def configured(work: Path) -> dict[str, Path]:
    return {"identity": work / "identity", "strings": work / "strings"}


def write_config(path: Path, models: dict[str, Path]) -> Path:
    entries = "".join(f'[[models]]\nname = "{name}"\npath = "{bundle}"\n' for name, bundle in models.items())
    path.write_text(f'[server]\napi_key = "{KEY}"\n{entries}')
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("grpc-ready")
    identity_bundle(work / "identity")
    for name, onnx in (("strings", identity_onnx({"text": 8})), ("broken", b"this is not an ONNX model")):
        (work / name).mkdir()
        (work / name / "model.onnx").write_bytes(onnx)
        (work / name / "model.toml").write_text(BUNDLE_TOML)
    write_config(work / "agent.toml", configured(work))
    return work


@pytest.fixture(scope="module")
def agent(work: Path, state_dir: Path) -> Iterator[AgentProcess]:
    with serve(state_dir, work, config=work / "agent.toml") as running:
        yield running


@pytest.fixture(scope="module")
def client(agent: AgentProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(agent.grpc) as triton:
        yield triton


@pytest.fixture(scope="module")
def stub(agent: AgentProcess) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(agent.grpc) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def http_status(agent: AgentProcess, path: str) -> int:
    request = urllib.request.Request(agent.url + path, headers=AUTH)
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def text_request(values: list[bytes]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="strings")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[len(values)])
    tensor.contents.bytes_contents.extend(values)
    return request


def test_bytes_typed_contents_reach_the_string_input(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    values = [b"hello", "h\u00e9llo w\u00f6rld".encode(), b""]
    response = stub.ModelInfer(text_request(values), metadata=tuple(AUTH.items()))
    (output,) = response.outputs
    assert output.name == "text_out" and output.datatype == "BYTES" and list(output.shape) == [3]
    raw = response.raw_output_contents[0]  # each element: 4-byte little-endian length, then its bytes
    expected = b"".join(len(v).to_bytes(4, "little") + v for v in values)
    assert raw == expected


def test_bytes_that_are_not_utf8_are_refused_for_a_string_input(
        stub: pb_grpc.GRPCInferenceServiceStub, client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(grpc.RpcError) as typed:
        stub.ModelInfer(text_request([b"ok", b"\xff\xfe"]), metadata=tuple(AUTH.items()))
    assert typed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'text'" in typed.value.details() and "element 1 is not UTF-8 text" in typed.value.details()

    tensor = grpcclient.InferInput("text", [2], "BYTES")
    tensor.set_data_from_numpy(np.array([b"ok", b"\xc3("], dtype=object))  # raw contents, as documented
    with pytest.raises(grpcclient.InferenceServerException) as raw:
        client.infer("strings", [tensor], headers=AUTH)
    assert raw.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "element 1 is not UTF-8 text" in raw.value.message()
    tensor.set_data_from_numpy(np.array([b"ok", b"fine"], dtype=object))  # and it still serves
    assert client.infer("strings", [tensor], headers=AUTH).as_numpy("text_out").tolist() == [b"ok", b"fine"]


def test_fp16_has_no_typed_contents_and_says_to_send_it_raw(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    request = pb.ModelInferRequest(model_name="identity")
    request.inputs.add(name="half", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, metadata=tuple(AUTH.items()))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents" in info.value.details()


def test_readiness_follows_the_registry_as_over_http(
        agent: AgentProcess, client: grpcclient.InferenceServerClient, work: Path) -> None:
    """Last: it adds a model that fails to load. Before, everything is ready on both
    transports; after, the server is not ready and the broken model is not, while the
    others still are and still answer."""
    assert client.is_server_ready() and http_status(agent, "/v2/health/ready") == 200
    for name in ("identity", "strings", EMBED):
        assert client.is_model_ready(name, headers=AUTH) and http_status(agent, f"/v2/models/{name}/ready") == 200
    assert not client.is_model_ready(EMBED, model_version="999", headers=AUTH)
    assert http_status(agent, f"/v2/models/{EMBED}/versions/999/ready") == 400

    write_config(work / "agent.toml", {**configured(work), "broken": work / "broken"})
    agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while http_status(agent, "/v2/models/broken/ready") == 404:  # not known until the reload reached it
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.05)
    assert not client.is_model_ready("broken", headers=AUTH)
    assert http_status(agent, "/v2/models/broken/ready") == 400
    assert not client.is_server_ready() and http_status(agent, "/v2/health/ready") == 400
    assert http_status(agent, "/readyz") == 503
    assert client.is_model_ready("strings", headers=AUTH)
    tensor = grpcclient.InferInput("text", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([b"still here"], dtype=object))
    assert client.infer("strings", [tensor], headers=AUTH).as_numpy("text_out").tolist() == [b"still here"]
