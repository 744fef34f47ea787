"""The HTTP server around the app: connection timeouts, a connection cap, and the
errors aiohttp raises itself answered in the API's JSON.

Why: aiohttp's defaults suit a server behind a proxy, not a device on a shared
network. Its keep-alive lasts an hour, nothing bounds how long a request's
headers may take to arrive, any number of connections is accepted until the
process runs out of descriptors, and errors found by its HTTP parser (an
oversized header, a bad method, bad chunking) are answered in plain text that
quotes the request's bytes, with a traceback in the log. Here:

- ``keepalive_timeout_s`` closes idle connections (aiohttp arms it at connect too);
- ``header_timeout_s`` closes a connection whose request head has started but not
  finished arriving in time (slowloris), with a 408;
- ``max_connections`` answers connections past the cap with a 503 and closes them
  at once, so descriptors stay bounded and the agent keeps serving the others;
- parser errors become the API's error JSON via `agent.http.errors.protocol_error`,
  logged as one rate-limited line without a traceback;
- a response that closes the connection while the request's body is still arriving (a
  413 for a body over the limit, a 415, a 408) is sent, and the connection closed at
  once: aiohttp would otherwise read and discard the rest of the body first, so a
  client sending 100 MB uploaded all of it before it could see the 413.

Request bodies are read, decoded and timed by the handlers (agent/http/bodies.py), since
only they read bodies: aiohttp's own decoding is off (``auto_decompress``), because it
does not check that a gzip body is complete. What the server does at shutdown is
agent/app.py's (`on_shutdown`).

With ``server.tls_cert_file`` set the port speaks TLS only (security/tls_server.py builds
and reloads the context; `SERVER_TLS` holds it for the gRPC server and the SIGHUP
reload), and a TLS handshake must finish within ``header_timeout_s``.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from agent.config import ServerConfig
from agent.http.errors import ApiError, error_response, protocol_error
from agent.lifecycle.process import raise_open_file_limit, return_large_blocks_to_the_system
from security.tls_server import ServerTls, TlsFiles

log = logging.getLogger(__name__)

#: Body bytes aiohttp may read and discard after a handler answered without reading them.
LINGERING_TIME_S = 2.0
#: The endpoint's TLS material, present when server.tls_cert_file is set (`start_server`).
SERVER_TLS = web.AppKey("server_tls", ServerTls)


def _raw_error(status: int, reason: str, message: str, code: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 error response, written before aiohttp has parsed anything."""
    body = orjson.dumps({"error": {"message": message, "type": "unavailable_error" if status == 503
                                   else "invalid_request_error", "param": None, "code": code}})
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n")
    if retry_after is not None:
        head += f"Retry-After: {retry_after}\r\n"
    return head.encode("ascii") + b"\r\n" + body


TOO_MANY_CONNECTIONS = _raw_error(503, "Service Unavailable", "The agent has too many open connections; "
                                  "retry later", "too_many_connections", retry_after=1)
HEADER_TIMEOUT = _raw_error(408, "Request Timeout", "The request's headers did not arrive in time",
                            "request_timeout")


