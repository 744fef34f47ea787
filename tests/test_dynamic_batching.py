"""Dynamic batching on the ONNX model: concurrent requests share one model run, and every
client still gets exactly its own answer, in its own order.

Each request is first sent alone; then all of them at once. A batch that handed a row
to the wrong client, lost a request's order, mixed up token counts or let one bad
request fail the others shows up as a difference from the alone answer. That requests
really were batched is read from /metrics: `executed / executions` is the mean number of
requests per model run.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from conftest import EMBED, Executions, RunningAgent, demo_config, start_agent

from agent.config import ModelEntry, SchedulerConfig
from agent.context import MODELS
from runtime.scheduling.batching import BatchingSettings

pytestmark = pytest.mark.slow

WORDS = ["sensor", "gateway", "firmware", "battery", "uplink", "thermal", "relay", "valve", "pump", "meter",
         "antenna", "cabinet", "inverter", "compressor", "turbine", "rotor", "bearing", "humidity", "pressure",
         "voltage"]


def text(i: int, j: int) -> str:
    """A distinct text whose length (a few to about 130 tokens) depends on i and j."""
    n = 1 + (i * 7 + j * 13) % 90
    words = [WORDS[(i * 3 + j + k * k) % len(WORDS)] for k in range(n)]
    return f"Report {i}.{j}: " + " ".join(words) + "."


#: 16 requests: 1 to 4 texts each, texts of different lengths; every fourth asks for base64.
REQUESTS: list[dict[str, Any]] = [
    {"model": EMBED, "input": [text(i, j) for j in range(1 + i % 4)] if i % 3 else text(i, 0),
     **({"encoding_format": "base64"} if i % 4 == 3 else {})}
    for i in range(16)
]


def texts_of(body: dict[str, Any]) -> list[str]:
    return [body["input"]] if isinstance(body["input"], str) else body["input"]


def vectors(body: dict[str, Any]) -> np.ndarray:
    """The response's vectors in `index` order, decoded from float lists or base64."""
    data = body["data"]
    assert [d["index"] for d in data] == list(range(len(data))), "data must come in input order"
    rows = [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") if isinstance(d["embedding"], str)
            else np.asarray(d["embedding"], dtype=np.float32) for d in data]
    return np.stack(rows)


async def embed(agent: RunningAgent, body: dict[str, Any]) -> tuple[np.ndarray, dict[str, int]]:
    status, reply, _ = await agent.post("/v1/embeddings", json=body)
    assert status == 200, reply
    return vectors(reply), reply["usage"]


def assert_same(got: tuple[np.ndarray, dict], want: tuple[np.ndarray, dict], what: str) -> None:
    assert got[0].shape == want[0].shape, f"{what}: {got[0].shape} vectors, alone {want[0].shape}"
    assert np.allclose(got[0], want[0], atol=1e-5), (
        f"{what}: vectors differ from alone by up to {np.abs(got[0] - want[0]).max():.2e}")
    assert got[1] == want[1], f"{what}: usage {got[1]}, alone {want[1]}"


def embedding_agent(state_dir, batching: BatchingSettings, budget_mb: int = 0):
    config = demo_config(state_dir, (EMBED,))
    return start_agent(replace(config, batching=batching, scheduler=SchedulerConfig(max_pending=64),
                               models=[ModelEntry(name=EMBED, memory_budget_mb=budget_mb)]))


@pytest.fixture(scope="module")
async def batching(state_dir) -> AsyncIterator[RunningAgent]:
    """The default settings: up to 16 requests per batch, no waiting for more."""
    async with embedding_agent(state_dir, BatchingSettings()) as running:
        yield running


@pytest.fixture(scope="module")
async def alone(batching) -> list[tuple[np.ndarray, dict[str, int]]]:
    """Each request's answer when it is the only one."""
    return [await embed(batching, body) for body in REQUESTS]


