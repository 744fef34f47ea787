"""TLS and mTLS on the local endpoint, with certificates the test makes (tests/tls_certs.py).

Real clients, real handshakes: the unmodified `openai` client over https, stdlib
`ssl`/`http.client` for what a handshake refuses and for the certificate served,
`tritonclient.grpc` with ``ssl=True`` against an `edgefleet serve` process (its own
process: tritonclient's messages and the agent's cannot share one), and a SIGHUP to
that process to rotate the certificate. The HTTP cases run the agent in-process (the
server `edgefleet serve` runs, `start_server`); a client certificate's subject
(`peer_subject`) is seen through the request gate, which maps it to scopes by the keys
file's ``certs`` entries.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import httpx2
import numpy as np
import openai
import pytest
import tritonclient.grpc as grpcclient
from conftest import EMBED, demo_config, free_port
from cryptography import x509
from service_process import ServiceProcess
from tls_certs import DAY, NOW, Authority, Issued

from agent.app import create_app, wait_until_loaded
from agent.config import ConfigError, load_config
from agent.http.server import start_server
from agent.kserve.peer import grpc_peer_subject
from security.tls_server import ServerTls, TlsFiles

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Issued]:
    """A CA with a server certificate and client certificates: good, expired, and one from another CA."""
    directory = tmp_path_factory.mktemp("pki")
    ca, other = Authority(directory, "ca"), Authority(directory, "other-ca")
    return {"ca": ca.ca, "server": ca.server(), "client": ca.client("client", "svc-embedder"),
            "unmapped": ca.client("unmapped", "svc-unknown"), "cli": ca.client("cli", "edgefleet-cli"),
            "expired": ca.client("expired", "svc-old", not_before=NOW - 30 * DAY, not_after=NOW - DAY),
            "stranger": other.client("stranger", "svc-embedder")}


def tls_settings(pki: dict[str, Issued], client_cert: str | None = None) -> dict[str, str]:
    settings = {"tls_cert_file": str(pki["server"].cert), "tls_key_file": str(pki["server"].key)}
    if client_cert is not None:
        settings |= {"tls_client_ca_file": str(pki["ca"].cert), "tls_client_cert": client_cert}
    return settings


def client_context(pki: dict[str, Issued], cert: str | None = None) -> ssl.SSLContext:
    """What a client that trusts the test CA uses, with client certificate `cert` if given."""
    context = ssl.create_default_context(cafile=str(pki["ca"].cert))
    if cert is not None:
        context.load_cert_chain(pki[cert].cert, pki[cert].key)
    return context


def keys_file(directory: Path, **subjects: list[str]) -> str:
    """A keys file whose ``certs`` entries (the request gate's mapping) give each client
    certificate subject its scopes; by default svc-embedder may make embeddings, and nothing else."""
    path = directory / "api-keys.json"
    certs = [{"subject": subject.replace("_", "-"), "scopes": scopes}
             for subject, scopes in (subjects or {"svc_embedder": ["embeddings"]}).items()]
    path.write_text(json.dumps({"version": 1, "keys": [], "certs": certs}))
    path.chmod(0o600)
    return str(path)


@asynccontextmanager
async def tls_agent(state_dir: Path, **server: object) -> AsyncIterator[str]:
    """The agent serving the demo embedding model with `server` settings; yields its https URL."""
    config = demo_config(state_dir, (EMBED,), **server)
    app = create_app(config)
    runner = await start_server(app, config.server)
    await wait_until_loaded(app)
    try:
        yield f"https://127.0.0.1:{config.server.port}"
    finally:
        await runner.cleanup()


@pytest.fixture(scope="module")
async def tls_url(state_dir: Path, pki: dict[str, Issued]) -> AsyncIterator[str]:
    async with tls_agent(state_dir, **tls_settings(pki)) as url:
        yield url


@pytest.fixture(scope="module")
async def mtls_url(state_dir: Path, pki: dict[str, Issued], tmp_path_factory: pytest.TempPathFactory
                   ) -> AsyncIterator[str]:
    keys = keys_file(tmp_path_factory.mktemp("mtls-keys"))
    async with tls_agent(state_dir, api_keys_file=keys, **tls_settings(pki, "required")) as url:
        yield url


def openai_client(url: str, context: ssl.SSLContext) -> tuple[openai.AsyncOpenAI, httpx2.AsyncClient]:
    """The unmodified openai client over https with `context`."""
    http_client = httpx2.AsyncClient(verify=context)
    return openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", max_retries=0,
                              http_client=http_client), http_client


#: A call whose identity is the client certificate sends no bearer key (a bearer key, when
#: sent, is what the gate checks): the openai client's documented way to omit a header.
NO_KEY = {"extra_headers": {"Authorization": openai.Omit()}}


async def exchange(url: str, context: ssl.SSLContext | None, path: str = "/healthz") -> bytes:
    """One HTTP/1.1 request on a fresh connection (TLS with `context`, plain without); the
    bytes that came back before the server closed. Raises what the handshake raised."""
    host, port = url.split("//")[1].split(":")
    reader, writer = await asyncio.open_connection(host, int(port), ssl=context)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


async def refused(url: str, context: ssl.SSLContext) -> str:
    """How the server refused a TLS connection that got no HTTP answer: the TLS alert the client
    read, or "closed" when the server closed the connection without one (what Python 3.11's
    asyncio does on a failed handshake: it drops the alert, CPython gh-98078)."""
    try:
        reply = await exchange(url, context, "/v1/models")
    except (ssl.SSLError, ConnectionError) as exc:
        return str(exc)
    assert reply == b"", reply[:200]
    return "closed"


# ---- HTTP: TLS ---------------------------------------------------------------------------


async def test_openai_client_lists_models_and_embeds_over_https(tls_url, pki):
    client, http_client = openai_client(tls_url, client_context(pki))
    async with http_client:
        assert {m.id for m in (await client.models.list()).data} == {EMBED}
        reply = await client.embeddings.create(model=EMBED, input=["over TLS"])
    assert len(reply.data[0].embedding) == 384


async def test_a_plain_http_request_to_the_tls_port_gets_no_http_answer(tls_url):
    plain = tls_url.replace("https://", "http://")
    reply = await exchange(plain, None)
    assert not reply.startswith(b"HTTP/"), reply[:200]  # the handshake failed: no API was reached


async def test_tls_below_1_2_is_refused(tls_url, pki):
    context = client_context(pki)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # TLS 1.1 is: that is the point
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_1
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await exchange(tls_url, context)


# ---- HTTP: mTLS --------------------------------------------------------------------------


@pytest.mark.parametrize(("cert", "alert"), [
    (None, "CERTIFICATE_REQUIRED"),
    ("stranger", "UNKNOWN_CA"),
    ("expired", "CERTIFICATE_EXPIRED"),
])
async def test_mtls_refuses_a_missing_wrong_ca_or_expired_client_certificate(mtls_url, pki, cert, alert):
    refusal = await refused(mtls_url, client_context(pki, cert))
    assert refusal == "closed" or alert in refusal, refusal


async def test_mtls_good_client_certificate_is_the_identity_its_subject_maps_to(mtls_url, pki):
    client, http_client = openai_client(mtls_url, client_context(pki, "client"))
    async with http_client:
        reply = await client.embeddings.create(model=EMBED, input=["who am I"], **NO_KEY)  # svc-embedder: embeddings
        assert len(reply.data[0].embedding) == 384
        with pytest.raises(openai.PermissionDeniedError):  # and nothing more
            await client.chat.completions.create(model=EMBED, messages=[{"role": "user", "content": "hi"}],
                                                 **NO_KEY)
    unmapped, http_client = openai_client(mtls_url, client_context(pki, "unmapped"))
    async with http_client:
        with pytest.raises(openai.AuthenticationError, match="certificate's subject is not allowed"):
            await unmapped.embeddings.create(model=EMBED, input=["who am I"], **NO_KEY)


async def test_optional_client_certificate_is_verified_when_sent(state_dir, pki, tmp_path):
    async with tls_agent(state_dir, api_keys_file=keys_file(tmp_path), **tls_settings(pki, "optional")) as url:
        anonymous, http_client = openai_client(url, client_context(pki))
        async with http_client:
            with pytest.raises(openai.AuthenticationError, match="Missing API key"):
                await anonymous.embeddings.create(model=EMBED, input=["x"], **NO_KEY)
        known, http_client = openai_client(url, client_context(pki, "client"))
        async with http_client:
            assert (await known.embeddings.create(model=EMBED, input=["x"], **NO_KEY)).data
        refusal = await refused(url, client_context(pki, "stranger"))
        assert refusal == "closed" or "UNKNOWN_CA" in refusal, refusal


# ---- gRPC: the peer's subject (a bare grpc server with the agent's credentials) -----------


async def test_grpc_peer_subject_is_the_verified_client_certificates_cn(pki):
    files = TlsFiles(str(pki["server"].cert), str(pki["server"].key), str(pki["ca"].cert), "required")
    server = grpc.aio.server()

    async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return json.dumps(grpc_peer_subject(context)).encode()

    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "test.Peer", {"Who": grpc.unary_unary_rpc_method_handler(whoami)}),))
    port = server.add_secure_port("127.0.0.1:0", ServerTls(files).grpc_credentials())
    await server.start()

    def call(cert: str | None) -> object:
        credentials = grpc.ssl_channel_credentials(
            pki["ca"].cert.read_bytes(), pki[cert].key.read_bytes() if cert else None,
            pki[cert].cert.read_bytes() if cert else None)
        with grpc.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            return json.loads(channel.unary_unary("/test.Peer/Who")(b"", timeout=10))

    try:
        assert await asyncio.to_thread(call, "client") == "svc-embedder"
        for refused in (None, "stranger", "expired"):
            with pytest.raises(grpc.RpcError) as info:
                await asyncio.to_thread(call, refused)
            assert info.value.code() is grpc.StatusCode.UNAVAILABLE
    finally:
        await server.stop(0)


# ---- configuration and start-up ------------------------------------------------------------


@pytest.mark.parametrize(("keys", "message"), [
    ({"TLS_CERT_FILE": "/x.crt"}, "tls_cert_file and tls_key_file go together"),
    ({"TLS_CLIENT_CA_FILE": "/ca.crt"}, "tls_client_ca_file needs tls_cert_file"),
    ({"TLS_CERT_FILE": "/x.crt", "TLS_KEY_FILE": "/x.key", "TLS_CLIENT_CERT": "required"},
     "tls_client_cert needs tls_client_ca_file"),
    ({"TLS_CERT_FILE": "/x.crt", "TLS_KEY_FILE": "/x.key", "TLS_CLIENT_CA_FILE": "/c", "TLS_CLIENT_CERT": "maybe"},
     "server.tls_client_cert: expected one of 'optional', 'required'"),
])
def test_tls_keys_that_do_not_fit_together_are_a_config_error(keys, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {f"EDGEFLEET_SERVER__{k}": v for k, v in keys.items()})


def serve_once(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", "serve", "--config", str(config)], capture_output=True,
                          check=False, text=True, timeout=120, env={**os.environ, "EDGEFLEET_CONFIG": ""}, cwd=REPO)


def write_config(path: Path, state_dir: Path, port: int, server: dict[str, str], grpc_port: int | None = None,
                 models: tuple[str, ...] = ()) -> Path:
    lines = [f'state_dir = "{state_dir}"', "[server]", 'host = "127.0.0.1"', f"port = {port}"]
    lines += [f'{key} = "{value}"' for key, value in server.items()]
    if grpc_port is not None:
        lines.append(f"grpc_port = {grpc_port}")
    for name in models:
        lines += ["[[models]]", f'name = "{name}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_agent_refuses_to_start_with_a_missing_certificate_or_a_key_that_does_not_match(tmp_path, pki):
    missing = dict(tls_settings(pki), tls_cert_file=str(tmp_path / "nowhere.crt"))
    result = serve_once(write_config(tmp_path / "missing.toml", tmp_path / "state", free_port(), missing))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [
        f"edgefleet: cannot serve TLS: server.tls_cert_file {tmp_path / 'nowhere.crt'}: no such file"], result.stderr

    mismatched = dict(tls_settings(pki), tls_key_file=str(pki["client"].key))
    result = serve_once(write_config(tmp_path / "mismatch.toml", tmp_path / "state", free_port(), mismatched))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1:] == [
        f"edgefleet: cannot serve TLS: server.tls_key_file {pki['client'].key} does not match the certificate "
        f"in server.tls_cert_file {pki['server'].cert}"], result.stderr


# ---- a real `edgefleet serve`: gRPC with tritonclient, the CLI, SIGHUP reloads ----------------


def served_serial(port: int, ca: Path, alpn: list[str] | None = None) -> int:
    """The serial of the certificate a new connection to `port` is served (verified against `ca`)."""
    context = ssl.create_default_context(cafile=str(ca))
    if alpn:
        context.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, check=False, text=True,
                          timeout=120,
                          env={**os.environ, "EDGEFLEET_CONFIG": ""}, cwd=REPO)


@pytest.fixture(scope="module")
def mtls_process(state_dir: Path, pki: dict[str, Issued], tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[tuple[ServiceProcess, Path, int]]:
    """`edgefleet serve` with mTLS required on HTTP and gRPC, serving the demo embedding model;
    the CLI's client certificate is configured, as on a device."""
    tmp = tmp_path_factory.mktemp("mtls-agent")
    keys = keys_file(tmp, svc_embedder=["embeddings", "tensors"], edgefleet_cli=["admin"])
    settings = tls_settings(pki, "required") | {"tls_cli_cert_file": str(pki["cli"].cert),
                                                "tls_cli_key_file": str(pki["cli"].key), "api_keys_file": keys}
    grpc_port = free_port()
    config = write_config(tmp / "agent.toml", state_dir, free_port(), settings, grpc_port, (EMBED,))
    agent = ServiceProcess(config, tmp)
    try:
        asyncio.run(agent.notify.wait_for("READY", "1", timeout=120))
        yield agent, config, grpc_port
    finally:
        agent.stop()


def triton(grpc_port: int, pki: dict[str, Issued], cert: str | None) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        f"127.0.0.1:{grpc_port}", ssl=True, root_certificates=str(pki["ca"].cert),
        private_key=str(pki[cert].key) if cert else None, certificate_chain=str(pki[cert].cert) if cert else None)


