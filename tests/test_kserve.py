"""The Open Inference Protocol (KServe v2) on the ONNX model."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from conftest import CHAT, EMBED


async def test_server_health_and_metadata(agent):
    assert (await agent.get("/v2/health/live"))[0] == 200
    assert (await agent.get("/v2/health/ready"))[0] == 200
    status, meta = await agent.get("/v2")
    assert status == 200 and meta["name"] == "edgefleet"


async def test_model_metadata_gives_real_names_dtypes_and_shapes(agent):
    status, meta = await agent.get(f"/v2/models/{EMBED}")
    assert status == 200
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [
        {"name": n, "datatype": "INT64", "shape": [-1, -1]}
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    assert meta["outputs"] == [{"name": "last_hidden_state", "datatype": "FP32", "shape": [-1, -1, 384]}]
    assert (await agent.get(f"/v2/models/{EMBED}/ready"))[0] == 200
    assert (await agent.get(f"/v2/models/{EMBED}/versions/{meta['versions'][0]}"))[0] == 200


async def test_infer_matches_onnxruntime_directly(agent, state_dir):
    ids = np.array([[101, 7592, 2088, 102], [101, 2307, 102, 0]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    types = np.zeros_like(ids)
    status, body, _ = await agent.post(f"/v2/models/{EMBED}/infer", json={
        "id": "req-1",
        "inputs": [
            {"name": "input_ids", "shape": [2, 4], "datatype": "INT64", "data": ids.tolist()},  # nested
            {"name": "attention_mask", "shape": [2, 4], "datatype": "INT64", "data": mask.ravel().tolist()},
            {"name": "token_type_ids", "shape": [2, 4], "datatype": "INT64", "data": types.ravel().tolist()},
        ],
    })
    assert status == 200, body
    assert body["id"] == "req-1" and body["model_name"] == EMBED
    (out,) = body["outputs"]
    assert out["name"] == "last_hidden_state" and out["datatype"] == "FP32" and out["shape"] == [2, 4, 384]
    session = ort.InferenceSession(str(state_dir / "models" / EMBED / "current" / "model.onnx"))
    (want,) = session.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    np.testing.assert_allclose(np.array(out["data"], dtype=np.float32).reshape(2, 4, 384), want, atol=1e-5)


async def test_gguf_model_has_no_tensor_interface(agent):
    status, body = await agent.get(f"/v2/models/{CHAT}")
    assert status == 400 and "/v1" in body["error"]
