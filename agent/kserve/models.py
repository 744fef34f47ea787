"""What the Open Inference Protocol says about the server and its models, for both transports.

Whether the server and a model are ready, which served model a name and an optional
version mean, and how its tensors are described: the REST endpoints
(agent/kserve/http_api.py) and the gRPC service (agent/kserve/grpc_server.py) both
answer from here, so a model is the same model, ready or not, on either port.
Refusals are `ApiError`s, which each transport renders in its own convention
(agent/http/errors.py). Rendering (JSON, protobuf messages) stays with the transports.
"""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from agent.context import LIVE, MODELS
from agent.http.errors import ApiError, bad_request
from agent.kserve.tensors import NUMPY_TO_V2
from runtime.backend import Capability, TensorSpec
from runtime.registry import ModelState
from runtime.served_model import ServedModel

#: The server's name in server metadata (REST `GET /v2`, gRPC ServerMetadata).
SERVER_NAME = "edgefleet"


@dataclass(frozen=True)
class TensorMetadata:
    """One input or output as model metadata describes it (-1: any size)."""

    name: str
    datatype: str
    shape: list[int]


def server_ready(app: web.Application) -> bool:
    """Every configured model answers requests and the agent is not shutting down
    (the same answer as /readyz)."""
    return app[MODELS].all_ready() and not app[LIVE].draining


def model_ready(app: web.Application, name: str, version: str | None) -> bool:
    """Whether `name` (at `version`, when one is given) answers requests; an ApiError 404
    when the name is not known. A model unloaded for being idle is ready: the next
    request reloads it."""
    status = next((s for s in app[MODELS].statuses() if s.name == name), None)
    if status is None:
        raise ApiError(404, f"model '{name}' is not known")
    if version and version != status.version:
        return False
    return status.state in (ModelState.READY, ModelState.UNLOADED)


async def tensor_model(app: web.Application, name: str, version: str | None) -> ServedModel:
    """The version serving `name` (reloaded first if it was unloaded for being idle); it
    must take tensors, and be `version` when one is asked for (None or "": whatever serves)."""
    if not name:
        raise bad_request("a model name is required")
    served = await app[MODELS].acquire(name)
    if version and version != served.version:
        raise ApiError(404, f"model '{served.name}' has no version '{version}' "
                       f"(serving version '{served.version}')")
    if Capability.TENSOR not in served.info.capabilities:
        raise bad_request(f"model '{served.name}' does not take tensors; use the /v1 API")
    return served


def tensor_metadata(specs: tuple[TensorSpec, ...] | list[TensorSpec]) -> list[TensorMetadata]:
    """The model's declared inputs or outputs in v2 datatypes."""
    return [TensorMetadata(s.name, NUMPY_TO_V2.get(s.dtype, s.dtype), list(s.shape)) for s in specs]
