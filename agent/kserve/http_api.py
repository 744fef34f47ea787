"""The Open Inference Protocol (KServe v2) REST API for tensor models.

JSON tensors only (the binary-data extension is not implemented). Tensors are
checked against the model's declared inputs by the backend; this module turns
v2 JSON into numpy arrays and back, and refuses data that does not match its
own declared shape or datatype. Health endpoints answer with the status code
alone and an empty body, as the protocol says.
"""

from __future__ import annotations

import math
from typing import Any

from aiohttp import web

from agent import __version__
from runtime.backend import Capability, TensorSpec
from runtime.registry import ModelState, ServedModel

from ..context import MODELS, read_json
from ..errors import ApiError, bad_request
from ..jsonio import json_response

#: KServe v2 datatype -> numpy dtype name.
V2_TO_NUMPY: dict[str, str] = {
    "BOOL": "bool", "UINT8": "uint8", "UINT16": "uint16", "UINT32": "uint32",
    "UINT64": "uint64", "INT8": "int8", "INT16": "int16", "INT32": "int32", "INT64": "int64",
    "FP16": "float16", "FP32": "float32", "FP64": "float64", "BYTES": "object",
}
NUMPY_TO_V2 = {v: k for k, v in V2_TO_NUMPY.items()}


def setup(app: web.Application) -> None:
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/models/{name}", model_metadata)
    app.router.add_get("/v2/models/{name}/versions/{version}", model_metadata)
    app.router.add_get("/v2/models/{name}/ready", model_ready)
    app.router.add_get("/v2/models/{name}/versions/{version}/ready", model_ready)
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_post("/v2/models/{name}/versions/{version}/infer", infer)


async def server_metadata(request: web.Request) -> web.Response:
    return json_response({"name": "edgefleet", "version": __version__, "extensions": []})


async def live(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def ready(request: web.Request) -> web.Response:
    return web.Response(status=200 if request.app[MODELS].all_ready() else 400)


def _tensor_served(request: web.Request) -> ServedModel:
    served = request.app[MODELS].get(request.match_info["name"])
    version = request.match_info.get("version")
    if version is not None and version != served.version:
        raise ApiError(404, f"model '{served.name}' has no version '{version}' "
                       f"(serving version '{served.version}')")
    if Capability.TENSOR not in served.info.capabilities:
        raise bad_request(f"model '{served.name}' does not take tensors; use the /v1 API")
    return served


def _spec_json(spec: TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": NUMPY_TO_V2.get(spec.dtype, spec.dtype),
            "shape": list(spec.shape)}


async def model_metadata(request: web.Request) -> web.Response:
    served = _tensor_served(request)
    return json_response({
        "name": served.name,
        "versions": [served.version],
        "platform": served.info.platform,
        "inputs": [_spec_json(s) for s in served.info.inputs],
        "outputs": [_spec_json(s) for s in served.info.outputs],
    })


async def model_ready(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    status = next((s for s in request.app[MODELS].statuses() if s.name == name), None)
    if status is None:
        raise ApiError(404, f"model '{name}' is not known")
    return web.Response(status=200 if status.state is ModelState.READY else 400)


def _to_array(tensor: Any, index: int) -> tuple[str, Any]:
    import numpy as np

    if not isinstance(tensor, dict):
        raise bad_request(f"inputs[{index}] must be an object")
    name, shape, datatype = tensor.get("name"), tensor.get("shape"), tensor.get("datatype")
    if not isinstance(name, str) or not name:
        raise bad_request(f"inputs[{index}].name must be a non-empty string")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool)
                                              and d >= 0 for d in shape):
        raise bad_request(f"input '{name}': shape must be a list of non-negative integers")
    if not isinstance(datatype, str) or datatype not in V2_TO_NUMPY:
        raise bad_request(f"input '{name}': unknown datatype {datatype!r}; "
                          f"one of {', '.join(V2_TO_NUMPY)}")
    if "data" not in tensor:
        raise bad_request(f"input '{name}': no data (binary tensor data is not supported)")
    try:
        array = np.asarray(tensor["data"], dtype=V2_TO_NUMPY[datatype])
    except (TypeError, ValueError, OverflowError) as exc:
        raise bad_request(f"input '{name}': data is not {datatype}: {exc}") from None
    expected = math.prod(shape)
    if array.size != expected:
        raise bad_request(f"input '{name}': shape {shape} holds {expected} values, "
                          f"data has {array.size}")
    return name, array.reshape(shape)


def _flat(array: Any) -> Any:
    """Row-major data: numeric arrays as they are (orjson writes them), others as lists."""
    if array.dtype.kind in "biuf" and array.dtype.name != "float16":
        return array.ravel()
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in array.ravel().tolist()]


async def infer(request: web.Request) -> web.Response:
    served = _tensor_served(request)
    body = await read_json(request)
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), list) or not body["inputs"]:
        raise bad_request("the request must be an object with a non-empty 'inputs' list")
    inputs: dict[str, Any] = {}
    for i, tensor in enumerate(body["inputs"]):
        name, array = _to_array(tensor, i)
        if name in inputs:
            raise bad_request(f"input '{name}' is given twice")
        inputs[name] = array
    wanted = body.get("outputs")
    output_names = None
    if wanted is not None:
        if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                                   for o in wanted):
            raise bad_request("'outputs' must be a list of objects with a 'name'")
        output_names = [o["name"] for o in wanted]
    results = await served.infer(inputs, output_names)
    response: dict[str, Any] = {
        "model_name": served.name,
        "model_version": served.version,
        "outputs": [
            {"name": name, "datatype": NUMPY_TO_V2.get(array.dtype.name, "BYTES"),
             "shape": list(array.shape), "data": _flat(array)}
            for name, array in results.items()
        ],
    }
    if isinstance(body.get("id"), str):
        response["id"] = body["id"]
    return json_response(response)