async def all_at_once(agent: RunningAgent, alone: list[tuple[np.ndarray, dict[str, int]]]) -> Executions:
    """Every one of REQUESTS sent at once; each answer must be its answer alone. Returns the
    model's runs meanwhile."""
    async with Executions(agent, EMBED) as runs:
        together = await asyncio.gather(*(embed(agent, body) for body in REQUESTS))
    for i, (got, want) in enumerate(zip(together, alone, strict=True)):
        assert_same(got, want, f"request {i}")
    return runs


# --- /v1/embeddings ------------------------------------------------------------------


async def test_sixteen_concurrent_requests_each_get_exactly_their_own_vectors(batching, alone):
    runs = await all_at_once(batching, alone)
    assert runs.executed == len(REQUESTS)
    assert runs.executions < len(REQUESTS) / 2, f"{runs.executions:.0f} runs for {len(REQUESTS)} requests: not batched"


async def test_a_waiting_batcher_gives_the_same_vectors(state_dir, alone):
    """onnx_max_delay_ms > 0: the first request waits for others, so batches fill up."""
    async with embedding_agent(state_dir, BatchingSettings(onnx_max_delay_ms=200)) as agent:
        runs = await all_at_once(agent, alone)
    assert runs.executions <= 4, f"{runs.executions:.0f} runs for {len(REQUESTS)} requests"


async def test_batching_off_gives_the_same_vectors_one_request_per_run(state_dir, alone):
    async with embedding_agent(state_dir, BatchingSettings(onnx_max_batch=1)) as agent:
        runs = await all_at_once(agent, alone)
    assert runs.executions == runs.executed == len(REQUESTS)


async def test_a_malformed_request_among_concurrent_ones_gets_its_own_400(batching, alone):
    bad = [{"model": EMBED, "input": ["fine", ""]}, {"model": EMBED, "input": [1, 2, 3]},
           {"model": EMBED, "input": "x", "encoding_format": "hex"}]
    bodies = REQUESTS[:6] + bad + REQUESTS[6:12]
    replies = await asyncio.gather(*(batching.post("/v1/embeddings", json=body) for body in bodies))
    for body, (status, reply, _) in zip(bodies, replies, strict=True):
        if body in bad:
            assert status == 400, reply
            assert reply["error"]["type"] == "invalid_request_error"
            assert reply["error"]["param"] in ("input", "encoding_format")
        else:
            assert status == 200, reply
            i = REQUESTS.index(body)
            assert_same((vectors(reply), reply["usage"]), alone[i], f"request {i}")


async def test_a_request_too_large_for_the_budget_gets_its_own_413_and_its_batch_mates_succeed(state_dir, alone):
    """With a 4 MB budget a text of 256 tokens cannot run (its attention alone needs about
    20 MB) while short texts can. The batch it joins fails in the model; then each request
    runs alone, and only the large one is refused."""
    huge = {"model": EMBED, "input": ["short one", " ".join(WORDS * 12)]}
    good = [body for body in REQUESTS if max(map(len, texts_of(body))) < 200]
    assert len(good) >= 4
    async with embedding_agent(state_dir, BatchingSettings(onnx_max_delay_ms=200), budget_mb=4) as agent:
        async with Executions(agent, EMBED) as runs:
            replies = await asyncio.gather(*(agent.post("/v1/embeddings", json=body)
                                             for body in [*good[:2], huge, *good[2:]]))
        status, reply, _ = replies.pop(2)
        assert status == 413, reply
        assert reply["error"]["code"] == "working_set_too_large"
        for body, (status, reply, _) in zip(good, replies, strict=True):
            assert status == 200, reply
            i = REQUESTS.index(body)
            assert_same((vectors(reply), reply["usage"]), alone[i], f"request {i}")
        # It did share a run (which failed) before each ran alone.
        assert runs.executed > runs.executions, (runs.executed, runs.executions)
        assert_same(await embed(agent, REQUESTS[0]), alone[0], "a request afterwards")


