"""Logs: JSON and text lines, the access line, request ids, and no secret at any level."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

import proxy.logs
from proxy.config import LogSettings, load_settings
from proxy.logs import AccessLog, AccessRecord, access_log, configure_logging
from proxy.reload import ConfigSource, Reloader
from proxy.server import ProxyServer
from proxy.standins import Answer
from tests.conftest import Standins, StartProxy, StartStandins
from tests.support import SECRET, TENANT, eventually, raw_exchange, settings_document, write_config

Capture = Callable[..., io.StringIO]
NEXT_SECRET = "standin-next-secret"


@pytest.fixture
def capture_logs() -> Iterator[Capture]:
    """Send the proxy's logs, formatted as `configure_logging` formats them, to a buffer."""
    root = logging.getLogger()
    level = root.level
    installed: list[logging.Handler] = []

    def capture(**settings: Any) -> io.StringIO:
        buffer = io.StringIO()
        handler = configure_logging(LogSettings(**settings), stream=buffer)
        # The proxy runs without aiohttp's access log: its lines here are the stand-ins'.
        handler.addFilter(lambda record: record.name != "aiohttp.access")
        installed.append(handler)
        return buffer

    yield capture
    for handler in installed:
        root.removeHandler(handler)
    root.setLevel(level)
    access_log.configure(LogSettings(access=False), sys.stderr, None)


def json_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


def access_lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [line for line in json_lines(buffer) if line["logger"] == "skill_engine_proxy.access"]


async def test_json_logs_are_one_object_per_line_with_level_logger_and_time(
    capture_logs: Capture, standins: Standins, start_proxy: StartProxy
) -> None:
    output = capture_logs(format="json")
    await start_proxy(standins.settings())

    lines = json_lines(output)
    listening = next(line for line in lines if line["message"].startswith("Listening on"))
    assert listening["level"] == "INFO"
    assert listening["logger"] == "skill_engine_proxy"
    assert listening["time"].startswith("20")


async def test_the_access_line_has_every_field(
    capture_logs: Capture,
    standins: Standins,
    proxy: ProxyServer,
    client: aiohttp.ClientSession,
) -> None:
    output = capture_logs(format="json")
    async with client.post(
        f"{proxy.proxy_url}/echo/items?secret-query=1", data=b"12345"
    ) as response:
        body = await response.read()

    (line,) = access_lines(output)
    assert line["message"] == "POST /echo/items 200"
    assert line["method"] == "POST"
    assert line["path"] == "/echo/items"
    assert line["status"] == 200
    assert line["tenant"] == TENANT
    assert line["bytes_in"] == 5
    assert line["bytes_out"] == len(body)
    assert line["duration_ms"] >= line["upstream_ms"] > 0
    assert line["request_id"] == response.headers["X-Request-ID"]
    assert "secret-query" not in output.getvalue()


