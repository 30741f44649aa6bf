"""The outbound side over real loopback sockets: outbound proxies (HTTP CONNECT), CA bundles,
mutual TLS and the insecure switch; and how the network keys are checked at load.

The token endpoint and the upstream get names that only the test's CONNECT proxy resolves
(it sends every tunnel to 127.0.0.1), so an answer proves the traffic went through it.
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from pytest_aiohttp.plugin import AiohttpServer

from proxy.cli import check
from proxy.config import NetworkSettings, Settings, load_settings
from proxy.errors import ConfigError
from proxy.network import Outbound
from proxy.server import ProxyServer
from proxy.standins import StandinSkillEngine, StandinTokenEndpoint
from tests.conftest import StartProxy
from tests.support import (
    SECRET,
    proxy_command,
    sample,
    settings_document,
    subprocess_env,
    write_config,
)

AUTH_HOST = "auth.example.test"
UPSTREAM_HOST = "skill-engine.example.test"
PROXY_VARIABLES = ("HTTPS_PROXY", "HTTP_PROXY", "NO_PROXY", "ALL_PROXY", "REQUEST_METHOD")
PROXY_PASSWORD = "pr0xy-pa55word"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No proxy variable of the machine running the tests reaches them."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    """The company CA: it signs the stand-ins' certificates and the client certificate."""
    return trustme.CA()


@pytest.fixture(scope="module")
def server_certificate(ca: trustme.CA) -> trustme.LeafCert:
    return ca.issue_cert(AUTH_HOST, UPSTREAM_HOST, "127.0.0.1", "localhost")


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "company-ca.pem"
    ca.cert_pem.write_to_path(path)
    return path


@pytest.fixture
def client_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    """A client certificate and its key, issued by the company CA."""
    client = ca.issue_cert("proxy.client.example.test")
    cert, key = tmp_path / "client.pem", tmp_path / "client-key.pem"
    client.cert_chain_pems[0].write_to_path(cert)
    client.private_key_pem.write_to_path(key)
    return cert, key


def server_tls(
    certificate: trustme.LeafCert, *, client_ca: trustme.CA | None = None
) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    certificate.configure_cert(context)
    if client_ca is not None:
        client_ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass
class Services:
    tokens: StandinTokenEndpoint
    skill_engine: StandinSkillEngine
    token_port: int
    upstream_port: int

    def settings(
        self,
        network: dict[str, Any] | None = None,
        *,
        auth_host: str = "127.0.0.1",
        upstream_host: str = "127.0.0.1",
        auth_scheme: str = "https",
        upstream_scheme: str = "https",
        **auth: Any,
    ) -> Settings:
        token_url = f"{auth_scheme}://{auth_host}:{self.token_port}/oauth/token"
        upstream_url = f"{upstream_scheme}://{upstream_host}:{self.upstream_port}"
        document = settings_document(token_url, upstream_url, **auth)
        if network is not None:
            document["network"] = network
        return Settings.model_validate(document)

    def named(self, network: dict[str, Any], **auth: Any) -> Settings:
        """Settings whose token endpoint and upstream only the CONNECT proxy can find."""
        return self.settings(network, auth_host=AUTH_HOST, upstream_host=UPSTREAM_HOST, **auth)


StartServices = Callable[..., Awaitable[Services]]


@pytest.fixture
def start_services(aiohttp_server: AiohttpServer) -> StartServices:
    async def start(
        token_tls: ssl.SSLContext | None, upstream_tls: ssl.SSLContext | None
    ) -> Services:
        tokens = StandinTokenEndpoint()
        skill_engine = StandinSkillEngine(tokens)
        token_server = await aiohttp_server(tokens.app(), ssl=token_tls)
        upstream_server = await aiohttp_server(skill_engine.app(), ssl=upstream_tls)
        assert token_server.port is not None
        assert upstream_server.port is not None
        return Services(tokens, skill_engine, token_server.port, upstream_server.port)

    return start


