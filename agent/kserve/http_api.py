"""The Open Inference Protocol (KServe v2) REST API for tensor models.

Tensors travel as JSON `data` or, with the binary tensor data extension (as
Triton specifies it), as raw bytes after the JSON header: the
`Inference-Header-Content-Length` header gives the JSON header's length and
each binary input its `parameters.binary_data_size`, in input order. Outputs
come back as binary when the request asks for it (`binary_data` on an output,
`binary_data_output` on the request), which is what NVIDIA's `tritonclient`
does by default. The raw bytes <-> array codec is shared with gRPC
(`agent.kserve.tensors`); this module only frames HTTP bodies. Every malformed
body is a 400 in v2 error JSON: `TensorError` is mapped in `agent.http.errors`.

Tensors are checked against the model's declared inputs by the backend. Health
endpoints answer with the status code alone and an empty body, as the protocol says.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from agent import __version__
from agent.context import CONFIG
from agent.http.bodies import read_body
from agent.http.errors import bad_request
from agent.http.jsonio import OPTIONS, json_response, loads
from agent.kserve.models import SERVER_NAME, model_ready, server_ready, tensor_metadata, tensor_model
from agent.kserve.tensors import (
    TensorError,
    bounded_count,
    check_header,
    from_raw,
    from_values,
    raw_itemsize,
    to_raw,
    to_values,
    v2_datatype,
)

if TYPE_CHECKING:  # numpy comes with the first tensor decoded (agent/kserve/tensors.py)
    import numpy as np

#: The request / response header giving the JSON header's length when binary data follows it.
HEADER_LENGTH = "Inference-Header-Content-Length"
#: What `GET /v2` reports; `model_repository` lives in agent/http/ops_api.py.
EXTENSIONS = ["binary_tensor_data", "model_repository"]
_DIGITS = re.compile(r"[0-9]{1,18}")
_SHARED_MEMORY = ("shared_memory_region", "shared_memory_byte_size", "shared_memory_offset")


def setup(app: web.Application) -> None:
    app.router.add_get("/v2", server_metadata)
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/models/{name}", model_metadata)
    app.router.add_get("/v2/models/{name}/versions/{version}", model_metadata)
    app.router.add_get("/v2/models/{name}/ready", model_ready_status)
    app.router.add_get("/v2/models/{name}/versions/{version}/ready", model_ready_status)
    app.router.add_post("/v2/models/{name}/infer", infer)
    app.router.add_post("/v2/models/{name}/versions/{version}/infer", infer)


async def server_metadata(request: web.Request) -> web.Response:
    return json_response({"name": SERVER_NAME, "version": __version__, "extensions": EXTENSIONS})


async def live(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def ready(request: web.Request) -> web.Response:
    return web.Response(status=200 if server_ready(request.app) else 400)


async def model_metadata(request: web.Request) -> web.Response:
    served = await tensor_model(request.app, request.match_info["name"], request.match_info.get("version"))
    return json_response({
        "name": served.name,
        "versions": [served.version],
        "platform": served.info.platform,
        "inputs": [vars(t) for t in tensor_metadata(served.info.inputs)],
        "outputs": [vars(t) for t in tensor_metadata(served.info.outputs)],
    })


async def model_ready_status(request: web.Request) -> web.Response:
    ready = model_ready(request.app, request.match_info["name"], request.match_info.get("version"))
    return web.Response(status=200 if ready else 400)


# --- request body framing ---------------------------------------------------


async def _read_body(request: web.Request) -> bytes:
    """The whole decoded body (agent/http/bodies.py: 408, 413, 415 as for the OpenAI API)."""
    raw = await read_body(request)
    if not raw:
        raise bad_request("The request body is empty; send a JSON object")
    return raw


def _header_length(value: str, body_size: int) -> int:
    """The JSON header's length from Inference-Header-Content-Length, checked against the body."""
    if not _DIGITS.fullmatch(value.strip()):
        raise bad_request(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}")
    length = int(value)
    if length == 0:
        raise bad_request(f"{HEADER_LENGTH}: 0 (a raw binary request with no JSON header) is not "
                          "supported; send the JSON inference header before the binary data")
    if length > body_size:
        raise bad_request(f"{HEADER_LENGTH} is {length}, but the body has only {body_size} bytes")
    return length