class GuardedRequestHandler(RequestHandler):
    """aiohttp's protocol with a header deadline, a connection cap and JSON parser errors."""

    def __init__(self, manager: web.Server, *, config: ServerConfig, **kwargs: Any) -> None:
        super().__init__(
            manager,
            keepalive_timeout=config.keepalive_timeout_s,
            max_line_size=config.max_header_bytes,
            max_field_size=config.max_header_bytes,
            lingering_time=min(LINGERING_TIME_S, config.body_timeout_s),
            auto_decompress=False,  # agent/http/bodies.py decodes, and checks the end
            **kwargs,
        )
        self._header_timeout_s = config.header_timeout_s
        self._max_connections = config.max_connections
        self._header_timer: asyncio.TimerHandle | None = None
        self._last_body: Any = None  # the newest request's payload stream, until its end arrives

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        manager = self._manager
        if manager is not None and len(manager.connections) > self._max_connections:
            log.warning("refused a connection: %d are open, server.max_connections is %d",
                        len(manager.connections), self._max_connections)
            self._answer_and_close(TOO_MANY_CONNECTIONS)

    def data_received(self, data: bytes) -> None:
        in_head = self._between_requests()
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:  # a request's head is complete
            self._cancel_header_timer()
            if self._messages:
                self._last_body = self._messages[-1][1]
        elif data and in_head and self._header_timer is None and self.transport is not None:
            # A request has begun: from here its header deadline governs, not the idle timeout
            # (aiohttp arms that again after the response).
            if self._keepalive_handle is not None:
                self._keepalive_handle.cancel()
                self._keepalive_handle = None
            self._header_timer = self._loop.call_later(self._header_timeout_s, self._header_timed_out, before)

    def _between_requests(self) -> bool:
        """Whether bytes arriving now begin a request's head, not continue a body.

        Not just "no request queued or in progress": aiohttp pops a request before its
        handler's task first runs, and a read in between would otherwise count the body's
        next bytes as a new head, whose timer then answered the connection's next request
        with a 408."""
        if self._request_in_progress or self._messages:
            return False
        if self._last_body is not None and self._last_body.is_eof():
            self._last_body = None  # all of it came: hold no buffer past its request
        return self._last_body is None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_header_timer()
        if isinstance(exc, TimeoutError):  # ETIMEDOUT; for a stream see agent/http/openai_api.py
            log.info("closed a connection from %s whose client read and acknowledged nothing in time "
                     "(streams: server.write_timeout_s)", self._peer())
        super().connection_lost(exc)

    def _peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport is not None else None
        return str(peer[0]) if isinstance(peer, tuple) else "a client"

    def _header_timed_out(self, request_count: int) -> None:
        self._header_timer = None
        if not self._between_requests():
            return  # a request is being handled, or its body is still arriving: not a head
        if self._request_count == request_count and self.transport is not None:
            log.info("closed a connection whose request headers took more than %gs (server.header_timeout_s)",
                     self._header_timeout_s)
            self._answer_and_close(HEADER_TIMEOUT)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _answer_and_close(self, raw: bytes) -> None:
        if self.transport is not None:
            self.transport.write(raw)
        self.force_close()

    async def finish_response(self, request: web.BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        """Send the response; when it closes the connection before the request's body has
        all arrived, close now instead of reading the rest of the body (aiohttp's lingering)."""
        result = await super().finish_response(request, resp, start_time)
        if not resp.keep_alive and not request.content.is_eof() and self.transport is not None:
            if self.transport.can_write_eof():
                self.transport.write_eof()  # the answer, then FIN: the client reads it whole
            self.force_close()
        return result

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """aiohttp logs a traceback when discarding the rest of a body it cannot decode
        (after our handler already answered 4xx): that is the client's error, one line."""
        exc = kwargs.get("exc_info")
        if isinstance(exc, (RequestPayloadError, HttpProcessingError)):
            log.info("discarded the unreadable rest of a request body: %s", type(exc).__name__)
            return
        super().log_exception(*args, **kwargs)

    def handle_error(
        self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Errors raised outside the app's middlewares: the parser's, chiefly."""
        if isinstance(exc, HttpProcessingError):
            err = protocol_error(exc)
            log.info("bad HTTP request from %s: %s (%d)", request.remote, type(exc).__name__, err.status)
        else:
            err = ApiError(500, "Internal server error; see the agent's log", type="server_error", close=True)
            log.error("unhandled error on a request from %s", request.remote, exc_info=exc)
        if request.writer.output_size > 0:  # the response has begun; only closing is left
            raise ConnectionError("response already started")
        response = error_response(request.path, err)
        response.force_close()
        return response


class GuardedSite(web.TCPSite):
    """A TCP site whose connections are `GuardedRequestHandler`s."""

    def __init__(self, runner: web.BaseRunner, config: ServerConfig, backlog: int = 128,
                 tls: ServerTls | None = None) -> None:
        super().__init__(runner, config.host, config.port, backlog=backlog,
                         ssl_context=tls.http_context if tls is not None else None)
        self._config = config

    async def start(self) -> None:
        await web.BaseSite.start(self)
        loop = asyncio.get_running_loop()
        manager = self._runner.server
        assert manager is not None
        config = self._config

        def protocol() -> GuardedRequestHandler:
            return GuardedRequestHandler(manager, config=config, loop=loop, access_log=None)

        self._server = await loop.create_server(
            protocol, self._host, self._port, backlog=self._backlog, ssl=self._ssl_context,
            ssl_handshake_timeout=config.header_timeout_s if self._ssl_context is not None else None)
        self._bound_port = self._server.sockets[0].getsockname()[1] if self._server.sockets else self._port


def shutdown_grace_s(config: ServerConfig) -> float:
    """A slice of drain_timeout_s; shutdown keeps three (agent/app.py `drain`): two for
    stopped requests' handlers to write their last bytes, one for aiohttp's own wait."""
    return min(1.0, config.drain_timeout_s / 8)


async def start_server(app: web.Application, config: ServerConfig) -> web.AppRunner:
    """Set up `app` and listen on the configured host and port (OSError if it cannot;
    TlsFilesError, before anything starts, when TLS is on and its files cannot be used).

    Shutdown (`runner.cleanup()`) runs the app's on_shutdown drain first; aiohttp then
    waits a short grace for the handlers, which by then are writing their last bytes."""
    tls = server_tls(config)
    if tls is not None:
        app[SERVER_TLS] = tls  # the gRPC server and the SIGHUP reload use the same material
    raise_open_file_limit()
    return_large_blocks_to_the_system()
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           shutdown_timeout=shutdown_grace_s(config))
    await runner.setup()
    try:
        await GuardedSite(runner, config, tls=tls).start()
    except OSError:
        await runner.cleanup()
        raise
    return runner


def server_tls(config: ServerConfig) -> ServerTls | None:
    """The endpoint's TLS material from the config's files, None when TLS is off."""
    if config.tls_cert_file is None or config.tls_key_file is None:
        return None
    return ServerTls(TlsFiles(config.tls_cert_file, config.tls_key_file, config.tls_client_ca_file,
                              config.client_cert_mode))


def bind_reason(exc: OSError) -> str:
    """Why a bind failed, in the words of strerror ("address already in use"): asyncio wraps
    them in a sentence of its own that quotes the address again."""
    if exc.errno and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    return exc.strerror or str(exc)
