"""Forwarding over real loopback sockets: what the upstream receives and the client gets back."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import re
import socket
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from proxy.config import NetworkSettings
from proxy.errors import ServerSpokeFirst, describe_client_error
from proxy.forwarder import WHOLE_ANSWER_LIMIT, new_upstream_session
from proxy.network import GuardedConnector, Outbound
from proxy.server import ProxyServer
from proxy.standins import Answer
from tests.conftest import Standins, StartProxy, StartStandins
from tests.support import (
    HeldRoute,
    KeptAliveUpstream,
    connect,
    raw_exchange,
    read_to_close,
    sample,
)

ERROR_HEADER = "X-Skill-Engine-Proxy-Error"


def only_token(standins: Standins) -> str:
    [token] = standins.tokens.issued
    return token


async def test_a_request_reaches_the_upstream_with_the_token(
    standins: Standins, proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{proxy.proxy_url}/version") as response:
        assert response.status == 200
        assert await response.json() == {"service": "Skill Engine stand-in", "version": "standin"}

    [received] = standins.skill_engine.received
    assert received.header_values("Authorization") == [f"Bearer {only_token(standins)}"]


@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"])
async def test_every_method_is_forwarded_with_its_body(
    standins: Standins, proxy: ProxyServer, client: aiohttp.ClientSession, method: str
) -> None:
    body = f"{method} body \u00e9".encode()
    async with client.request(method, f"{proxy.proxy_url}/echo/x", data=body) as response:
        assert response.status == 200
        echoed = await response.json()
    assert echoed["method"] == method
    assert echoed["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_head_keeps_the_length_and_sends_no_body(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    head = await raw_exchange(
        proxy.proxy_url, b"HEAD /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert head.status == 200
    assert head.header_values("Content-Length") == ["58"]
    assert head.body == b""


@pytest.mark.parametrize("target", ["/bytes/1000", "/bytes/1000?length=1"])
async def test_head_of_a_streamed_answer_leaves_the_upstream_connection_usable(
    proxy: ProxyServer, client: aiohttp.ClientSession, target: str
) -> None:
    # The demo's case: a body after a HEAD answer would be read as the start of the next
    # answer on the pooled upstream connection, and that request would get a 502.
    for _ in range(3):
        async with client.head(f"{proxy.proxy_url}{target}") as response:
            assert response.status == 200
            assert await response.read() == b""
        async with client.get(f"{proxy.proxy_url}/version") as response:
            assert response.status == 200, await response.text()


@pytest.mark.parametrize(
    "target",
    [
        "/echo/a%2Fb%25c/./d/../e?x=%2F&y=+&y=&z&empty=&q=%E2%82%AC",
        "/echo//double//slashes?a=1&a=2&a=1",
        "/echo/;matrix=1?&&=&",
        "/echo/%7Euser/caf%C3%A9?%3D=%26",
        "/echo/line%0Abreak%00nul%zz?bad=%zz%0D%0A",
    ],
)
async def test_path_and_query_reach_the_upstream_byte_for_byte(
    standins: Standins, proxy: ProxyServer, target: str
) -> None:
    request = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    response = await raw_exchange(proxy.proxy_url, request)
    assert response.status == 200
    assert standins.skill_engine.received[-1].raw_path == target


async def test_a_base_path_in_the_upstream_url_is_kept_as_a_prefix(
    standins: Standins, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    settings = standins.settings(upstream={"url": f"{standins.upstream_url}/echo/base/"})
    proxy = await start_proxy(settings)
    request = b"GET /v1/items?x=%2F HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    assert (await raw_exchange(proxy.proxy_url, request)).status == 200
    assert standins.skill_engine.received[-1].raw_path == "/echo/base/v1/items?x=%2F"


async def test_nothing_is_added_to_what_the_client_sent_but_token_and_request_id(
    standins: Standins, proxy: ProxyServer
) -> None:
    await raw_exchange(
        proxy.proxy_url, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    names = [name.lower() for name, _ in standins.skill_engine.received[-1].raw_headers]
    assert sorted(names) == [b"authorization", b"host", b"x-request-id"]

    await raw_exchange(
        proxy.proxy_url,
        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
    )
    names = [name.lower() for name, _ in standins.skill_engine.received[-1].raw_headers]
    assert sorted(names) == [b"authorization", b"content-length", b"host", b"x-request-id"]


async def test_the_upstream_sees_its_own_host(standins: Standins, proxy: ProxyServer) -> None:
    await raw_exchange(
        proxy.proxy_url, b"GET /echo HTTP/1.1\r\nHost: client.example\r\nConnection: close\r\n\r\n"
    )
    upstream_authority = standins.upstream_url.removeprefix("http://")
    assert standins.skill_engine.received[-1].header_values("Host") == [upstream_authority]


async def test_the_clients_authorization_is_replaced_by_exactly_one_bearer(
    standins: Standins, proxy: ProxyServer
) -> None:
    await raw_exchange(
        proxy.proxy_url,
        b"GET /echo HTTP/1.1\r\nHost: x\r\nAuthorization: Basic dXNlcjpwYXNz\r\n"
        b"Authorization: Bearer forged\r\nConnection: close\r\n\r\n",
    )
    received = standins.skill_engine.received[-1]
    assert received.header_values("Authorization") == [f"Bearer {only_token(standins)}"]


async def test_hop_by_hop_request_headers_are_not_forwarded(
    standins: Standins, proxy: ProxyServer
) -> None:
    await raw_exchange(
        proxy.proxy_url,
        b"GET /echo HTTP/1.1\r\nHost: x\r\n"
        b"Connection: close, X-Named-By-Connection\r\n"
        b"X-Named-By-Connection: drop me\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"Proxy-Authorization: Basic c2VjcmV0\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-Checksum\r\n"
        b"Upgrade: websocket\r\n"
        b"X-Kept: yes\r\n\r\n",
    )
    names = {name.lower() for name, _ in standins.skill_engine.received[-1].raw_headers}
    assert names == {b"host", b"authorization", b"x-kept", b"x-request-id"}


async def test_a_chunked_upload_is_forwarded_whole(standins: Standins, proxy: ProxyServer) -> None:
    response = await raw_exchange(
        proxy.proxy_url,
        b"PUT /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    echoed = json.loads(response.body)
    assert echoed["body_sha256"] == hashlib.sha256(b"hello world").hexdigest()


async def test_repeated_request_headers_stay_separate(
    standins: Standins, proxy: ProxyServer
) -> None:
    await raw_exchange(
        proxy.proxy_url,
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Repeat: one\r\nX-Repeat: two\r\n"
        b"Cookie: a=1\r\nCookie: b=2\r\nConnection: close\r\n\r\n",
    )
    received = standins.skill_engine.received[-1]
    assert received.header_values("X-Repeat") == ["one", "two"]
    assert received.header_values("Cookie") == ["a=1", "b=2"]


def upstream_routes(release: asyncio.Event) -> web.RouteTableDef:
    """Upstream behaviours the stand-in Skill Engine does not have by default;
    `/events` holds its second event until `release` is set."""
    routes = web.RouteTableDef()

    @routes.get("/cookies")
    async def cookies(_request: web.Request) -> web.Response:
        response = web.Response(text="two cookies")
        response.headers.add("Set-Cookie", "session=abc; Path=/; HttpOnly")
        response.headers.add("Set-Cookie", "theme=dark; Path=/")
        return response

    @routes.get("/gzip")
    async def gzipped(_request: web.Request) -> web.Response:
        body = gzip.compress(b'{"compressed": true}' * 50)
        return web.Response(
            body=body, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    @routes.get("/redirect")
    async def redirect(_request: web.Request) -> web.Response:
        raise web.HTTPFound("/version")

    @routes.get("/hop")
    async def hop(_request: web.Request) -> web.Response:
        return web.Response(
            text="hop",
            headers={
                "Connection": "X-Upstream-Hop",
                "X-Upstream-Hop": "drop",
                "Keep-Alive": "timeout=5",
                "Proxy-Authenticate": "Basic",
                "Trailer": "X-Checksum",
                "Upgrade": "h2c",
                "X-End-To-End": "keep",
            },
        )

    @routes.get("/no-content")
    async def no_content(_request: web.Request) -> web.Response:
        return web.Response(status=204)

    @routes.get("/events")
    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await release.wait()
        await response.write(b"data: second\n\n")
        await response.write_eof()
        return response

    @routes.get("/silent")
    async def silent(_request: web.Request) -> web.Response:
        await asyncio.sleep(30)
        return web.Response(text="too late")

    @routes.get("/broken/{framing}")
    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        framing = request.match_info["framing"]
        if framing == "length":
            response.content_length = 1000
        elif framing == "large-length":
            response.content_length = WHOLE_ANSWER_LIMIT + 1000
        await response.prepare(request)
        await response.write(b"only part")
        assert request.transport is not None
        request.transport.close()
        return response

    return routes


@pytest.fixture
def release() -> asyncio.Event:
    return asyncio.Event()


@pytest.fixture
async def upstream(start_standins: StartStandins, release: asyncio.Event) -> Standins:
    return await start_standins(upstream_routes(release))


@pytest.fixture
async def upstream_proxy(upstream: Standins, start_proxy: StartProxy) -> ProxyServer:
    return await start_proxy(upstream.settings(upstream={"read_timeout": 0.5}))


async def test_several_set_cookie_headers_stay_separate(
    upstream_proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{upstream_proxy.proxy_url}/cookies") as response:
        assert response.headers.getall("Set-Cookie") == [
            "session=abc; Path=/; HttpOnly",
            "theme=dark; Path=/",
        ]


async def test_a_cookie_set_for_one_caller_is_not_sent_for_another(
    upstream: Standins, start_proxy: StartProxy
) -> None:
    # By name, not by IP address: aiohttp's cookie jar would ignore cookies of an IP host.
    by_name = upstream.upstream_url.replace("127.0.0.1", "localhost")
    url = (await start_proxy(upstream.settings(upstream={"url": by_name}))).proxy_url
    async with aiohttp.ClientSession() as first, first.get(f"{url}/cookies") as response:
        assert response.headers.getall("Set-Cookie")
    async with aiohttp.ClientSession() as second, second.get(f"{url}/echo") as response:
        assert response.status == 200
    assert upstream.skill_engine.received[-1].header_values("Cookie") == []


async def test_a_gzip_body_passes_through_undecoded(
    upstream_proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{upstream_proxy.proxy_url}/gzip") as response:
        body = await response.read()
        assert response.headers["Content-Encoding"] == "gzip"
        assert response.headers["Content-Length"] == str(len(body))
    assert gzip.decompress(body) == b'{"compressed": true}' * 50


async def test_a_redirect_goes_back_to_the_client(
    upstream: Standins, upstream_proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    async with client.get(
        f"{upstream_proxy.proxy_url}/redirect", allow_redirects=False
    ) as response:
        assert response.status == 302
        assert response.headers["Location"] == "/version"
    assert [received.raw_path for received in upstream.skill_engine.received] == ["/redirect"]


async def test_hop_by_hop_response_headers_are_not_passed_back(
    upstream_proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{upstream_proxy.proxy_url}/hop") as response:
        assert response.status == 200
        assert response.headers["X-End-To-End"] == "keep"
        for name in ("X-Upstream-Hop", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"):
            assert name not in response.headers
        assert response.headers.get("Connection", "keep-alive").lower() == "keep-alive"


async def test_no_content_stays_without_body_or_framing(upstream_proxy: ProxyServer) -> None:
    response = await raw_exchange(
        upstream_proxy.proxy_url,
        b"GET /no-content HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert response.status == 204
    assert response.header_values("Transfer-Encoding") == []
    assert response.header_values("Content-Type") == []
    assert response.body == b""


class RawUpstreams:
    """Upstreams that answer every request with given bytes, exactly, and keep every
    request they received (head and Content-Length body) as raw bytes."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self._servers: list[asyncio.Server] = []

    async def start(self, answer: bytes) -> str:
        async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
            body = await reader.readexactly(int(length.group(1))) if length else b""
            self.received.append(head + body)
            writer.write(answer)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(reply, "127.0.0.1", 0)
        self._servers.append(server)
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        for server in self._servers:
            server.close()
            await server.wait_closed()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstreams]:
    upstreams = RawUpstreams()
    yield upstreams
    await upstreams.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nbody\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody",
    ],
    ids=["chunked", "until-close"],
)
async def test_an_http10_client_gets_a_body_of_unknown_length_ended_by_the_close(
    standins: Standins, start_proxy: StartProxy, raw_upstream: RawUpstreams, answer: bytes
) -> None:
    """HTTP/1.0 has no chunking: a body without Content-Length ends when the connection
    closes, even on a connection the client asked to keep alive (RFC 9112 6.3)."""
    upstream_url = await raw_upstream.start(answer)
    proxy = await start_proxy(standins.settings(upstream={"url": upstream_url}))
    reader, writer = await connect(proxy.proxy_url)
    try:
        writer.write(b"GET /x HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        received = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK\r\n")
    assert b"content-length" not in head.lower()
    assert b"keep-alive" not in head.lower()
    assert body == b"body"