def test_tritonclient_grpc_over_mtls_infers_and_is_refused_without_a_client_certificate(mtls_process, pki):
    _, _, grpc_port = mtls_process
    with triton(grpc_port, pki, "client") as client:
        assert client.is_server_live()
        ids = np.array([[101, 7592, 2088, 102]], dtype=np.int64)
        inputs = []
        for name, array in (("input_ids", ids), ("attention_mask", np.ones_like(ids)),
                            ("token_type_ids", np.zeros_like(ids))):
            tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        result = client.infer(EMBED, inputs)
        assert result.as_numpy("last_hidden_state").shape == (1, 4, 384)
    for refused in (None, "stranger", "expired"):
        with triton(grpc_port, pki, refused) as client, pytest.raises(grpcclient.InferenceServerException) as info:
            client.is_server_live(client_timeout=10)
        assert str(info.value.status()) == "StatusCode.UNAVAILABLE", (refused, info.value)


def test_cli_reaches_the_agent_over_mtls_with_its_configured_certificate(mtls_process):
    _, config, _ = mtls_process
    result = run_cli("models", "rollback", EMBED, "--config", str(config))
    # the agent answered (over https, our client certificate accepted): there is nothing to roll back to
    assert result.returncode == 1
    assert result.stderr.startswith(f"edgefleet: cannot roll {EMBED} back: "), result.stderr
    assert "no agent was running" not in result.stdout + result.stderr


