"""HTTP errors, and the one place where every lower-layer error becomes one.

Handlers raise `ApiError` (bad request content) or let runtime errors through;
the error middleware in agent/app.py calls `to_api_error` and renders the
result in the convention of the endpoint that was called: OpenAI's
``{"error": {"message", "type", "param", "code"}}`` or KServe v2's
``{"error": "..."}``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from runtime import errors as rt

from .jsonio import json_response
from .kserve.tensors import TensorError


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def to_api_error(exc: BaseException) -> ApiError:
    """Map any exception a handler let through onto an HTTP error."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, TensorError):  # a KServe v2 tensor that does not add up
        return ApiError(400, str(exc))
    if isinstance(exc, rt.ModelNotFoundError):
        return ApiError(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, rt.ModelNotReadyError):
        return ApiError(
            503, str(exc), type="unavailable_error", code="model_not_ready",
            headers={"Retry-After": str(int(max(1, exc.retry_after_s)))},
        )
    if isinstance(exc, rt.OverloadedError):
        return ApiError(
            429, str(exc), type="rate_limit_error", code="queue_full",
            headers={"Retry-After": str(int(max(1, exc.retry_after_s)))},
        )
    if isinstance(exc, rt.ShuttingDownError):
        return ApiError(
            503, str(exc), type="unavailable_error", code="shutting_down",
            headers={"Retry-After": "5"},
        )
    if isinstance(exc, rt.ContextLengthExceededError):
        return ApiError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, rt.InvalidInputError):
        return ApiError(400, str(exc), param=exc.param)
    if isinstance(exc, rt.UnsupportedOperationError):
        return ApiError(400, str(exc), param="model", code="unsupported_operation")
    if isinstance(exc, (rt.BundleError, rt.ModelLoadError)):
        return ApiError(400, str(exc), code="model_load_failed")
    if isinstance(exc, rt.RuntimeLayerError):
        return ApiError(500, str(exc), type="server_error")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return ApiError(413, "Request body too large", code="request_too_large")
    if isinstance(exc, web.HTTPException):
        return ApiError(exc.status, exc.reason, type="invalid_request_error"
                        if exc.status < 500 else "server_error")
    return ApiError(500, "Internal server error; see the agent's log", type="server_error")


def openai_error_response(err: ApiError) -> web.Response:
    body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    return json_response(body, status=err.status, headers=err.headers)


def kserve_error_response(err: ApiError) -> web.Response:
    return json_response({"error": err.message}, status=err.status, headers=err.headers)
