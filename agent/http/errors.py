"""API errors, and the one place where every lower-layer error becomes one.

Handlers raise `ApiError` (bad request content) or let runtime errors through;
the error middleware in agent/app.py calls `to_api_error` and renders the
result in the convention of the endpoint that was called: OpenAI's
``{"error": {"message", "type", "param", "code"}}`` or KServe v2's
``{"error": "..."}``. The gRPC service (agent/kserve/grpc_server.py) goes
through the same `to_api_error` and turns the result into a gRPC status with
`grpc_status`, so both transports refuse the same things for the same reasons.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import http_exceptions, web
from aiohttp.web_protocol import RequestPayloadError

from agent.http.jsonio import json_response
from agent.kserve import TensorError
from runtime import errors as rt
from security.gate import Refusal

if TYPE_CHECKING:  # grpc is imported by the gRPC server (agent/kserve/grpc_server.py), when it is on
    import grpc


@dataclass
class ApiError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: Close the connection after this response (the request's bytes cannot be trusted).
    close: bool = False

    def __str__(self) -> str:
        return self.message


def protocol_error(exc: http_exceptions.HttpProcessingError) -> ApiError:
    """An error aiohttp's HTTP parser raised, in our words: the message is chosen by the
    error's class and never quotes the request (aiohttp's own messages echo its bytes)."""
    if isinstance(exc, http_exceptions.LineTooLong):
        return ApiError(431, "The request line or a header is too long", code="request_header_too_large",
                        close=True)
    if isinstance(exc, http_exceptions.BadHttpMethod):
        return ApiError(400, "The request method is not a valid HTTP method", close=True)
    if isinstance(exc, http_exceptions.TransferEncodingError):
        return ApiError(400, "The request body's chunked transfer encoding is malformed", close=True)
    if isinstance(exc, http_exceptions.ContentEncodingError):
        return ApiError(415, "The request body cannot be decoded: its Content-Encoding is not supported "
                        "(use gzip, deflate or none) or the body is not valid for it",
                        code="unsupported_content_encoding", close=True)
    if isinstance(exc, http_exceptions.PayloadEncodingError):
        return ApiError(400, "The request body is not valid for its encoding", close=True)
    return ApiError(400, "The request is not valid HTTP", close=True)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def one_credential(values: list[str]) -> str | None:
    """The request's one Authorization value (None: none sent); a 400 when it sent several,
    whose order proxies and servers read differently (the first, the last, or joined)."""
    if len(values) > 1:
        raise ApiError(400, f"The request has {len(values)} Authorization headers; send exactly one",
                       code="duplicate_authorization", close=True)
    return values[0] if values else None


def to_api_error(exc: BaseException) -> ApiError:
    """Map any exception a handler let through onto an HTTP error."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Refusal):  # the request gate: 401, 403 or 429 with its headers
        kind = {401: "invalid_request_error", 403: "permission_error"}.get(exc.status, "rate_limit_error")
        return ApiError(exc.status, exc.message, type=kind, code=exc.code, headers=dict(exc.headers))
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
            headers={"Retry-After": str(int(max(1, exc.retry_after_s)))}, close=True,
        )
    if isinstance(exc, rt.ContextLengthExceededError):
        return ApiError(400, str(exc), param=exc.param, code="context_length_exceeded")
    if isinstance(exc, rt.PromptTooLargeError):
        return ApiError(400, str(exc), param=exc.param, code="prompt_too_large")
    if isinstance(exc, rt.ModelTimeExceededError):
        return ApiError(400, str(exc), code="model_time_exceeded")
    if isinstance(exc, rt.WorkingSetTooLargeError):
        return ApiError(413, str(exc), code="working_set_too_large")
    if isinstance(exc, rt.InvalidInputError):
        return ApiError(400, str(exc), param=exc.param)
    if isinstance(exc, rt.UnsupportedOperationError):
        return ApiError(400, str(exc), param="model", code="unsupported_operation")
    if isinstance(exc, (rt.BundleError, rt.ModelLoadError)):
        return ApiError(400, str(exc), code="model_load_failed")
    if isinstance(exc, rt.RuntimeLayerError):
        return ApiError(500, str(exc), type="server_error")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return ApiError(413, "Request body too large", code="request_too_large", close=True)
    if isinstance(exc, web.HTTPException):
        allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return ApiError(exc.status, exc.reason, type="invalid_request_error"
                        if exc.status < 500 else "server_error", headers=allow)
    if isinstance(exc, http_exceptions.HttpProcessingError):
        return protocol_error(exc)
    if isinstance(exc, RequestPayloadError):  # raised by request.read(), the cause says why
        cause = exc.__cause__
        if isinstance(cause, http_exceptions.HttpProcessingError):
            return protocol_error(cause)
        return ApiError(400, "The request body could not be read", close=True)
    return ApiError(500, "Internal server error; see the agent's log", type="server_error")


def openai_error_response(err: ApiError) -> web.Response:
    body = {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code}}
    return _closing(json_response(body, status=err.status, headers=err.headers), err)


def kserve_error_response(err: ApiError) -> web.Response:
    return _closing(json_response({"error": err.message}, status=err.status, headers=err.headers), err)


def error_response(path: str, err: ApiError) -> web.Response:
    """`err` in the convention of the API that `path` belongs to."""
    return (kserve_error_response if path.startswith("/v2") else openai_error_response)(err)


def _closing(response: web.Response, err: ApiError) -> web.Response:
    if err.close:
        response.force_close()
    return response


#: HTTP status -> gRPC status code name, as gRPC's own HTTP mapping and Triton's server do it.
_GRPC_BY_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    413: "RESOURCE_EXHAUSTED",
    429: "UNAVAILABLE",  # retryable: the queue is full now
    501: "UNIMPLEMENTED",
    503: "UNAVAILABLE",
}


def grpc_status(err: ApiError) -> tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]:
    """`err` as a gRPC status code and trailing metadata (``retry-after`` when the HTTP
    answer would carry Retry-After); the message is `err.message` on both transports."""
    import grpc

    if err.code == "model_time_exceeded":
        code = grpc.StatusCode.DEADLINE_EXCEEDED
    elif err.status == 429 and err.code != "queue_full":  # a key's limit (the gate), not a full queue
        code = grpc.StatusCode.RESOURCE_EXHAUSTED
    else:
        code = grpc.StatusCode[_GRPC_BY_STATUS.get(err.status, "INTERNAL" if err.status >= 500
                                                   else "FAILED_PRECONDITION")]
    trailers = tuple((name.lower(), value) for name, value in err.headers.items()
                     if name == "Retry-After" or name.startswith("x-ratelimit-"))
    return code, trailers
