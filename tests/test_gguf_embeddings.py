"""Embeddings from a GGUF model (llama.cpp's embedding mode) on /v1/embeddings, beside ONNX.

No small embedding GGUF ships on PyPI (the packages that name GGUF embeddings download
their weights at run time), so the test model is the demo SmolLM2 GGUF run in embedding
mode with mean pooling: llama.cpp pools decoder models too. The bundle says
``task = "embedding"``; nothing else differs from the chat bundle.
"""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import numpy as np
import pytest
from conftest import CHAT, EMBED, demo_config, openai_client, start_agent

from agent.config import ModelEntry
from runtime.bundle import MODEL_TOML, BundleManifest, GgufOptions, write_manifest
from runtime.store import ModelStore

GGUF_EMBED = "smollm2-embed"
TEXTS = ["The cat sits on the mat.", "A kitten is resting on a rug.", "Quarterly revenue grew by eight percent.",
         "Short."]


def lay_out_gguf_embedding(state_dir: Path) -> None:
    """The demo GGUF as an embedding bundle, through the store as any version is."""
    store = ModelStore(state_dir)
    chat = store.bundle(CHAT)
    files = {"model.gguf": store.add_file(chat.weights)}
    manifest = BundleManifest(format="gguf", file="model.gguf", task="embedding", version="mean-1",
                              description="SmolLM2-135M in llama.cpp embedding mode, mean pooling",
                              gguf=GgufOptions(n_ctx=256, pooling="mean"))
    with tempfile.TemporaryDirectory() as temp:
        write_manifest(Path(temp), manifest)
        files[MODEL_TOML] = store.add_file(Path(temp) / MODEL_TOML)
    store.lay_out(GGUF_EMBED, "mean-1", files)
    store.activate(GGUF_EMBED, "mean-1", reason="test")


@pytest.fixture(scope="module")
async def gguf_agent(state_dir):
    lay_out_gguf_embedding(state_dir)
    config = demo_config(state_dir, (EMBED,))
    config = config.with_overrides(models=[*config.models, ModelEntry(name=GGUF_EMBED)])
    async with start_agent(config) as running:
        yield running


async def _embed(agent, texts, model=GGUF_EMBED):
    status, body, _ = await agent.post("/v1/embeddings", json={"model": model, "input": texts})
    assert status == 200, body
    return np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])]), body


async def test_gguf_embeddings_are_deterministic_normalized_and_a_batch_equals_single_inputs(gguf_agent):
    batch, body = await _embed(gguf_agent, TEXTS)
    assert batch.shape == (len(TEXTS), 576)  # SmolLM2-135M's embedding length
    assert body["usage"]["prompt_tokens"] > len(TEXTS)
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)  # L2-normalized (the default)
    again, _ = await _embed(gguf_agent, TEXTS)
    np.testing.assert_array_equal(again, batch)  # same input, same bytes
    singles = np.vstack([(await _embed(gguf_agent, text))[0] for text in TEXTS])
    np.testing.assert_allclose(singles, batch, atol=1e-4)
    cos = batch @ batch.T
    assert cos[0, 1] > cos[0, 2]  # a cat and a kitten are nearer than a cat and revenue


async def test_gguf_and_onnx_embeddings_serve_side_by_side_through_the_openai_client(gguf_agent):
    async with openai_client(gguf_agent.url) as client:
        gguf = await client.embeddings.create(model=GGUF_EMBED, input=TEXTS[:2])
        onnx = await client.embeddings.create(model=EMBED, input=TEXTS[:2])
        assert [len(d.embedding) for d in gguf.data] == [576, 576]
        assert [len(d.embedding) for d in onnx.data] == [384, 384]
        encoded = await client.embeddings.create(model=GGUF_EMBED, input=TEXTS[0], encoding_format="base64")
        vector = np.frombuffer(base64.b64decode(encoded.data[0].embedding), dtype="<f4")  # asked for: left encoded
        np.testing.assert_allclose(vector, gguf.data[0].embedding, atol=1e-6)
    status, body = await gguf_agent.get(f"/v1/models/{GGUF_EMBED}")
    assert status == 200 and body["capabilities"] == ["embedding"], body


async def test_a_gguf_embedding_input_longer_than_its_context_is_a_400(gguf_agent):
    status, body, _ = await gguf_agent.post("/v1/embeddings",
                                            json={"model": GGUF_EMBED, "input": ["word " * 400]})
    assert status == 400, body
    assert "at most 256" in body["error"]["message"]
    status, body, _ = await gguf_agent.post("/v1/chat/completions", json={
        "model": GGUF_EMBED, "messages": [{"role": "user", "content": "hi"}]})
    assert status == 400 and body["error"]["code"] == "unsupported_operation", body


def test_pooling_auto_follows_the_gguf_metadata():
    from runtime.gguf.gguf_embedding import metadata_pooling

    assert metadata_pooling({"general.architecture": "bert", "bert.pooling_type": "2"}) == "cls"
    assert metadata_pooling({"general.architecture": "nomic-bert", "nomic-bert.pooling_type": "1"}) == "mean"
    assert metadata_pooling({"general.architecture": "llama"}) is None  # a decoder: the backend takes mean