def test_doctor_reads_the_certificate_the_running_agent_serves(mtls_process, pki):
    _, config, _ = mtls_process
    result = run_cli("doctor", "--config", str(config))
    serial = f"{pki['server'].serial:x}"
    assert f"[ok  ] tls: {pki['server'].cert}: serial {serial}" in result.stdout, result.stdout
    assert "client certificates: required" in result.stdout
    assert "tls: the running agent (pid" in result.stdout and "serves this certificate" in result.stdout


async def wait_for_log(agent: ServiceProcess, text: str, count: int = 1, timeout: float = 30) -> str:
    deadline = time.monotonic() + timeout
    while agent.log().count(text) < count:
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{agent.log()[-3000:]}"
        await asyncio.sleep(0.05)
    return agent.log()


async def test_sighup_rotates_the_certificate_without_dropping_a_connection_and_refuses_a_bad_one(
        tmp_path, pki, state_dir):
    ca = Authority(tmp_path / "pki")  # its own CA and files: this test rewrites them
    first = ca.server("live")
    cert, key = first.cert, first.key
    port, grpc_port = free_port(), free_port()
    config = write_config(tmp_path / "agent.toml", tmp_path / "state", port,
                          {"tls_cert_file": str(cert), "tls_key_file": str(key)}, grpc_port)
    agent = ServiceProcess(config, tmp_path)
    try:
        await agent.notify.wait_for("READY", "1", timeout=120)
        assert served_serial(port, ca.ca.cert) == first.serial
        kept = http.client.HTTPSConnection("127.0.0.1", port, context=ssl.create_default_context(
            cafile=str(ca.ca.cert)), timeout=10)
        kept.request("GET", "/healthz")
        assert kept.getresponse().read() and kept.sock is not None
        kept_socket = kept.sock
        kept_grpc = triton(grpc_port, {"ca": ca.ca}, None)
        assert kept_grpc.is_server_live()

        second = ca.server("next")  # rotate: new files replace the old ones, then SIGHUP
        os.replace(second.key, key)
        os.replace(second.cert, cert)
        agent.signal(signal.SIGHUP)
        await wait_for_log(agent, "TLS certificate reloaded for new connections")
        await agent.notify.wait_for("READY", "1", count=2)

        kept.request("GET", "/v1/models")  # the connection opened before the reload goes on
        response = kept.getresponse()
        assert response.status == 200 and json.loads(response.read())["object"] == "list"
        assert kept.sock is kept_socket
        assert x509.load_der_x509_certificate(kept_socket.getpeercert(True)).serial_number == first.serial
        assert kept_grpc.is_server_live()
        assert served_serial(port, ca.ca.cert) == second.serial  # a new connection gets the new certificate
        assert served_serial(grpc_port, ca.ca.cert, alpn=["h2"]) == second.serial
        with triton(grpc_port, {"ca": ca.ca}, None) as fresh:
            assert fresh.is_server_live()

        # a key that does not match the new certificate: refused, the running one stays
        third = ca.server("bad")
        os.replace(third.cert, cert)
        agent.signal(signal.SIGHUP)
        log = await wait_for_log(agent, "TLS reload refused")
        assert f"server.tls_key_file {key} does not match the certificate in server.tls_cert_file {cert}" in log
        assert served_serial(port, ca.ca.cert) == second.serial
        kept.request("GET", "/healthz")
        assert kept.getresponse().status == 200

        doctor = await asyncio.to_thread(run_cli, "doctor", "--config", str(config))
        assert doctor.returncode == 1
        assert (f"[FAIL] tls: server.tls_key_file {key} does not match the certificate in "
                f"server.tls_cert_file {cert}") in doctor.stdout, doctor.stdout
        assert (f"tls: the running agent (pid {agent.proc.pid}) keeps serving the certificate it loaded before: "
                f"serial {second.serial:x}") in doctor.stdout, doctor.stdout
        kept.close()
        kept_grpc.close()
    finally:
        agent.stop()