async def test_normalized_and_raw_requests_each_get_their_own_kind(batching):
    """`normalize` is a per-request choice of the runtime's embed API (the Python API can
    ask for raw vectors): a batch must never hand a request the other kind."""
    served = batching.app[MODELS].get(EMBED)
    asks = [(texts_of(body), (None, False, True)[i % 3]) for i, body in enumerate(REQUESTS)]
    alone = [await served.embed(texts, normalize) for texts, normalize in asks]
    async with Executions(batching, EMBED) as runs:
        together = await asyncio.gather(*(served.embed(texts, normalize) for texts, normalize in asks))
    for i, (got, want) in enumerate(zip(together, alone, strict=True)):
        assert np.allclose(got.vectors, want.vectors, atol=1e-5), f"request {i}"
        assert got.prompt_tokens == want.prompt_tokens
        assert got.input_tokens == want.input_tokens
        norms = np.linalg.norm(got.vectors, axis=1)
        assert np.allclose(norms, 1, atol=1e-4) == (asks[i][1] is not False), (i, asks[i][1], norms)
    assert runs.executions < len(asks) / 2, f"{runs.executions:.0f} runs for {len(asks)} requests: not batched"


# --- KServe v2 tensors ------------------------------------------------------------------


def tensor_request(i: int, rows: int, length: int) -> dict[str, Any]:
    """input_ids / attention_mask / token_type_ids of `rows` rows of `length` tokens, distinct per i."""
    ids = np.array([[101] + [1000 + (i * 131 + r * 17 + k * 7) % 20000 for k in range(length - 2)] + [102]
                    for r in range(rows)], dtype=np.int64)
    return {"inputs": [{"name": name, "shape": list(ids.shape), "datatype": "INT64", "data": array.ravel().tolist()}
                       for name, array in (("input_ids", ids), ("attention_mask", np.ones_like(ids)),
                                           ("token_type_ids", np.zeros_like(ids)))]}


async def infer(agent: RunningAgent, body: dict[str, Any]) -> tuple[int, Any]:
    status, reply, _ = await agent.post(f"/v2/models/{EMBED}/infer", json=body)
    if status != 200:
        return status, reply
    (out,) = reply["outputs"]
    return status, np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


#: 12 tensor requests: 1 to 3 rows; two sequence lengths, so two signatures.
TENSORS = [tensor_request(i, 1 + i % 3, 12 if i % 2 else 20) for i in range(12)]


async def test_concurrent_tensor_requests_each_get_their_own_rows(batching):
    alone = [await infer(batching, body) for body in TENSORS]
    async with Executions(batching, EMBED) as runs:
        together = await asyncio.gather(*(infer(batching, body) for body in TENSORS))
    for i, ((status, got), (_, want)) in enumerate(zip(together, alone, strict=True)):
        assert status == 200, got
        assert got.shape == want.shape, (i, got.shape, want.shape)
        assert np.allclose(got, want, atol=1e-5), f"request {i}: up to {np.abs(got - want).max():.2e} off"
    assert runs.executed == len(TENSORS)
    assert runs.executions < len(TENSORS) / 2, f"{runs.executions:.0f} runs for {len(TENSORS)} requests: not batched"


async def test_a_tensor_request_the_model_refuses_fails_alone(batching):
    """Token ids past the vocabulary pass the shape and dtype checks; the model itself
    refuses them. In a batch, that request gets its 400 and its batch mates their rows."""
    bad = tensor_request(99, 2, 12)
    bad["inputs"][0]["data"][3] = 10_000_000
    good = [body for body in TENSORS if body["inputs"][0]["shape"][1] == 12]
    alone = [await infer(batching, body) for body in good]
    async with Executions(batching, EMBED) as runs:
        replies = await asyncio.gather(*(infer(batching, body) for body in [*good[:3], bad, *good[3:]]))
    status, error = replies.pop(3)
    assert status == 400, error
    assert "error" in error
    for i, ((status, got), (_, want)) in enumerate(zip(replies, alone, strict=True)):
        assert status == 200, got
        assert np.allclose(got, want, atol=1e-5), f"request {i}"
    assert runs.executed > runs.executions, "nothing was batched"
