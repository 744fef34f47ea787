"""KServe v2 over gRPC through the agent's life: FP16, BOOL and BYTES tensors, a SIGHUP that
changes the API key, and a SIGTERM drain, with NVIDIA's unmodified tritonclient[grpc].

One agent process with a config file (what SIGHUP re-reads), serving the demo models and
an identity model (tests/onnx_models.py) for the datatypes the demo model does not take.
The tests run in file order: the last one stops the agent.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from agent_process import AgentProcess, serve
from conftest import EMBED
from onnx_models import identity_bundle

OUTPUT = "last_hidden_state"
KEY, NEW_KEY = "grpc-life-key-0001", "grpc-life-key-0002"
IDS = np.array([[101, 7592, 2088, 999, 102]], dtype=np.int64)
FEEDS = {"input_ids": IDS, "attention_mask": np.ones_like(IDS), "token_type_ids": np.zeros_like(IDS)}


def write_config(path: Path, api_key: str, identity: Path) -> Path:
    path.write_text(f'[server]\napi_key = "{api_key}"\ndrain_timeout_s = 10\n'
                    f'[[models]]\nname = "identity"\npath = "{identity}"\n')
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("grpc-life")
    identity_bundle(work / "identity")
    write_config(work / "agent.toml", KEY, work / "identity")
    return work


@pytest.fixture(scope="module")
def agent(work: Path, state_dir: Path) -> Iterator[AgentProcess]:
    with serve(state_dir, work, config=work / "agent.toml") as running:
        yield running


@pytest.fixture(scope="module")
def client(agent: AgentProcess) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(agent.grpc) as triton:
        yield triton


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def infer(client: grpcclient.InferenceServerClient, model: str, feeds: dict[str, np.ndarray],
          key: str) -> grpcclient.InferResult:
    inputs = []
    for name, array in feeds.items():
        tensor = grpcclient.InferInput(name, list(array.shape), grpcclient.np_to_triton_dtype(array.dtype))
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return client.infer(model, inputs, headers=auth(key))


def direct_run(state_dir: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(str(state_dir / "models" / EMBED / "current" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return session.run([OUTPUT], feeds)[0]


def test_fp16_bool_and_bytes_round_trip_as_raw_contents(client):
    half = np.array([0.0, -0.0, 1.0, -2.5, 65504.0, 6.0e-8, 0.1, 3.14159], dtype=np.float16)
    flags = np.array([True, False, False, True])
    text = np.array([b"hello", b"", "h\u00e9llo w\u00f6rld".encode(), b"a\x00b"], dtype=object)
    result = infer(client, "identity", {"half": half, "flag": flags, "text": text}, KEY)
    assert result.as_numpy("half_out").tobytes() == half.tobytes()  # bit for bit, -0.0 and the subnormal too
    np.testing.assert_array_equal(result.as_numpy("flag_out"), flags)
    assert result.as_numpy("text_out").tolist() == text.tolist()
    assert {o.name: o.datatype for o in result.get_response().outputs} == {
        "half_out": "FP16", "flag_out": "BOOL", "text_out": "BYTES"}


def test_a_reload_with_a_new_key_applies_to_grpc_at_once(agent, client, work):
    before = agent.log().count("configuration reloaded")
    write_config(work / "agent.toml", NEW_KEY, work / "identity")
    agent.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while agent.log().count("configuration reloaded") == before:
        assert time.monotonic() < deadline, agent.log()
        time.sleep(0.05)
    with pytest.raises(grpcclient.InferenceServerException) as refused:
        infer(client, EMBED, FEEDS, KEY)
    assert refused.value.status() == "StatusCode.UNAUTHENTICATED"
    assert infer(client, EMBED, FEEDS, NEW_KEY).as_numpy(OUTPUT).shape == (1, 5, 384)


def test_sigterm_lets_an_admitted_call_finish_and_refuses_new_ones(agent, client, state_dir):
    """Last: it stops the agent. A call admitted before SIGTERM finishes with its result; one
    that arrives while the agent drains gets UNAVAILABLE; the process then exits 0."""
    big = {name: np.tile(array[:1, :1], (16, 256)) for name, array in FEEDS.items()}  # ~2 s on 2 EPYC cores
    outcome: dict[str, Any] = {}
    admitted = threading.Thread(target=lambda: outcome.update(result=infer(client, EMBED, big, NEW_KEY)))
    admitted.start()
    time.sleep(0.3)  # admitted, running on the model's thread
    assert admitted.is_alive(), "the admitted call ended before SIGTERM; make it bigger"
    agent.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(grpcclient.InferenceServerException) as refused:
        infer(client, EMBED, FEEDS, NEW_KEY)
    admitted.join(timeout=30)
    assert refused.value.status() == "StatusCode.UNAVAILABLE"
    assert "shutting down" in refused.value.message()
    np.testing.assert_array_equal(outcome["result"].as_numpy(OUTPUT), direct_run(state_dir, big))
    assert agent.proc.wait(timeout=30) == 0, agent.log()
    assert "Traceback" not in agent.log()