@pytest.fixture
async def tls_services(
    start_services: StartServices, server_certificate: trustme.LeafCert
) -> Services:
    """Both stand-ins on TLS, with certificates of the company CA."""
    tls = server_tls(server_certificate)
    return await start_services(tls, tls)


@dataclass
class ConnectProxy:
    """A forward proxy that only tunnels (RFC 9110 9.3.6), every host to 127.0.0.1.

    It notes each CONNECT target and Proxy-Authorization; with `authorization` set, a
    CONNECT without exactly that value gets 407.
    """

    authorization: str | None = None
    targets: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    url: str = ""
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._tunnel, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        await self._server.wait_closed()

    async def _tunnel(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
            request_line, *lines = head.split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            headers = {
                name.lower(): value
                for name, _, value in (line.partition(": ") for line in lines if line)
            }
            self.targets.append(target)
            self.authorizations.append(headers.get("proxy-authorization"))
            if method != "CONNECT":
                writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            if self.authorization and headers.get("proxy-authorization") != self.authorization:
                writer.write(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\n\r\n'
                )
                return
            port = int(target.rpartition(":")[2])
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", port)
            self._writers.add(upstream_writer)
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @property
    def hosts(self) -> set[str]:
        return {target.rpartition(":")[0] for target in self.targets}


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


StartConnectProxy = Callable[..., Awaitable[ConnectProxy]]


@pytest.fixture
async def start_connect_proxy() -> AsyncIterator[StartConnectProxy]:
    proxies: list[ConnectProxy] = []

    async def start(authorization: str | None = None) -> ConnectProxy:
        proxy = ConnectProxy(authorization)
        await proxy.start()
        proxies.append(proxy)
        return proxy

    yield start
    for proxy in proxies:
        await proxy.stop()


@pytest.fixture
async def connect_proxy(start_connect_proxy: StartConnectProxy) -> ConnectProxy:
    return await start_connect_proxy()


@pytest.fixture
async def dead_proxy_url() -> str:
    """The address of a proxy that is not there: a port nothing listens on."""
    server = await asyncio.start_server(lambda _r, _w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return f"http://127.0.0.1:{port}"


async def get(client: aiohttp.ClientSession, server: ProxyServer, path: str) -> Any:
    async with client.get(f"{server.proxy_url}{path}") as response:
        return (
            response.status,
            response.headers.get("X-Skill-Engine-Proxy-Error"),
            (await response.text()),
        )


async def metrics_of(client: aiohttp.ClientSession, server: ProxyServer) -> str:
    async with client.get(f"{server.admin_url}/metrics") as response:
        return await response.text()


async def test_a_company_ca_in_ca_file_is_trusted_for_both_token_endpoint_and_upstream(
    tls_services: Services, ca_file: Path, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    server = await start_proxy(tls_services.settings({"ca_file": str(ca_file)}))

    status, error, body = await get(client, server, "/version")

    assert (status, error) == (200, None), body
    assert len(tls_services.tokens.requests) == 1


async def test_without_ca_file_a_tls_upstream_of_the_company_ca_is_refused(
    start_services: StartServices,
    server_certificate: trustme.LeafCert,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
) -> None:
    services = await start_services(None, server_tls(server_certificate))
    server = await start_proxy(services.settings(auth_scheme="http"))

    status, error, body = await get(client, server, "/version")

    assert (status, error) == (502, "upstream_unreachable")
    assert "(tls): its TLS certificate was refused" in body
    assert "network.ca_file" in body
    assert not services.skill_engine.received
    errors = await metrics_of(client, server)
    assert sample(
        errors, "skill_engine_proxy_upstream_errors_total", tenant="acme_test", reason="tls"
    )


async def test_mutual_tls_presents_the_client_certificate_to_the_upstream(
    start_services: StartServices,
    ca: trustme.CA,
    server_certificate: trustme.LeafCert,
    ca_file: Path,
    client_files: tuple[Path, Path],
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
) -> None:
    services = await start_services(None, server_tls(server_certificate, client_ca=ca))
    cert, key = client_files
    network = {"ca_file": str(ca_file), "client_cert": str(cert), "client_key": str(key)}
    server = await start_proxy(services.settings(network, auth_scheme="http"))

    status, error, body = await get(client, server, "/version")

    assert (status, error) == (200, None), body


async def test_an_upstream_that_wants_a_client_certificate_refuses_the_proxy_without_one(
    start_services: StartServices,
    ca: trustme.CA,
    server_certificate: trustme.LeafCert,
    ca_file: Path,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
) -> None:
    services = await start_services(None, server_tls(server_certificate, client_ca=ca))
    server = await start_proxy(services.settings({"ca_file": str(ca_file)}, auth_scheme="http"))

    status, error, _ = await get(client, server, "/version")

    assert (status, error) == (502, "upstream_unreachable")
    assert not services.skill_engine.received


async def test_insecure_skip_verify_accepts_any_upstream_certificate_and_warns(
    start_services: StartServices,
    server_certificate: trustme.LeafCert,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    services = await start_services(None, server_tls(server_certificate))
    settings = services.settings({"insecure_skip_verify": True}, auth_scheme="http")

    with caplog.at_level(logging.INFO, logger="skill_engine_proxy"):
        server = await start_proxy(settings)
        status, error, body = await get(client, server, "/version")

    assert (status, error) == (200, None), body
    [warning] = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert "network.insecure_skip_verify is on" in warning.getMessage()
    assert "token endpoint is still verified" in warning.getMessage()


async def test_insecure_skip_verify_never_sends_the_secret_to_an_unverified_token_endpoint(
    tls_services: Services, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    # Neither certificate can be verified without the company CA; only the upstream's
    # check is switched off.
    server = await start_proxy(tls_services.settings({"insecure_skip_verify": True}))

    status, error, body = await get(client, server, "/version")

    assert (status, error) == (503, "token_unavailable")
    assert "certificate" in body
    assert not tls_services.tokens.requests
    assert not tls_services.skill_engine.received


async def test_network_proxy_carries_the_token_request_and_the_upstream_requests(
    tls_services: Services,
    ca_file: Path,
    connect_proxy: ConnectProxy,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = tls_services.named({"ca_file": str(ca_file), "proxy": connect_proxy.url})
    with caplog.at_level(logging.INFO, logger="skill_engine_proxy"):
        server = await start_proxy(settings)
        for _ in range(3):
            status, error, body = await get(client, server, "/version")
            assert (status, error) == (200, None), body

    assert connect_proxy.hosts == {AUTH_HOST, UPSTREAM_HOST}
    assert f"{UPSTREAM_HOST}:{tls_services.upstream_port}" in connect_proxy.targets
    assert len(tls_services.skill_engine.received) == 3
    assert (
        f"Connections to the upstream https://{UPSTREAM_HOST}:{tls_services.upstream_port} go "
        f"through the proxy {connect_proxy.url} (network.proxy)." in caplog.text
    )
    assert f"the token endpoint https://{AUTH_HOST}" in caplog.text


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy"])
async def test_https_proxy_in_the_environment_carries_the_traffic(
    tls_services: Services,
    ca_file: Path,
    connect_proxy: ConnectProxy,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    variable: str,
) -> None:
    monkeypatch.setenv(variable, connect_proxy.url)
    with caplog.at_level(logging.INFO, logger="skill_engine_proxy"):
        server = await start_proxy(tls_services.named({"ca_file": str(ca_file)}))
        status, error, body = await get(client, server, "/version")

    assert (status, error) == (200, None), body
    assert connect_proxy.hosts == {AUTH_HOST, UPSTREAM_HOST}
    assert f"through the proxy {connect_proxy.url} ({variable})" in caplog.text


async def test_no_proxy_sends_its_hosts_around_the_proxy(
    tls_services: Services,
    ca_file: Path,
    connect_proxy: ConnectProxy,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", connect_proxy.url)
    monkeypatch.setenv("NO_PROXY", f"localhost,.example.com,{UPSTREAM_HOST}")
    settings = tls_services.named({"ca_file": str(ca_file)}, upstream={"connect_timeout": 5})
    server = await start_proxy(settings)

    status, _, _ = await get(client, server, "/version")

    # Around the proxy, the name resolves nowhere: the upstream cannot be reached.
    assert status in (502, 504)
    assert connect_proxy.hosts == {AUTH_HOST}


@pytest.mark.parametrize(
    ("environment", "trust_env"),
    [
        # network.proxy wins over the environment's proxy...
        ({"HTTPS_PROXY": "dead"}, True),
        # ...and without trust_env, NO_PROXY would not send both around it, to nowhere.
        ({"HTTPS_PROXY": "dead", "NO_PROXY": "example.test"}, False),
    ],
)
async def test_network_proxy_carries_the_traffic_whatever_the_environment_says(
    tls_services: Services,
    ca_file: Path,
    connect_proxy: ConnectProxy,
    dead_proxy_url: str,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    environment: dict[str, str],
    trust_env: bool,
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, dead_proxy_url if value == "dead" else value)
    network = {"ca_file": str(ca_file), "proxy": connect_proxy.url, "trust_env": trust_env}
    server = await start_proxy(tls_services.named(network))

    status, error, body = await get(client, server, "/version")

    assert (status, error) == (200, None), body
    assert connect_proxy.hosts == {AUTH_HOST, UPSTREAM_HOST}


async def test_loopback_destinations_never_go_through_a_proxy(
    tls_services: Services,
    ca_file: Path,
    dead_proxy_url: str,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", dead_proxy_url)
    network = {"ca_file": str(ca_file), "proxy": dead_proxy_url}
    with caplog.at_level(logging.INFO, logger="skill_engine_proxy"):
        server = await start_proxy(tls_services.settings(network, upstream_host="localhost"))
        status, error, body = await get(client, server, "/version")

    assert (status, error) == (200, None), body
    assert "go directly (loopback)" in caplog.text


@pytest.mark.parametrize("accepted", [True, False])
async def test_proxy_credentials_go_to_the_proxy_alone_and_never_into_a_log(
    tls_services: Services,
    ca_file: Path,
    start_connect_proxy: StartConnectProxy,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    accepted: bool,
) -> None:
    encoded = base64.b64encode(f"corp-user:{PROXY_PASSWORD}".encode()).decode()
    wanted = f"Basic {encoded}" if accepted else "Basic bm90LXRoZXNlLW9uZXM="
    connect_proxy = await start_connect_proxy(authorization=wanted)
    proxy_url = connect_proxy.url.replace("http://", f"http://corp-user:{PROXY_PASSWORD}@")

    with caplog.at_level(logging.DEBUG):
        network = {"ca_file": str(ca_file), "proxy": proxy_url}
        server = await start_proxy(tls_services.named(network))
        status, error, body = await get(client, server, "/echo/headers")
        await server.stop()

    assert set(connect_proxy.authorizations) == {f"Basic {encoded}"}
    if accepted:
        assert (status, error) == (200, None), body
        assert connect_proxy.hosts == {AUTH_HOST, UPSTREAM_HOST}
        assert not any(
            received.header_values("Proxy-Authorization")
            for received in tls_services.skill_engine.received
        )
    else:
        assert (status, error) == (503, "token_unavailable")
        assert "the outbound proxy refused the tunnel with HTTP 407" in body
    for text in (caplog.text, body):
        assert PROXY_PASSWORD not in text
        assert encoded not in text
    assert f"through the proxy {connect_proxy.url} (network.proxy)" in caplog.text


async def test_a_proxy_that_is_not_there_is_named_and_counted(
    start_services: StartServices,
    server_certificate: trustme.LeafCert,
    ca_file: Path,
    dead_proxy_url: str,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
) -> None:
    services = await start_services(None, server_tls(server_certificate))
    network = {"ca_file": str(ca_file), "proxy": dead_proxy_url}
    server = await start_proxy(
        services.settings(network, auth_scheme="http", upstream_host=UPSTREAM_HOST)
    )

    status, error, body = await get(client, server, "/version")

    assert (status, error) == (502, "upstream_unreachable")
    assert "could not be reached (proxy): cannot connect to the outbound proxy" in body
    errors = await metrics_of(client, server)
    assert sample(
        errors, "skill_engine_proxy_upstream_errors_total", tenant="acme_test", reason="proxy"
    )


async def test_check_goes_through_the_proxy_too(
    tls_services: Services, ca_file: Path, connect_proxy: ConnectProxy
) -> None:
    out = io.StringIO()
    settings = tls_services.named({"ca_file": str(ca_file), "proxy": connect_proxy.url})

    assert await check(settings, out) == 0, out.getvalue()
    assert connect_proxy.hosts == {AUTH_HOST, UPSTREAM_HOST}
    assert "GET https://skill-engine.example.test" in out.getvalue()


def choice(url: str, **network: Any) -> str:
    return str(Outbound(NetworkSettings.model_validate(network)).proxy_for(url))


@pytest.mark.parametrize(
    ("no_proxy", "url", "bypassed"),
    [
        ("example.com", "https://api.example.com", True),
        (".example.com", "https://api.example.com", True),
        ("example.com", "https://example.com:8443/oauth/token", True),
        ("example.com", "https://notexample.com", False),
        ("*", "https://anything.example", True),
        ("other.example, api.example.com:443", "https://api.example.com", True),
        ("", "https://api.example.com", False),
    ],
)
def test_no_proxy_matches_names_and_suffixes(
    monkeypatch: pytest.MonkeyPatch, no_proxy: str, url: str, bypassed: bool
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", no_proxy)
    expected = "directly (NO_PROXY)" if bypassed else "through the proxy http://proxy.corp:3128"
    assert choice(url).startswith(expected)


@pytest.mark.parametrize(
    "url", ["https://127.0.0.1:8443", "https://127.4.5.6", "https://[::1]:443", "https://LOCALHOST"]
)
def test_loopback_is_always_direct(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    assert choice(url, proxy="http://other.corp:3128") == "directly (loopback)"


def test_the_environment_is_read_only_with_trust_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.corp:3128")
    monkeypatch.setenv("NO_PROXY", "api.example.com")
    assert choice("https://api.example.com", trust_env=False) == "directly"
    assert choice("https://api.example.com", trust_env=False, proxy="http://p:1").startswith(
        "through the proxy http://p:1"
    )
    assert choice("https://api.example.com", proxy="http://p:1") == "directly (NO_PROXY)"


def test_an_http_proxy_variable_is_for_http_destinations(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.corp:3128")
    assert choice("https://api.example.com") == "directly"
    assert (
        choice("http://api.example.com") == "through the proxy http://proxy.corp:3128 (HTTP_PROXY)"
    )


def test_a_bare_host_and_port_in_the_environment_is_an_http_proxy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("https_proxy", "proxy.corp:3128")
    monkeypatch.setenv("HTTPS_PROXY", "http://ignored.corp:1")  # lower case wins, as in curl
    assert choice("https://api.example.com") == (
        "through the proxy http://proxy.corp:3128 (https_proxy)"
    )


@pytest.mark.parametrize(
    ("environment", "url", "expected"),
    [
        ({"https_proxy": "http://p:1"}, "https://api.example.com", "(https_proxy)"),
        ({"HTTPS_PROXY": "http://p:1"}, "https://api.example.com", "(HTTPS_PROXY)"),
        (
            {"https_proxy": "http://p:1", "HTTPS_PROXY": "http://q:1"},
            "https://a.example",
            "http://p:1 (https_proxy)",
        ),
        ({"http_proxy": "http://p:1"}, "http://api.example.com", "(http_proxy)"),
        (
            {"HTTPS_PROXY": "http://p:1", "no_proxy": "example.com"},
            "https://a.example.com",
            "(no_proxy)",
        ),
        (
            {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "example.com"},
            "https://a.example.com",
            "(NO_PROXY)",
        ),
    ],
)
def test_the_log_names_the_variable_as_it_is_spelled(
    monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], url: str, expected: str
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert choice(url).endswith(expected)


def test_proxy_credentials_become_a_header_and_leave_the_url() -> None:
    outbound = Outbound(NetworkSettings(proxy="http://us%40er:p%3Ass@proxy.corp:3128"))
    proxy = outbound.proxy_for("https://api.example.com")

    assert str(proxy.url) == "http://proxy.corp:3128"
    expected = "Basic " + base64.b64encode(b"us@er:p:ss").decode()
    assert proxy.headers == {"Proxy-Authorization": expected}
    assert "p%3Ass" not in repr(proxy)
    assert expected not in repr(proxy)
    assert "p%3Ass" not in repr(outbound.settings)


@pytest.mark.parametrize("variable", ["HTTPS_PROXY", "https_proxy"])
def test_an_unusable_proxy_variable_is_a_config_error_naming_it(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, f"socks5://corp-user:{PROXY_PASSWORD}@proxy.corp:1080")
    document = settings_document(f"https://{AUTH_HOST}/oauth/token", f"https://{UPSTREAM_HOST}")
    with pytest.raises(ConfigError) as caught:
        Outbound.for_settings(Settings.model_validate(document))

    message = str(caught.value)
    assert message.startswith(f"the environment: {variable}: must be an http:// or https://")
    assert "network.trust_env: false" in message
    assert PROXY_PASSWORD not in message


async def test_an_unusable_proxy_variable_stops_run_and_check_with_exit_2(tmp_path: Path) -> None:
    document = settings_document(f"https://{AUTH_HOST}/oauth/token", f"https://{UPSTREAM_HOST}")
    config = write_config(tmp_path / "config.yaml", document)
    environment = {**subprocess_env(), "HTTPS_PROXY": f"socks5://u:{PROXY_PASSWORD}@p:1080"}
    for command in (["run"], ["run", "--workers", "2"], ["check"]):
        process = await asyncio.create_subprocess_exec(
            *proxy_command(*command, "--config", str(config)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=environment,
        )
        _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
        lines = stderr.decode().strip().splitlines()
        assert process.returncode == 2, lines
        [line] = lines
        assert "config error: the environment: HTTPS_PROXY: " in line
        assert PROXY_PASSWORD not in stderr.decode()
        assert SECRET not in stderr.decode()


@pytest.fixture
def load_network(tmp_path: Path) -> Callable[[dict[str, Any]], str]:
    """Load a config with `network` set; return the config error's message."""

    def load(network: dict[str, Any]) -> str:
        document = settings_document("https://auth.example/oauth/token", "https://se.example")
        document["network"] = network
        config = write_config(tmp_path / "config.yaml", document)
        with pytest.raises(ConfigError) as caught:
            load_settings(config, {})
        message = str(caught.value)
        assert message.startswith(f"{config}: ")
        return message.removeprefix(f"{config}: ")

    return load


@pytest.mark.parametrize(
    ("network", "expected"),
    [
        ({"proxy": "socks5://proxy.corp:1080"}, "network.proxy: must be an http:// or https://"),
        ({"proxy": "http://"}, "network.proxy: must be an http:// or https:// URL with a host"),
        ({"proxy": "http://proxy.corp:3128/path"}, "network.proxy: must be a proxy address"),
        ({"proxy": "http://proxy.corp:99999"}, "network.proxy: is not a valid URL"),
        ({"proxy": "http://a%3Ab:c@proxy.corp:3128"}, "network.proxy: the proxy user name"),
        ({"trust_env": "sometimes"}, "network.trust_env: input should be a valid boolean"),
        ({"insecure_skip_verify": "maybe"}, "network.insecure_skip_verify: input should be"),
        ({"ca_file": "/no/such/ca.pem"}, "network.ca_file: cannot read /no/such/ca.pem: No such"),
        ({"outbound_proxy": "http://p:1"}, "network.outbound_proxy: unknown key"),
        ({"tls": {"ca_file": "/x"}}, "network.tls: unknown key"),
    ],
)
def test_network_errors_name_the_key(
    load_network: Callable[[dict[str, Any]], str], network: dict[str, Any], expected: str
) -> None:
    assert load_network(network).startswith(expected)


@pytest.mark.parametrize(
    "proxy",
    [
        f"socks5://corp-user:{PROXY_PASSWORD}@proxy.corp:1080",
        f"corp-user:{PROXY_PASSWORD}@proxy.corp:3128",
        f"http://corp-user:{PROXY_PASSWORD}@proxy.corp:3128/path?q=1",
    ],
)
def test_a_proxy_password_is_never_echoed_in_a_config_error(
    load_network: Callable[[dict[str, Any]], str], proxy: str
) -> None:
    message = load_network({"proxy": proxy})
    assert message.startswith("network.proxy: ")
    assert PROXY_PASSWORD not in message
    assert "corp-user" not in message


def test_a_ca_file_without_certificates_is_refused_without_quoting_it(
    load_network: Callable[[dict[str, Any]], str], tmp_path: Path
) -> None:
    not_a_bundle = tmp_path / "secret.pem"
    not_a_bundle.write_text("password=hunter2-from-the-wrong-file\n")
    message = load_network({"ca_file": str(not_a_bundle)})
    assert message == f"network.ca_file: {not_a_bundle} holds no PEM certificate"


def test_client_cert_and_key_come_together(
    load_network: Callable[[dict[str, Any]], str], client_files: tuple[Path, Path]
) -> None:
    cert, key = client_files
    expected = "network: set client_cert and client_key together, or neither"
    assert load_network({"client_cert": str(cert)}) == expected
    assert load_network({"client_key": str(key)}) == expected


def test_a_client_key_of_another_certificate_is_refused(
    load_network: Callable[[dict[str, Any]], str],
    ca: trustme.CA,
    client_files: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    cert, _ = client_files
    other_key = tmp_path / "other-key.pem"
    ca.issue_cert("other.example.test").private_key_pem.write_to_path(other_key)
    message = load_network({"client_cert": str(cert), "client_key": str(other_key)})
    assert message == f"network.client_key: {other_key} is not the key of the certificate {cert}"


def test_a_client_cert_file_without_a_certificate_is_refused(
    load_network: Callable[[dict[str, Any]], str], client_files: tuple[Path, Path]
) -> None:
    _, key = client_files
    message = load_network({"client_cert": str(key), "client_key": str(key)})
    assert message == f"network.client_cert: {key} holds no PEM certificate"


def test_an_encrypted_client_key_is_refused_without_asking_for_a_passphrase(
    load_network: Callable[[dict[str, Any]], str],
    client_files: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    cert, key = client_files
    private_key = serialization.load_pem_private_key(key.read_bytes(), password=None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(
        private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    message = load_network({"client_cert": str(cert), "client_key": str(encrypted)})
    assert message.startswith(f"network.client_key: {encrypted} is encrypted")


def test_the_network_defaults_are_the_contract_ones() -> None:
    network = NetworkSettings()
    assert network.trust_env is True
    assert network.proxy is None
    assert network.ca_file is None
    assert network.client_cert is None
    assert network.client_key is None
    assert network.insecure_skip_verify is False


def test_the_token_endpoint_and_upstream_share_one_tls_context_when_alike() -> None:
    """Each context holds the system's CAs: two alike would cost memory for nothing."""
    plain = Outbound(NetworkSettings())
    assert plain.upstream_tls is plain.token_tls

    insecure = Outbound(NetworkSettings(insecure_skip_verify=True))
    assert insecure.upstream_tls is not insecure.token_tls
    assert insecure.token_tls.verify_mode == ssl.CERT_REQUIRED