async def test_a_switch_of_protocols_the_client_did_not_ask_for_is_not_relayed(
    standins: Standins, start_proxy: StartProxy, raw_upstream: RawUpstreams
) -> None:
    """The proxy forwards no Upgrade header, so an upstream's 101 is a broken answer: relayed,
    it would tell the client the connection now speaks another protocol."""
    upstream_url = await raw_upstream.start(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    proxy = await start_proxy(standins.settings(upstream={"url": upstream_url}))
    response = await raw_exchange(
        proxy.proxy_url,
        b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, close\r\nUpgrade: websocket\r\n\r\n",
    )
    assert response.status == 502
    assert response.header_values(ERROR_HEADER) == ["upstream_unreachable"]
    assert "(101)" in json.loads(response.body)["message"]
    assert b"upgrade" not in raw_upstream.received[0].lower()


async def named_answer(head: bytes) -> bytes:
    """An answer whose body is the request's path without its slash."""
    body = head.split(b" ", 2)[1].lstrip(b"/")
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


STRAY_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Stray: yes\r\n\r\nstray"
CLOSE_REQUEST = b"GET /%s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def test_an_answer_sent_on_an_idle_upstream_connection_reaches_no_client(
    standins: Standins, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp queues what arrives on a pooled connection as the next request's answer: an
    upstream's stray answer must not reach the next client, nor shift later answers."""
    upstream = KeptAliveUpstream(named_answer)
    try:
        proxy = await start_proxy(standins.settings(upstream={"url": await upstream.start()}))
        assert (await raw_exchange(proxy.proxy_url, CLOSE_REQUEST % b"first")).body == b"first"
        await upstream.push(STRAY_ANSWER)

        for name in (b"second", b"third"):
            response = await raw_exchange(proxy.proxy_url, CLOSE_REQUEST % name)
            assert (response.status, response.body) == (200, name)
            assert response.header_values("X-Stray") == []
        assert len(upstream.connections) == 2  # the spoilt connection was closed, not reused
        assert "an answer to no request on 1 idle kept-alive connection" in caplog.text
    finally:
        await upstream.close()


async def test_a_request_passes_over_every_spoilt_pooled_connection(
    standins: Standins, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    """However many pooled connections an upstream has spoilt, a request ends on a usable
    one, and the log says so once."""
    spoilt = 70
    all_in = asyncio.Event()
    arrived = 0

    async def held_answer(head: bytes) -> bytes:
        nonlocal arrived
        arrived += 1
        if arrived == spoilt:
            all_in.set()
        await all_in.wait()  # every request holds its own upstream connection
        return await named_answer(head)

    upstream = KeptAliveUpstream(held_answer)
    try:
        proxy = await start_proxy(standins.settings(upstream={"url": await upstream.start()}))
        names = [b"held%d" % number for number in range(spoilt)]
        held = await asyncio.gather(
            *(raw_exchange(proxy.proxy_url, CLOSE_REQUEST % name) for name in names)
        )
        assert [response.body for response in held] == names
        assert len(upstream.connections) == spoilt
        await upstream.push(STRAY_ANSWER)

        response = await raw_exchange(proxy.proxy_url, CLOSE_REQUEST % b"next")
        assert (response.status, response.body) == (200, b"next")
        assert len(upstream.connections) == spoilt + 1
        warnings = [r for r in caplog.records if "an answer to no request" in r.getMessage()]
        assert len(warnings) == 1
        assert f"on {spoilt} idle kept-alive connection" in warnings[0].getMessage()
    finally:
        await upstream.close()


async def test_an_upstream_that_answers_before_it_is_asked_is_not_believed() -> None:
    """Bytes on a new connection before the request is sent are no answer to it; the
    connector gives up at once rather than trying connection after connection."""
    written = asyncio.Event()
    accepted: list[asyncio.StreamWriter] = []

    async def speak_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)
        writer.write(STRAY_ANSWER)
        await writer.drain()
        written.set()
        await reader.read()

    async def after_connect(*_: object) -> None:
        await written.wait()
        await asyncio.sleep(0.01)  # a turn of the loop to receive what was written

    tracing = aiohttp.TraceConfig()
    tracing.on_connection_create_end.append(after_connect)
    server = await asyncio.start_server(speak_first, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/x"
    try:
        async with aiohttp.ClientSession(
            connector=GuardedConnector(limit=0), trace_configs=[tracing]
        ) as session:
            with pytest.raises(ServerSpokeFirst) as raised:
                await session.get(url)
        assert len(accepted) == 1
        assert "before it was asked" in describe_client_error(raised.value)
    finally:
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize(
    ("request_line", "answer"),
    [
        (b"GET /x", b"HTTP/1.1 204 No Content\r\n\r\n"),
        (b"GET /x", b'HTTP/1.1 304 Not Modified\r\nETag: "a"\r\n\r\n'),
        (b"HEAD /x", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ],
    ids=["204", "304", "head-of-chunked"],
)
async def test_an_http10_client_keeps_its_connection_after_an_answer_without_body(
    standins: Standins, start_proxy: StartProxy, request_line: bytes, answer: bytes
) -> None:
    """Only a body of unknown length needs the close to end it (RFC 9112 6.3); these
    answers have none, so a kept-alive HTTP/1.0 connection carries the next request."""

    async def fixed(_: bytes) -> bytes:
        return answer

    upstream = KeptAliveUpstream(fixed)
    try:
        proxy = await start_proxy(standins.settings(upstream={"url": await upstream.start()}))
        reader, writer = await connect(proxy.proxy_url)
        try:
            for _ in range(2):
                writer.write(request_line + b" HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
                assert head.split(b" ", 2)[1] == answer.split(b" ", 2)[1]
        finally:
            writer.close()
    finally:
        await upstream.close()


# An HTTP/1.0 answer's head with a transfer coding, faulty framing (RFC 9112 6.1).
HTTP10_CHUNKED_HEAD = (
    b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
)


async def test_an_http10_answer_with_a_transfer_coding_is_not_relayed(
    standins: Standins, start_proxy: StartProxy
) -> None:
    """RFC 9112 6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing; the
    answer is refused and its connection not reused."""

    async def faulty(_: bytes) -> bytes:
        return HTTP10_CHUNKED_HEAD + b"5\r\nhello\r\n0\r\n\r\n"

    upstream = KeptAliveUpstream(faulty)
    try:
        proxy = await start_proxy(standins.settings(upstream={"url": await upstream.start()}))
        for name in (b"one", b"two"):
            response = await raw_exchange(proxy.proxy_url, CLOSE_REQUEST % name)
            assert response.status == 502
            assert "HTTP/1.0 with a Transfer-Encoding" in json.loads(response.body)["message"]
        assert len(upstream.connections) == 2
    finally:
        await upstream.close()


async def test_the_body_of_an_http10_answer_with_a_transfer_coding_can_still_be_read() -> None:
    """The upstream session ends such a connection once the answer is done with, not
    while its body is still arriving (`check` reads it)."""

    async def first_chunk(_: bytes) -> bytes:
        return HTTP10_CHUNKED_HEAD + b"5\r\nhello\r\n"

    upstream = KeptAliveUpstream(first_chunk)
    try:
        url = await upstream.start()
        async with new_upstream_session(Outbound(NetworkSettings())) as session:
            for _ in range(2):
                async with session.get(url) as response:
                    await upstream.push(b"0\r\n\r\n")
                    assert await response.read() == b"hello"
        assert len(upstream.connections) == 2
    finally:
        await upstream.close()


@pytest.mark.parametrize(
    "body",
    [b"plain", b"x" * (WHOLE_ANSWER_LIMIT + 1)],
    ids=["small-read-whole", "large-streamed"],
)
async def test_the_proxy_adds_no_content_type_or_server_of_its_own(
    standins: Standins,
    start_proxy: StartProxy,
    raw_upstream: RawUpstreams,
    body: bytes,
) -> None:
    upstream_url = await raw_upstream.start(
        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    proxy = await start_proxy(standins.settings(upstream={"url": upstream_url}))
    response = await raw_exchange(
        proxy.proxy_url, b"GET /untyped HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert response.status == 200
    assert response.body == body
    assert response.header_values("Content-Type") == []
    assert response.header_values("Server") == []
    assert response.header_values("Content-Length") == [str(len(body))]
    assert response.header_values("Transfer-Encoding") == []
    # RFC 9110 6.6.1: a Date is added when the upstream sent none.
    assert len(response.header_values("Date")) == 1


@pytest.mark.parametrize(
    "body", [b"", b"x" * (WHOLE_ANSWER_LIMIT + 1)], ids=["small-read-whole", "large-streamed"]
)
async def test_an_upstream_cannot_pass_its_answer_off_as_the_proxys_own_error(
    standins: Standins, start_proxy: StartProxy, raw_upstream: RawUpstreams, body: bytes
) -> None:
    upstream_url = await raw_upstream.start(
        b"HTTP/1.1 503 Service Unavailable\r\nX-Skill-Engine-Proxy-Error: token_unavailable\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    proxy = await start_proxy(standins.settings(upstream={"url": upstream_url}))
    response = await raw_exchange(
        proxy.proxy_url, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert response.status == 503
    assert response.body == body
    assert response.header_values(ERROR_HEADER) == []


async def test_each_response_has_exactly_one_framing(upstream_proxy: ProxyServer) -> None:
    for path in ("/version", "/bytes/100", "/bytes/100?length=1", "/gzip"):
        response = await raw_exchange(
            upstream_proxy.proxy_url,
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode(),
        )
        framings = response.header_values("Content-Length") + response.header_values(
            "Transfer-Encoding"
        )
        assert len(framings) == 1, (path, response.headers)


async def test_streamed_events_reach_the_client_as_they_arrive(
    upstream_proxy: ProxyServer, client: aiohttp.ClientSession, release: asyncio.Event
) -> None:
    async with client.get(f"{upstream_proxy.proxy_url}/events") as response:
        assert response.headers["Transfer-Encoding"] == "chunked"
        # The upstream holds its second event until the first has reached this client.
        first = await asyncio.wait_for(response.content.readuntil(b"\n\n"), timeout=10)
        assert first == b"data: first\n\n"
        release.set()
        assert await response.content.read() == b"data: second\n\n"


async def test_an_unreachable_upstream_gives_502(
    standins: Standins,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    unused_tcp_port: int,
) -> None:
    port = unused_tcp_port
    proxy = await start_proxy(standins.settings(upstream={"url": f"http://127.0.0.1:{port}"}))

    async with client.get(f"{proxy.proxy_url}/version") as response:
        assert response.status == 502
        assert response.headers[ERROR_HEADER] == "upstream_unreachable"
        assert response.content_type == "application/json"
        body = await response.json()
    assert body["error"] == "upstream_unreachable"
    assert f"127.0.0.1:{port}" in body["message"]


async def test_a_silent_upstream_gives_504(
    upstream_proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{upstream_proxy.proxy_url}/silent") as response:
        assert response.status == 504
        assert (await response.json())["error"] == "upstream_timeout"
        assert "read_timeout (0.5 s)" in (await response.json())["message"]


@pytest.mark.parametrize("framing", ["large-length", "chunked"])
async def test_an_answer_broken_off_midway_is_not_passed_as_complete(
    upstream_proxy: ProxyServer, client: aiohttp.ClientSession, framing: str
) -> None:
    async with client.get(f"{upstream_proxy.proxy_url}/broken/{framing}") as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await asyncio.wait_for(response.read(), timeout=10)


async def test_a_small_answer_broken_off_midway_is_a_502(
    upstream_proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    """A small answer is read whole before its status goes out, so the client is told."""
    async with client.get(f"{upstream_proxy.proxy_url}/broken/length") as response:
        assert response.status == 502
        assert (await response.json())["error"] == "upstream_unreachable"


CHUNKED_BODY = b"5\r\nhello\r\n0\r\n\r\n"


@pytest.mark.parametrize(
    ("request_head", "body"),
    [
        pytest.param(b"GET http://elsewhere.example/version HTTP/1.1", b"", id="absolute-form"),
        pytest.param(b"CONNECT elsewhere.example:443 HTTP/1.1", b"", id="connect"),
        pytest.param(b"OPTIONS * HTTP/1.1", b"", id="asterisk-form"),
        pytest.param(b"GET /echo/a#frag?secret=hidden HTTP/1.1", b"", id="fragment"),
        pytest.param(b"TRACE /echo HTTP/1.1", b"", id="trace-would-echo-the-token"),
        pytest.param(b"GET /echo HTTP/2.0", b"", id="http-2"),
        pytest.param(b"GET /echo", b"", id="http-0.9"),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: gzip, chunked",
            CHUNKED_BODY,
            id="gzip-transfer-coding",
        ),
        pytest.param(
            b"POST /echo HTTP/1.1\r\nTransfer-Encoding: deflate,chunked",
            CHUNKED_BODY,
            id="deflate-transfer-coding",
        ),
        pytest.param(b"OPTIONS /echo HTTP/1.1\r\nMax-Forwards: \xc2\xb2", b"", id="hops-2"),
        pytest.param(b"OPTIONS /echo HTTP/1.1\r\nMax-Forwards: \xd9\xa3", b"", id="hops-3"),
        pytest.param(b"OPTIONS /echo HTTP/1.1\r\nMax-Forwards: -1", b"", id="hops-negative"),
    ],
)
async def test_requests_the_proxy_will_not_forward_are_refused(
    standins: Standins, proxy: ProxyServer, request_head: bytes, body: bytes
) -> None:
    response = await raw_exchange(
        proxy.proxy_url, request_head + b"\r\nHost: x\r\nConnection: close\r\n\r\n" + body
    )
    assert response.status == 400
    assert response.header_values(ERROR_HEADER) == ["bad_request"]
    assert json.loads(response.body)["error"] == "bad_request"
    assert b"hidden" not in response.body
    assert list(standins.skill_engine.received) == []


async def test_an_http10_request_with_transfer_encoding_is_refused_and_its_connection_closed(
    standins: Standins, proxy: ProxyServer
) -> None:
    """RFC 9112 6.1: the framing of an HTTP/1.0 message with Transfer-Encoding is faulty;
    what follows the chunks must not be read as a next request."""
    smuggled = b"GET /echo/smuggled HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n"
    received = await read_to_close(
        *await connect(proxy.proxy_url),
        b"POST /echo HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n" + CHUNKED_BODY + smuggled,
    )
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 400 Bad Request\r\n")
    [length] = re.findall(rb"\r\nContent-Length: (\d+)", head)
    assert len(body) == int(length)  # one answer, and the connection closed after it
    assert json.loads(body)["error"] == "bad_request"
    assert list(standins.skill_engine.received) == []


async def test_one_token_fetch_for_100_concurrent_cold_requests(
    start_standins: StartStandins, start_proxy: StartProxy
) -> None:
    standins = await start_standins(delay=0.2)
    proxy = await start_proxy(standins.settings())

    async with aiohttp.ClientSession() as session:

        async def call() -> int:
            async with session.get(f"{proxy.proxy_url}/version") as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(call() for _ in range(100)))

    assert statuses == [200] * 100
    assert len(standins.tokens.requests) == 1


async def test_rejected_credentials_give_503_with_the_reason_and_not_the_secret(
    standins: Standins, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(standins.settings(client_secret="wrong-secret-3141"))
    async with client.get(f"{proxy.proxy_url}/version") as response:
        assert response.status == 503
        text = await response.text()
    body = json.loads(text)
    assert body["error"] == "token_unavailable"
    assert "rejected the client credentials" in body["message"]
    assert "access_denied" in body["message"]
    assert "wrong-secret-3141" not in text
    assert list(standins.skill_engine.received) == []


async def test_a_rate_limited_token_endpoint_sets_retry_after(
    standins: Standins, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(standins.settings(prefetch=False))
    standins.tokens.answer_next(Answer(429, {"error": "too_many_requests"}, {"Retry-After": "12"}))
    async with client.get(f"{proxy.proxy_url}/version") as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == "12"


async def test_an_upstream_that_does_not_accept_gives_504_after_connect_timeout(
    standins: Standins, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    # A listening socket whose backlog is full leaves new connections hanging on loopback.
    with socket.socket() as deaf:
        deaf.bind(("127.0.0.1", 0))
        deaf.listen(0)
        port = deaf.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        settings = standins.settings(
            upstream={"url": f"http://127.0.0.1:{port}", "connect_timeout": 0.3}
        )
        proxy = await start_proxy(settings)
        try:
            async with client.get(f"{proxy.proxy_url}/version") as response:
                assert response.status == 504
                body = await response.json()
        finally:
            for filler in fillers:
                filler.close()
    assert body["error"] == "upstream_timeout"
    assert "connect_timeout (0.3 s)" in body["message"]


async def test_options_with_max_forwards_zero_is_answered_by_the_proxy(
    standins: Standins, proxy: ProxyServer
) -> None:
    response = await raw_exchange(
        proxy.proxy_url,
        b"OPTIONS /echo HTTP/1.1\r\nHost: x\r\nMax-Forwards: 0\r\nConnection: close\r\n\r\n",
    )
    assert response.status == 200
    assert "OPTIONS" in response.header_values("Allow")[0]
    assert list(standins.skill_engine.received) == []

    response = await raw_exchange(
        proxy.proxy_url,
        b"OPTIONS /echo HTTP/1.1\r\nHost: x\r\nMax-Forwards: 3\r\nConnection: close\r\n\r\n",
    )
    assert response.status == 200
    assert standins.skill_engine.received[-1].header_values("Max-Forwards") == ["2"]


async def test_header_bytes_that_are_not_utf8_are_refused_not_corrupted(
    standins: Standins,
    start_proxy: StartProxy,
    raw_upstream: RawUpstreams,
) -> None:
    proxy = await start_proxy(standins.settings())
    response = await raw_exchange(
        proxy.proxy_url,
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Name: caf\xe9\r\nConnection: close\r\n\r\n",
    )
    assert response.status == 400
    assert "X-Name" in json.loads(response.body)["message"]
    assert list(standins.skill_engine.received) == []

    utf8 = await raw_exchange(
        proxy.proxy_url,
        "GET /echo HTTP/1.1\r\nHost: x\r\nX-Name: café\r\nConnection: close\r\n\r\n".encode(),
    )
    assert utf8.status == 200
    assert standins.skill_engine.received[-1].header_values("X-Name") == [
        "café".encode().decode("latin-1")
    ]

    upstream_url = await raw_upstream.start(
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Up: caf\xe9\r\n\r\n"
    )
    relaying = await start_proxy(standins.settings(upstream={"url": upstream_url}))
    response = await raw_exchange(
        relaying.proxy_url, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert response.status == 502
    assert "X-Up" in json.loads(response.body)["message"]


async def test_an_invalid_upstream_answer_is_502_without_the_query_anywhere(
    standins: Standins,
    start_proxy: StartProxy,
    raw_upstream: RawUpstreams,
    caplog: pytest.LogCaptureFixture,
) -> None:
    upstream_url = await raw_upstream.start(b"NOT HTTP AT ALL\r\n\r\n")
    proxy = await start_proxy(standins.settings(upstream={"url": upstream_url}))
    response = await raw_exchange(
        proxy.proxy_url,
        b"GET /x?api_key=hidden-value HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert response.status == 502
    assert json.loads(response.body)["error"] == "upstream_unreachable"
    assert b"hidden-value" not in response.body
    assert "hidden-value" not in caplog.text


async def expect_exchange(url: str, body: bytes) -> tuple[bytes, bytes]:
    """Send headers with Expect: 100-continue and wait for the proxy's first answer; send
    the body only if it was 100 Continue. Returns (first answer head, the rest)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            b"PUT /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        )
        await writer.drain()
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
        if not first.startswith(b"HTTP/1.1 100"):
            return first, b""  # a final answer: the body is not sent at all
        writer.write(body)
        await writer.drain()
        return first, await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


async def test_100_continue_is_sent_only_once_a_token_is_in_hand(
    standins: Standins, proxy: ProxyServer
) -> None:
    first, rest = await expect_exchange(proxy.proxy_url, b"a body")
    assert first == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert rest.startswith(b"HTTP/1.1 200")
    assert hashlib.sha256(b"a body").hexdigest().encode() in rest


async def test_no_100_continue_when_no_token_can_be_had(
    standins: Standins, start_proxy: StartProxy
) -> None:
    standins.tokens.answer_next(Answer(503))
    proxy = await start_proxy(standins.settings())
    first, _ = await expect_exchange(proxy.proxy_url, b"a body never sent")
    assert first.startswith(b"HTTP/1.1 503")
    # The unread body is not wanted: the proxy says so and closes (RFC 9110 10.1.1).
    assert b"\r\nConnection: close\r\n" in first
    assert list(standins.skill_engine.received) == []


async def test_a_client_that_hangs_up_cancels_its_upstream_request_and_counts_499(
    start_standins: StartStandins, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    held = HeldRoute()
    standins = await start_standins(held.routes())
    proxy = await start_proxy(standins.settings())

    _, writer = await asyncio.open_connection(*proxy.proxy_url[7:].split(":"))
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await held.arrived.wait()
    writer.close()
    await writer.wait_closed()

    text = ""
    while 'status="499"' not in text:  # the proxy notices the hang-up as soon as it reads
        async with client.get(f"{proxy.admin_url}/metrics") as response:
            text = await response.text()
        await asyncio.sleep(0.01)
    assert sample(text, "skill_engine_proxy_requests_in_flight") == 0
    assert not held.release.is_set()


async def test_an_encoded_request_body_reaches_the_upstream_as_sent(
    standins: Standins, start_proxy: StartProxy, raw_upstream: RawUpstreams
) -> None:
    upstream_url = await raw_upstream.start(b"HTTP/1.1 204 No Content\r\n\r\n")
    proxy = await start_proxy(standins.settings(upstream={"url": upstream_url}))
    body = gzip.compress(b'{"skills": ["python"]}' * 20)
    response = await raw_exchange(
        proxy.proxy_url,
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n"
        b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body),
    )
    assert response.status == 204
    [received] = raw_upstream.received
    assert received.endswith(b"\r\n\r\n" + body)
    assert b"\r\nContent-Length: %d\r\n" % len(body) in received
    assert b"\r\nContent-Encoding: gzip\r\n" in received


async def test_repeats_spelled_differently_all_arrive(
    standins: Standins, start_proxy: StartProxy, raw_upstream: RawUpstreams
) -> None:
    upstream_url = await raw_upstream.start(b"HTTP/1.1 204 No Content\r\n\r\n")
    proxy = await start_proxy(standins.settings(upstream={"url": upstream_url}))
    await raw_exchange(
        proxy.proxy_url,
        b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\nX-a: 3\r\nConnection: close\r\n\r\n",
    )
    [received] = raw_upstream.received
    values = re.findall(rb"\r\nx-a: (\d)", received, re.IGNORECASE)
    assert values == [b"1", b"2", b"3"]


async def test_a_refused_request_closes_its_connection(proxy: ProxyServer) -> None:
    answer = await read_to_close(
        *await connect(proxy.proxy_url),
        b"CONNECT elsewhere.example:443 HTTP/1.1\r\nHost: elsewhere.example\r\n\r\n",
    )
    assert answer.startswith(b"HTTP/1.1 400")
    assert b"\r\nConnection: close\r\n" in answer


async def test_a_client_that_stops_sending_its_body_is_refused_after_read_timeout(
    standins: Standins, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(standins.settings(upstream={"read_timeout": 0.3}))
    host, port = proxy.proxy_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nhalf")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 400")
    assert b"X-Skill-Engine-Proxy-Error: bad_request" in head


@pytest.mark.parametrize(
    ("answer", "words"),
    [
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            "transfer coding",
        ),
        (b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n", "status 99"),
    ],
)
async def test_answers_that_cannot_be_relayed_intact_become_502(
    standins: Standins,
    start_proxy: StartProxy,
    raw_upstream: RawUpstreams,
    answer: bytes,
    words: str,
) -> None:
    upstream_url = await raw_upstream.start(answer)
    proxy = await start_proxy(standins.settings(upstream={"url": upstream_url}))
    response = await raw_exchange(
        proxy.proxy_url, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert response.status == 502
    assert words in json.loads(response.body)["message"]


async def test_header_names_keep_their_spelling_both_ways(
    standins: Standins, start_proxy: StartProxy, raw_upstream: RawUpstreams
) -> None:
    upstream_url = await raw_upstream.start(
        b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nX-UPPER-lower: 1\r\n\r\n'
    )
    proxy = await start_proxy(standins.settings(upstream={"url": upstream_url}))
    response = await raw_exchange(
        proxy.proxy_url,
        b'GET /x HTTP/1.1\r\nHost: x\r\nIf-None-Match: "v1"\r\nX-MiXeD-Case: y\r\n'
        b"Connection: close\r\n\r\n",
    )
    assert response.status == 304
    assert b'\r\nETag: "v1"\r\n' in response.head
    assert b"\r\nX-UPPER-lower: 1\r\n" in response.head
    [received] = raw_upstream.received
    assert b"\r\nX-MiXeD-Case: y\r\n" in received
    assert b'\r\nIf-None-Match: "v1"\r\n' in received


async def test_a_reason_phrase_that_cannot_be_relayed_is_replaced_by_the_standard_one(
    standins: Standins, start_proxy: StartProxy, raw_upstream: RawUpstreams
) -> None:
    upstream_url = await raw_upstream.start(
        b"HTTP/1.1 404 Pas trouv\xe9\r\nContent-Length: 0\r\n\r\n"
    )
    proxy = await start_proxy(standins.settings(upstream={"url": upstream_url}))
    response = await raw_exchange(
        proxy.proxy_url, b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert response.head.startswith(b"HTTP/1.1 404 Not Found\r\n")


async def test_a_client_that_hangs_up_mid_answer_is_counted_with_the_status_it_got(
    upstream_proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    host, port = upstream_proxy.proxy_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await asyncio.wait_for(reader.readuntil(b"data: first\n\n"), timeout=10)
    writer.close()
    await writer.wait_closed()

    text = ""
    while "skill_engine_proxy_requests_total{" not in text:
        async with client.get(f"{upstream_proxy.admin_url}/metrics") as response:
            text = await response.text()
        await asyncio.sleep(0.01)
    assert 'status="200"' in text
    assert 'status="499"' not in text