def _split_body(raw: bytes, header_value: str | None) -> tuple[Any, memoryview | None]:
    """The parsed JSON header and the binary data after it (None: no binary section)."""
    if header_value is None:
        try:
            return loads(raw), None
        except ValueError as exc:  # orjson.JSONDecodeError, invalid UTF-8
            raise bad_request(f"We could not parse the JSON body of your request: {exc} (binary tensor "
                              f"data needs the {HEADER_LENGTH} header)") from None
    length = _header_length(header_value, len(raw))
    view = memoryview(raw)
    try:
        return loads(bytes(view[:length])), view[length:]
    except ValueError as exc:
        raise bad_request(f"the first {length} bytes of the body ({HEADER_LENGTH}) are not a JSON "
                          f"inference header: {exc}") from None


# --- inputs -----------------------------------------------------------------


@dataclass(frozen=True)
class _InputHeader:
    """One entry of `inputs`, checked, before its data is decoded."""

    name: str
    datatype: str
    shape: list[int]
    data: Any
    binary_size: int | None


def _parameters(obj: Mapping[str, Any], where: str) -> Mapping[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise bad_request(f"{where}.parameters must be an object")
    if any(key in params for key in _SHARED_MEMORY):
        raise bad_request(f"{where}: shared memory is not supported; send the data in the request")
    return params


def _binary_size(params: Mapping[str, Any], name: str) -> int | None:
    size = params.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise TensorError(f"input '{name}': parameters.binary_data_size must be a non-negative "
                          f"integer, got {size!r}")
    return size


def _input_header(tensor: Any, index: int, limit: int) -> _InputHeader:
    """Check one input's name, datatype, shape and where its data is; refuse absurd shapes."""
    if not isinstance(tensor, dict):
        raise bad_request(f"inputs[{index}] must be an object")
    name, datatype, shape = check_header(tensor.get("name"), tensor.get("datatype"), tensor.get("shape"),
                                         f"inputs[{index}]")
    count = bounded_count(name, shape, limit)
    size = _binary_size(_parameters(tensor, f"input '{name}'"), name)
    has_data = "data" in tensor
    if has_data and size is not None:
        raise TensorError(f"input '{name}' has both 'data' and parameters.binary_data_size; give one")
    if not has_data and size is None:
        raise TensorError(f"input '{name}': no data; give 'data' or send it as binary "
                          "with parameters.binary_data_size")
    itemsize = raw_itemsize(datatype)
    if size is not None and itemsize is not None and size != count * itemsize:
        raise TensorError(f"input '{name}': parameters.binary_data_size is {size}, but shape {shape} "
                          f"of {datatype} is {count * itemsize} bytes")
    return _InputHeader(name, datatype, shape, tensor.get("data"), size)


def _slice_binary(headers: list[_InputHeader], binary: memoryview | None) -> list[memoryview | None]:
    """Each binary input's bytes, in input order; the sizes must add up to the binary section."""
    sizes = [h.binary_size for h in headers if h.binary_size is not None]
    if binary is None:
        if sizes:
            first = next(h.name for h in headers if h.binary_size is not None)
            raise bad_request(f"input '{first}' has parameters.binary_data_size, but the request has "
                              f"no {HEADER_LENGTH} header to say where the binary data starts")
        return [None] * len(headers)
    if sum(sizes) != len(binary):
        raise bad_request(f"the inputs' binary_data_size add up to {sum(sizes)} bytes, but "
                          f"{len(binary)} bytes follow the JSON header")
    slices: list[memoryview | None] = []
    offset = 0
    for h in headers:
        if h.binary_size is None:
            slices.append(None)
            continue
        slices.append(binary[offset:offset + h.binary_size])
        offset += h.binary_size
    return slices


def _decode(header: _InputHeader, raw: memoryview | None) -> np.ndarray:
    import numpy as np

    if raw is None:
        return from_values(header.name, header.datatype, header.shape, header.data)
    # A view into the body, at whatever offset the JSON header's length left it: copy it
    # when it is not aligned for its dtype, which not every backend and CPU forgives.
    return np.require(from_raw(header.name, header.datatype, header.shape, raw), requirements="A")


def _inputs(body: Mapping[str, Any], binary: memoryview | None, limit: int) -> dict[str, np.ndarray]:
    """Named arrays from the request's `inputs` and the binary section after the JSON header."""
    tensors = body.get("inputs")
    if not isinstance(tensors, list) or not tensors:
        raise bad_request("the request must be an object with a non-empty 'inputs' list")
    headers = [_input_header(t, i, limit) for i, t in enumerate(tensors)]
    inputs: dict[str, np.ndarray] = {}
    for header, raw in zip(headers, _slice_binary(headers, binary), strict=True):
        if header.name in inputs:
            raise bad_request(f"input '{header.name}' is given twice")
        inputs[header.name] = _decode(header, raw)
    return inputs


# --- outputs ----------------------------------------------------------------


def _flag(params: Mapping[str, Any], key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{where}.parameters.{key} must be true or false, got {value!r}")
    return value


def _requested_outputs(body: Mapping[str, Any]) -> tuple[list[str] | None, dict[str, bool | None]]:
    """Which outputs to return (None: all) and, per named output, whether it goes as binary."""
    wanted = body.get("outputs")
    if wanted is None:
        return None, {}
    if not isinstance(wanted, list) or not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                                               for o in wanted):
        raise bad_request("'outputs' must be a list of objects with a 'name'")
    binary: dict[str, bool | None] = {}
    for output in wanted:
        name = output["name"]
        where = f"output '{name}'"
        if name in binary:
            raise bad_request(f"{where} is asked for twice")
        params = _parameters(output, where)
        if "classification" in params:
            raise bad_request(f"{where}: the classification extension is not supported; "
                              "ask for the tensor and take the top classes yourself")
        binary[name] = _flag(params, "binary_data", where)
    return list(binary), binary


def _binary_default(body: Mapping[str, Any]) -> bool:
    """The request-wide `binary_data_output`: outputs without their own `binary_data` follow it."""
    return bool(_flag(_parameters(body, "the request"), "binary_data_output", "the request"))


# --- response ---------------------------------------------------------------


def _output_json(name: str, array: np.ndarray, raw: bytes | None) -> dict[str, Any]:
    out: dict[str, Any] = {"name": name, "datatype": v2_datatype(array), "shape": list(array.shape)}
    if raw is None:
        out["data"] = to_values(array)
    else:
        out["parameters"] = {"binary_data_size": len(raw)}
    return out


def _infer_response(head: dict[str, Any], results: Mapping[str, np.ndarray],
                    binary_of: Mapping[str, bool | None], default: bool) -> web.Response:
    """JSON alone when no output is binary; else the JSON header then the outputs' bytes, in order."""
    chunks: list[bytes] = []
    outputs = []
    for name, array in results.items():
        as_binary = binary_of.get(name)
        raw = to_raw(array) if (default if as_binary is None else as_binary) else None
        if raw is not None:
            chunks.append(raw)
        outputs.append(_output_json(name, array, raw))
    header = orjson.dumps({**head, "outputs": outputs}, option=OPTIONS)
    if not chunks:
        return web.Response(body=header, content_type="application/json")
    return web.Response(body=b"".join([header, *chunks]), content_type="application/octet-stream",
                        headers={HEADER_LENGTH: str(len(header))})


async def infer(request: web.Request) -> web.Response:
    """Decode every input and every output request before the model is asked, so that a
    malformed body costs no model time and never reaches the queue."""
    served = await tensor_model(request.app, request.match_info["name"], request.match_info.get("version"))
    raw = await _read_body(request)
    body, binary = _split_body(raw, request.headers.get(HEADER_LENGTH))
    if not isinstance(body, dict):
        raise bad_request("the request must be an object with a non-empty 'inputs' list")
    inputs = _inputs(body, binary, limit=request.app[CONFIG].server.max_body_bytes)
    output_names, binary_of = _requested_outputs(body)
    default = _binary_default(body)
    results = await served.infer(inputs, output_names)
    head: dict[str, Any] = {"model_name": served.name, "model_version": served.version}
    if isinstance(body.get("id"), str):
        head["id"] = body["id"]
    return _infer_response(head, results, binary_of, default)
