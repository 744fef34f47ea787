"""Embeddings through the agent are the model's real embeddings."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from conftest import EMBED
from tokenizers import Tokenizer

SENTENCES = [
    "The cat sits on the mat.",
    "A kitten is resting on a rug.",
    "Quarterly revenue grew by eight percent.",
    "Short.",
]


def reference_embeddings(bundle_dir, texts):
    """sentence-transformers' recipe, written out: tokenize, run, mean-pool, L2-normalise."""
    tokenizer = Tokenizer.from_file(str(bundle_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=256)
    tokenizer.enable_padding()
    enc = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    types = np.array([e.type_ids for e in enc], dtype=np.int64)
    session = ort.InferenceSession(str(bundle_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    (hidden,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


async def agent_embeddings(agent, texts):
    status, body, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": texts})
    assert status == 200, body
    return np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])


async def test_agent_embeddings_match_a_direct_onnxruntime_run(agent, state_dir):
    got = await agent_embeddings(agent, SENTENCES)
    want = reference_embeddings(state_dir / "models" / EMBED / "current", SENTENCES)
    assert got.shape == (4, 384)
    np.testing.assert_allclose(got, want, atol=1e-5)


async def test_a_single_sentence_embeds_as_in_a_batch(agent):
    alone = await agent_embeddings(agent, SENTENCES[3])
    batch = await agent_embeddings(agent, SENTENCES)
    np.testing.assert_allclose(alone[0], batch[3], atol=1e-5)


async def test_similar_sentences_score_higher_than_unrelated_ones(agent):
    cat, kitten, revenue, _ = await agent_embeddings(agent, SENTENCES)
    assert float(cat @ kitten) > float(cat @ revenue) + 0.2
    assert float(cat @ kitten) > float(kitten @ revenue) + 0.2


async def test_chat_model_refuses_embeddings_with_a_clear_error(agent):
    from conftest import CHAT

    status, body, _ = await agent.post("/v1/embeddings", json={"model": CHAT, "input": "x"})
    assert status == 400
    assert "does not support embedding" in body["error"]["message"]
    assert body["error"]["param"] == "model"


@pytest.mark.parametrize("dims", [384])
async def test_dimensions_equal_to_the_model_are_accepted(agent, dims):
    status, body, _ = await agent.post("/v1/embeddings", json={"model": EMBED, "input": "x", "dimensions": dims})
    assert status == 200 and len(body["data"][0]["embedding"]) == dims