async def test_the_text_access_line_reads_as_key_value_pairs(
    capture_logs: Capture, standins: Standins, proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    output = capture_logs(format="text")
    async with client.get(
        f"{proxy.proxy_url}/version", headers={"X-Request-ID": "abc 123"}
    ) as response:
        await response.read()

    (line,) = [line for line in output.getvalue().splitlines() if "access" in line]
    assert " skill_engine_proxy.access: GET /version 200 duration_ms=" in line
    assert f"tenant={TENANT} request_id='abc 123'" in line
    assert "bytes_in=0" in line


async def test_a_proxy_error_is_logged_with_its_status_and_no_upstream_time(
    capture_logs: Capture, start_standins: StartStandins, start_proxy: StartProxy
) -> None:
    output = capture_logs(format="json")
    standins = await start_standins()
    standins.tokens.answer_next(Answer(500), times=100)
    proxy = await start_proxy(standins.settings())
    async with aiohttp.ClientSession() as client, client.get(f"{proxy.proxy_url}/v") as response:
        assert response.status == 503
        assert response.headers["X-Request-ID"]

    (line,) = access_lines(output)
    assert line["status"] == 503
    assert line["upstream_ms"] is None
    assert line["bytes_out"] == response.content_length


async def test_access_lines_can_be_switched_off_and_do_not_follow_the_level(
    capture_logs: Capture, standins: Standins, proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    loud = capture_logs(format="json", level="error")
    async with client.get(f"{proxy.proxy_url}/version") as response:
        await response.read()
    assert len(access_lines(loud)) == 1

    quiet = capture_logs(format="json", access=False)
    async with client.get(f"{proxy.proxy_url}/version") as response:
        await response.read()
    assert access_lines(quiet) == []


async def test_a_client_request_id_is_forwarded_as_sent_and_logged(
    capture_logs: Capture, standins: Standins, proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    output = capture_logs(format="json")
    async with client.get(
        f"{proxy.proxy_url}/echo", headers={"X-Request-ID": "client-id-42"}
    ) as response:
        await response.read()

    assert standins.skill_engine.received[-1].header_values("X-Request-ID") == ["client-id-42"]
    assert "X-Request-ID" not in response.headers  # the client knows its own id
    assert access_lines(output)[0]["request_id"] == "client-id-42"


async def test_without_one_a_request_id_is_made_sent_upstream_and_returned(
    standins: Standins, proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{proxy.proxy_url}/echo") as first:
        await first.read()
    async with client.get(f"{proxy.proxy_url}/echo") as second:
        await second.read()

    sent = [received.header_values("X-Request-ID") for received in standins.skill_engine.received]
    assert sent[-2:] == [[first.headers["X-Request-ID"]], [second.headers["X-Request-ID"]]]
    assert first.headers["X-Request-ID"] != second.headers["X-Request-ID"]


async def test_an_upstream_request_id_in_the_answer_is_not_doubled(
    start_standins: StartStandins, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    routes = web.RouteTableDef()

    @routes.get("/own-id")
    async def own_id(request: web.Request) -> web.Response:
        return web.Response(headers={"X-Request-ID": "upstream-" + request.headers["X-Request-ID"]})

    standins = await start_standins(routes)
    proxy = await start_proxy(standins.settings())
    async with client.get(f"{proxy.proxy_url}/own-id") as response:
        values = response.headers.getall("X-Request-ID")
    assert len(values) == 1
    assert values[0].startswith("upstream-")


async def test_lifecycle_events_are_logged_at_info(
    capture_logs: Capture, standins: Standins, start_proxy: StartProxy
) -> None:
    output = capture_logs(format="json")
    proxy = await start_proxy(standins.settings())
    async with aiohttp.ClientSession() as client, client.get(f"{proxy.admin_url}/readyz"):
        pass
    await proxy.stop()

    messages = [line["message"] for line in json_lines(output) if line["level"] == "INFO"]
    assert any(message.startswith("Listening on") for message in messages)
    fetched = next(message for message in messages if message.startswith("Token fetched"))
    assert f"tenant {TENANT}" in fetched
    assert "valid for 3600 s, fingerprint" in fetched
    assert any(message.startswith("Stopping") for message in messages)
    assert "Stopped." in messages


def assert_nothing_secret(text: str, tokens: set[str]) -> None:
    """`text` holds none of the stand-ins' secrets, none of `tokens`, and none of the
    credentials the tests send."""
    assert len(tokens) >= 2  # at least the first token and its replacement after a 401
    for secret in (
        SECRET,
        NEXT_SECRET,
        *tokens,
        "client-own-token",
        "cookie-value",
        "set-cookie-value",
        "proxy-credential",
        "query-value",
    ):
        assert secret not in text


def replayed(proxy: ProxyServer) -> float | None:
    return proxy.metrics.registry.get_sample_value(
        "skill_engine_proxy_upstream_unauthorized_total",
        {"tenant": TENANT, "outcome": "replayed"},
    )


@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_no_secret_token_or_cookie_in_any_log_at_debug(
    log_format: str,
    capture_logs: Capture,
    start_standins: StartStandins,
    start_proxy: StartProxy,
) -> None:
    """Every path a request takes, at DEBUG: success, replay after a 401, cookies both
    ways, token endpoint failures and rejections (echoing the secret), refused requests."""
    output = capture_logs(level="debug", format=log_format)
    routes = web.RouteTableDef()

    @routes.get("/cookie")
    async def cookie(_request: web.Request) -> web.Response:
        response = web.Response(text="ok")
        response.headers.add("Set-Cookie", "session=set-cookie-value")
        return response

    standins = await start_standins(routes)
    proxy = await start_proxy(standins.settings())
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as client:
        for path, headers in [
            ("/version", {"Authorization": "Bearer client-own-token"}),
            ("/cookie", {"Cookie": "session=cookie-value"}),
            ("/echo?q=query-value", {"Proxy-Authorization": "Basic proxy-credential"}),
        ]:
            async with client.get(f"{proxy.proxy_url}{path}", headers=headers) as response:
                assert response.status == 200

        tokens = set(standins.tokens.issued)
        standins.tokens.revoke_all()  # the next request meets a 401 and is replayed
        async with client.get(f"{proxy.proxy_url}/version") as response:
            assert response.status == 200
        assert replayed(proxy) == 1

        async with client.request("TRACE", f"{proxy.proxy_url}/version") as response:
            assert response.status == 400

    rejecting = await start_proxy(standins.settings(client_secret="wrong-" + SECRET))
    standins.tokens.answer_next(
        Answer(401, {"error": "access_denied", "error_description": "bad: wrong-" + SECRET}), 5
    )
    async with aiohttp.ClientSession() as client, client.get(f"{rejecting.proxy_url}/v") as answer:
        assert answer.status == 503

    assert "Token fetched" in output.getvalue()
    assert_nothing_secret(output.getvalue(), tokens | set(standins.tokens.issued))


@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_no_secret_or_token_in_any_log_at_debug_through_reload_rotation_and_drain(
    log_format: str,
    capture_logs: Capture,
    standins: Standins,
    start_proxy: StartProxy,
    tmp_path: Path,
) -> None:
    """The operator's paths, at DEBUG: a file token store, a 401 replayed through it, a
    reload (as on SIGHUP) that brings in the next secret as the current one is revoked,
    and the drain."""
    output = capture_logs(level="debug", format=log_format)
    document = settings_document(standins.token_url, standins.upstream_url)
    document["token_store"] = {"backend": "file", "path": str(tmp_path / "tokens")}
    config = write_config(tmp_path / "config.yaml", document)
    settings = load_settings(config)
    proxy = await start_proxy(settings)
    # Reloads come when asked, as on SIGHUP; the file watcher is left out of it.
    source = ConfigSource(str(config), settings)
    reloader = Reloader(source, settings, proxy.reconfigure, interval=3600)
    reloader.start()
    async with aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.proxy_url}/version") as response:
            assert response.status == 200
        assert list((tmp_path / "tokens").glob("*.json"))  # the token went through the store

        tokens = set(standins.tokens.issued)
        standins.tokens.revoke_all()
        async with client.get(f"{proxy.proxy_url}/version") as response:
            assert response.status == 200
        assert replayed(proxy) == 1

        standins.tokens.client_secret = NEXT_SECRET  # the current secret is revoked
        document["auth"]["client_secret_next"] = NEXT_SECRET
        write_config(config, document)
        reloader.request("SIGHUP")
        await eventually(lambda: "client_secret_next worked" in output.getvalue(), "rotation")
        async with client.get(f"{proxy.proxy_url}/version") as response:
            assert response.status == 200
    await reloader.close()
    await proxy.drain()
    await proxy.stop()

    sent = [request.json()["client_secret"] for request in standins.tokens.requests]
    assert sent[-2:] == [SECRET, NEXT_SECRET]  # the current one refused, the next one taken
    text = output.getvalue()
    for event in ("Reloaded the config", "Draining", "Stopped."):
        assert event in text
    assert_nothing_secret(text, tokens | set(standins.tokens.issued))


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture(params=["orjson", "json"])
def serializer(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Each JSON serializer of the access log: orjson (the speed extra), or the json module."""
    if request.param == "orjson":
        pytest.importorskip("orjson")
    else:
        monkeypatch.setattr(proxy.logs, "orjson", None)  # as without the speed extra
    return str(request.param)


async def test_access_lines_of_one_loop_turn_leave_in_one_write(serializer: str) -> None:
    stream = CountingStream()
    log = AccessLog()
    log.configure(LogSettings(format="json"), stream, worker=3)
    for path in ("/a", "/b", "/c"):
        log.write(AccessRecord.begin("id"), method="GET", path=path, status=200, tenant=TENANT)
    assert stream.writes == 0

    await asyncio.sleep(0)
    assert stream.writes == 1
    lines = json_lines(stream)
    assert [line["path"] for line in lines] == ["/a", "/b", "/c"]
    assert {line["worker"] for line in lines} == {3}
    for line in lines:
        assert datetime.fromisoformat(line["time"]).utcoffset() == timedelta(0)
        assert line["message"] == f"GET {line['path']} 200"


async def test_access_and_operations_lines_share_their_shape(
    capture_logs: Capture, standins: Standins, start_proxy: StartProxy
) -> None:
    output = capture_logs(format="json")
    proxy = await start_proxy(standins.settings())
    async with aiohttp.ClientSession() as client, client.get(f"{proxy.proxy_url}/version"):
        pass

    lines = json_lines(output)
    operations = next(line for line in lines if line["logger"] == "skill_engine_proxy")
    (access,) = access_lines(output)
    for line in (operations, access):
        assert {"time", "level", "logger", "message"} <= set(line)
        assert datetime.fromisoformat(line["time"]).utcoffset() == timedelta(0)
    assert access["level"] == "INFO"


async def test_a_turn_of_many_lines_leaves_in_writes_a_pipe_keeps_whole() -> None:
    stream = CountingStream()
    log = AccessLog()
    log.configure(LogSettings(format="json"), stream, worker=None)
    record = AccessRecord.begin("id")
    for number in range(100):
        log.write(record, method="GET", path=f"/{number}", status=200, tenant=TENANT)
    written: list[str] = []
    stream.write = lambda text: written.append(text) or len(text)  # type: ignore[method-assign]
    await asyncio.sleep(0)

    assert len(written) > 1
    assert all(len(text.encode()) <= 4096 for text in written)
    assert [json.loads(line)["path"] for line in "".join(written).splitlines()] == [
        f"/{number}" for number in range(100)
    ]


async def test_an_access_line_that_cannot_be_written_fails_no_request() -> None:
    stream = io.StringIO()
    log = AccessLog()
    log.configure(LogSettings(format="json"), stream, worker=None)
    stream.close()
    log.write(AccessRecord.begin("id"), method="GET", path="/", status=200, tenant=TENANT)
    await asyncio.sleep(0)
    log.flush()  # nothing raised


@pytest.mark.parametrize("log_format", ["json", "text"])
async def test_a_request_id_that_is_not_utf8_is_logged_escaped_and_answered(
    log_format: str,
    serializer: str,
    capture_logs: Capture,
    proxy: ProxyServer,
) -> None:
    output = capture_logs(format=log_format)
    response = await raw_exchange(
        proxy.proxy_url,
        b"GET /version HTTP/1.1\r\nHost: x\r\nX-Request-ID: a\xff\r\nConnection: close\r\n\r\n",
    )
    # The header cannot be forwarded unchanged: the proxy's own 400, never a 500.
    assert response.status == 400
    assert response.header_values("X-Skill-Engine-Proxy-Error") == ["bad_request"]
    assert response.header_values("X-Request-ID") == ["a\\xff"]
    await asyncio.sleep(0)
    if log_format == "json":
        (line,) = access_lines(output)
        assert line["request_id"] == "a\\xff"
        assert line["status"] == 400
    else:
        assert "request_id=a\\xff\n" in output.getvalue()


@pytest.mark.parametrize(
    "target",
    [b"http://user:hunter2@elsewhere.example/x?q=1", b"user:hunter2@elsewhere.example:443"],
)
async def test_credentials_in_a_refused_target_reach_no_log_and_no_answer(
    target: bytes, capture_logs: Capture, proxy: ProxyServer
) -> None:
    output = capture_logs(level="debug", format="json")
    method = b"CONNECT" if b"://" not in target else b"GET"
    response = await raw_exchange(
        proxy.proxy_url,
        method + b" " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    assert response.status == 400
    await asyncio.sleep(0)
    assert "hunter2" not in output.getvalue()
    assert b"hunter2" not in response.body
    (line,) = access_lines(output)
    assert "elsewhere.example" in line["path"]


async def test_a_request_id_the_connection_header_names_still_reaches_the_upstream(
    capture_logs: Capture, standins: Standins, proxy: ProxyServer
) -> None:
    output = capture_logs(format="json")
    await raw_exchange(
        proxy.proxy_url,
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close, X-Request-ID\r\n"
        b"X-Request-ID: mine\r\n\r\n",
    )
    await asyncio.sleep(0)
    assert standins.skill_engine.received[-1].header_values("X-Request-ID") == ["mine"]
    assert access_lines(output)[0]["request_id"] == "mine"
