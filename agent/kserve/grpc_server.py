"""The Open Inference Protocol (KServe v2) over gRPC: `inference.GRPCInferenceService`.

The same protocol as agent/kserve/http_api.py, for the clients that speak gRPC
(NVIDIA's `tritonclient[grpc]`, KServe's own): grpcio's asyncio server runs on
the agent's one event loop, on its own port (`server.grpc_port`), and serves
the same registry through the same runtime call (`ServedModel.infer`). What is
shared with HTTP is shared, not copied: tensors are decoded by
agent/kserve/tensors.py, which model a name means and whether it (or the
server) is ready is decided by agent/kserve/models.py, errors become gRPC status codes through
`agent.http.errors.to_api_error` and `grpc_status`, the caller is checked by
the request gate (security/gate.py: keys, scopes and limits, the same as HTTP's),
and every call counts as in flight for the shutdown drain. /metrics counts calls under
go-grpc-prometheus's names (`grpc_server_handled_total`, `grpc_server_handling_seconds`),
apart from HTTP's requests.

Request bytes are parsed by our own deserializers (`handlers`), which never raise:
bytes that are not the method's message become an `Undecodable` that `_call`
refuses with INVALID_ARGUMENT after the API-key check, in one log line. (With
the generated ones, grpcio answered UNKNOWN naming protobuf's DecodeError, before
any key was checked, and logged a traceback for every such call.)

Inputs come as typed `contents` or as `raw_input_contents` (all inputs, in input
order); outputs always go back as `raw_output_contents`, as Triton's server
does, which every v2 client reads. Health calls (ServerLive, ServerReady) need
no key, like /v2/health/*. With ``server.tls_cert_file`` set the port serves TLS only, from the
HTTP port's certificate material (security/tls_server.py: a SIGHUP reload reaches new
handshakes through grpc's dynamic credentials; ``tls_client_cert = "required"`` makes grpc
refuse a handshake without a client certificate from ``tls_client_ca_file``). The message
classes are generated from the upstream proto by scripts/gen_grpc.sh and imported only when
gRPC is switched on.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
from aiohttp import web

from agent import __version__
from agent.context import CONFIG, LIVE, METRICS
from agent.http.errors import ApiError, bad_request, grpc_status, one_credential, to_api_error
from agent.http.gate import GATE
from agent.http.server import SERVER_TLS, server_tls
from agent.kserve.models import SERVER_NAME, model_ready, server_ready, tensor_metadata, tensor_model
from agent.kserve.peer import grpc_peer_subject
from agent.kserve.tensors import TensorError, bounded_count, check_header, from_raw, from_values, to_raw, v2_datatype
from runtime.served_model import ServedModel
from security.gate import GRPC_SCOPES, PUBLIC, scope_for

log = logging.getLogger(__name__)

SERVICE = "inference.GRPCInferenceService"
#: v2 datatype -> the typed-contents field that carries it (FP16 and BF16 travel raw only).
CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
    "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
    "FP64": "fp64_contents", "BYTES": "bytes_contents",
}
#: The port the gRPC server bound (server.grpc_port, or the one the system chose for 0).
GRPC_PORT = web.AppKey("grpc_port", int)

Reply = TypeVar("Reply")


def _proto() -> Any:
    """The generated messages, imported on first use: a process that never serves gRPC
    (or a test process holding tritonclient's own copy of these messages) never loads them.
    The generated service code is not used: `handlers` builds the handlers."""
    from agent.kserve.proto import open_inference_grpc_pb2 as pb

    return pb


@dataclass(frozen=True)
class Undecodable:
    """What a request deserializer gives for bytes that are not its message."""

    #: The message's full protobuf name, e.g. ``inference.ModelInferRequest``.
    message: str


def _lenient(message_class: Any) -> Callable[[bytes], Any]:
    """A request deserializer that gives an `Undecodable` instead of raising."""
    def parse(raw: bytes) -> Any:
        try:
            return message_class.FromString(raw)
        except Exception:  # noqa: BLE001 - DecodeError, or worse: either way not a request
            return Undecodable(message_class.DESCRIPTOR.full_name)
    return parse


def handlers(service: InferenceService) -> dict[str, grpc.RpcMethodHandler]:
    """The RPC handlers of `service`, one per method of the proto's service, with `_lenient`
    request deserializers (what the generated ``add_..._to_server`` builds, but with
    FromString that raises)."""
    pb = service.pb
    out = {}
    for method in pb.DESCRIPTOR.services_by_name[SERVICE.rsplit(".", 1)[1]].methods:
        out[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(service, method.name),
            request_deserializer=_lenient(getattr(pb, method.input_type.name)),
            response_serializer=getattr(pb, method.output_type.name).SerializeToString,
        )
    return out


def _credential(context: grpc.aio.ServicerContext) -> str | None:
    """The call's one ``authorization`` metadata value (INVALID_ARGUMENT when it has several)."""
    return one_credential([value for key, value in (context.invocation_metadata() or ())
                           if key.lower() == "authorization" and isinstance(value, str)])


def _source(context: grpc.aio.ServicerContext) -> str:
    """The caller's address without its port (``ipv4:127.0.0.1:5123`` -> ``127.0.0.1``)."""
    peer = context.peer() or "unknown"
    address = peer.split(":", 1)[1] if peer.startswith(("ipv4:", "ipv6:")) else peer
    return address.rsplit(":", 1)[0].strip("[]") if peer.startswith(("ipv4:", "ipv6:")) else address


def _model_of(request: Any) -> str | None:
    """The model a request names (ModelInfer's model_name, ModelReady's and ModelMetadata's name)."""
    return getattr(request, "model_name", None) or getattr(request, "name", None) or None


class InferenceService:
    """The servicer: one method per RPC, each run through `_call` (auth, drain, errors)."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.pb = _proto()

    async def _call(self, method: str, request: Any, context: grpc.aio.ServicerContext,
                    work: Callable[[], Awaitable[Reply]]) -> Reply:
        live = self.app[LIVE]
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        try:
            try:
                admission: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
                scope = scope_for(GRPC_SCOPES, method)
                if scope != PUBLIC:  # the request gate (security/gate.py), as for HTTP; a Refusal is
                    gate = self.app[GATE]  # mapped by to_api_error below
                    identity = gate.authenticate(_credential(context), grpc_peer_subject(context), _source(context))
                    if live.draining:
                        raise ApiError(503, "The agent is shutting down and takes no new requests; "
                                       "retry shortly", headers={"Retry-After": "5"})
                    gate.authorize(identity, scope, None if isinstance(request, Undecodable) else _model_of(request))
                    admission = gate.admit(identity, scope or "")
                with admission:
                    if isinstance(request, Undecodable):
                        log.info("gRPC %s: refused a request that is not a valid %s", method, request.message)
                        raise bad_request(f"The request is not a valid {request.message} message")
                    with live.admitted():
                        return await work()
            except Exception as exc:  # mapped in one place (agent/http/errors.py), as for HTTP
                err = to_api_error(exc)
                if err.status >= 500 and not isinstance(exc, ApiError) and err.status != 503:
                    log.error("gRPC %s: %s", method, err.message, exc_info=err.status == 500)
                code, trailers = grpc_status(err)
                context.set_trailing_metadata(trailers)
                await context.abort(code, err.message)
                raise AssertionError("unreachable: abort raises") from None
        except BaseException:
            if code is grpc.StatusCode.OK:
                code = grpc.StatusCode.CANCELLED
            raise
        finally:  # gRPC's own counters (go-grpc-prometheus's names), never HTTP's
            metrics = self.app[METRICS]
            metrics.grpc_handled.labels("unary", SERVICE, method, code.name).inc()
            metrics.grpc_latency.labels("unary", SERVICE, method).observe(time.perf_counter() - started)

    # --- health and metadata ---------------------------------------------------

    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            return self.pb.ServerLiveResponse(live=True)
        return await self._call("ServerLive", request, context, work)

    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            ready = server_ready(self.app)
            return self.pb.ServerReadyResponse(ready=ready)
        return await self._call("ServerReady", request, context, work)

    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            return self.pb.ModelReadyResponse(ready=model_ready(self.app, request.name, request.version))
        return await self._call("ModelReady", request, context, work)

    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            return self.pb.ServerMetadataResponse(name=SERVER_NAME, version=__version__, extensions=[])
        return await self._call("ServerMetadata", request, context, work)

    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            served = await tensor_model(self.app, request.name, request.version)
            meta = self.pb.ModelMetadataResponse.TensorMetadata
            return self.pb.ModelMetadataResponse(
                name=served.name, versions=[served.version], platform=served.info.platform,
                inputs=[meta(**vars(t)) for t in tensor_metadata(served.info.inputs)],
                outputs=[meta(**vars(t)) for t in tensor_metadata(served.info.outputs)])
        return await self._call("ModelMetadata", request, context, work)

    # --- inference ---------------------------------------------------------------

    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        async def work() -> Any:
            served = await tensor_model(self.app, request.model_name, request.model_version)
            inputs = decode_inputs(request, limit=self.app[CONFIG].server.max_body_bytes)
            names = [o.name for o in request.outputs] or None
            if names is not None and len(set(names)) != len(names):
                raise bad_request("an output is requested more than once")
            results = await served.infer(inputs, names)
            return self._response(request, served, results)
        return await self._call("ModelInfer", request, context, work)

    def _response(self, request: Any, served: ServedModel, results: dict[str, np.ndarray]) -> Any:
        tensor = self.pb.ModelInferResponse.InferOutputTensor
        outputs, raw = [], []
        for name, array in results.items():
            outputs.append(tensor(name=name, datatype=v2_datatype(array), shape=list(array.shape)))
            raw.append(to_raw(array))
        return self.pb.ModelInferResponse(model_name=served.name, model_version=served.version,
                                          id=request.id, outputs=outputs, raw_output_contents=raw)


def decode_inputs(request: Any, limit: int) -> dict[str, np.ndarray]:
    """The request's input tensors as arrays, from typed contents or raw contents; a
    TensorError (INVALID_ARGUMENT) saying which tensor is wrong and why."""
    if not request.inputs:
        raise TensorError("the request has no inputs")
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise TensorError(f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; "
                          "with raw contents every input must have one, in input order")
    arrays: dict[str, np.ndarray] = {}
    for index, tensor in enumerate(request.inputs):
        name, datatype, shape = check_header(tensor.name, tensor.datatype, list(tensor.shape),
                                             f"inputs[{index}]")
        if name in arrays:
            raise TensorError(f"input '{name}' is given more than once")
        bounded_count(name, shape, limit)
        has_contents = tensor.HasField("contents")
        if raw:
            if has_contents:
                raise TensorError(f"input '{name}': contents and raw_input_contents are both given; "
                                  "use one or the other for all inputs")
            arrays[name] = from_raw(name, datatype, shape, raw[index])
            continue
        field = CONTENTS_FIELD.get(datatype)
        if field is None:
            raise TensorError(f"input '{name}': {datatype} has no typed contents; send it in raw_input_contents")
        values = getattr(tensor.contents, field)
        others = [f for f in set(CONTENTS_FIELD.values()) if f != field and len(getattr(tensor.contents, f))]
        if others:
            raise TensorError(f"input '{name}': {datatype} values go in contents.{field}, "
                              f"not contents.{others[0]}")
        arrays[name] = from_values(name, datatype, shape, values)
    return arrays


async def grpc_ctx(app: web.Application) -> AsyncIterator[None]:
    """Cleanup context: the gRPC server listens from start-up to shutdown when
    server.grpc_port is set. At shutdown the drain (agent/app.py) has already let
    admitted calls finish; what is left gets a short grace."""
    config = app[CONFIG].server
    if config.grpc_port is None:
        yield
        return
    server = grpc.aio.server(options=[
        ("grpc.max_receive_message_length", config.max_body_bytes),
        ("grpc.max_send_message_length", -1),
        ("grpc.so_reuseport", 0),
    ])
    service_handlers = handlers(InferenceService(app))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, service_handlers),))
    server.add_registered_method_handlers(SERVICE, service_handlers)
    address = f"{config.host}:{config.grpc_port}"
    tls = app.get(SERVER_TLS) or server_tls(config)  # TLS as on the HTTP port, reloaded with it
    try:
        port = server.add_secure_port(address, tls.grpc_credentials()) if tls else server.add_insecure_port(address)
    except RuntimeError:
        port = 0
    if not port:
        raise OSError(errno.EADDRINUSE, "cannot bind the gRPC port (in use, or the address is not local)",
                      address)
    await server.start()
    app[GRPC_PORT] = port
    log.info("KServe v2 gRPC listening on %s:%d%s", config.host, port, " (TLS)" if tls else "",
             extra={"grpc_port": port})
    try:
        yield
    finally:
        await server.stop(grace=1.0)
