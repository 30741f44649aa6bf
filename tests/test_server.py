"""The server's lifecycle in this process: draining on stop, listen errors."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import re
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.config import ListenAddress, LogSettings, Settings, ShutdownSettings
from proxy.errors import ListenError
from proxy.logs import AccessRecord, access_log
from proxy.server import ProxyServer, StopSignals
from tests.conftest import Standins, StartProxy, StartStandins
from tests.support import HeldRoute, connect, raw_exchange, read_to_close, settings_document


async def test_stop_lets_in_flight_requests_finish_and_reports_not_ready(
    start_standins: StartStandins, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    held = HeldRoute()
    standins = await start_standins(held.routes())
    proxy = await start_proxy(standins.settings())

    async def slow_call() -> tuple[int, str]:
        async with client.get(f"{proxy.proxy_url}/slow") as response:
            return response.status, await response.text()

    in_flight = asyncio.create_task(slow_call())
    await held.arrived.wait()
    stopping = asyncio.create_task(proxy.stop())

    async with client.get(f"{proxy.admin_url}/readyz") as response:
        assert response.status == 503
        assert "draining" in await response.text()
    with pytest.raises(aiohttp.ClientConnectionError):
        async with client.get(f"{proxy.proxy_url}/version"):
            pass

    held.release.set()
    assert await in_flight == (200, "finished")
    await stopping


async def test_a_taken_port_is_a_listen_error(
    standins: Standins, proxy: ProxyServer, start_proxy: StartProxy
) -> None:
    port = proxy.proxy_url.rsplit(":", 1)[1]
    settings = standins.settings().model_copy(
        update={"listen": ListenAddress("127.0.0.1", int(port))}
    )
    with pytest.raises(ListenError, match=f"Cannot listen on 127.0.0.1:{port}"):
        await start_proxy(settings)


async def test_requests_still_in_flight_after_the_grace_period_are_cut_off(
    start_standins: StartStandins,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    held = HeldRoute()
    standins = await start_standins(held.routes())
    settings = standins.settings()
    proxy = await start_proxy(
        settings.model_copy(update={"shutdown": ShutdownSettings(drain_delay=0, timeout=0.2)})
    )

    async def stuck_call() -> int:
        async with client.get(f"{proxy.proxy_url}/slow") as response:
            return response.status

    in_flight = asyncio.create_task(stuck_call())
    await held.arrived.wait()
    await proxy.stop()

    with pytest.raises(aiohttp.ClientConnectionError):
        await in_flight
    assert "1 requests still in flight after 0.2 s; cutting them off" in caplog.text
    assert not held.release.is_set()


async def test_a_unix_socket_is_served_and_removed_on_stop(
    standins: Standins, start_proxy: StartProxy, tmp_path: Path
) -> None:
    path = tmp_path / "proxy.sock"
    proxy = await start_proxy(
        standins.settings().model_copy(update={"listen": ListenAddress(path=str(path))})
    )
    assert proxy.proxy_url == f"unix:{path}"
    connector = aiohttp.UnixConnector(path=str(path))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get("http://localhost/version") as response,
    ):
        assert response.status == 200
    await proxy.stop()
    assert not path.exists()


async def test_a_unix_socket_another_proxy_serves_is_not_taken_over(
    standins: Standins, start_proxy: StartProxy, tmp_path: Path
) -> None:
    settings = standins.settings().model_copy(
        update={"listen": ListenAddress(path=str(tmp_path / "proxy.sock"))}
    )
    first = await start_proxy(settings)
    with pytest.raises(ListenError, match="another process is serving on it"):
        await start_proxy(settings)
    assert first.proxy_url == f"unix:{tmp_path / 'proxy.sock'}"
    assert (tmp_path / "proxy.sock").is_socket()


async def test_a_leftover_socket_file_is_reclaimed_and_a_regular_file_is_not(
    standins: Standins, start_proxy: StartProxy, tmp_path: Path
) -> None:
    leftover = tmp_path / "left.sock"
    with socket.socket(socket.AF_UNIX) as dead:
        dead.bind(str(leftover))  # bound, never listening: what a killed process leaves
    reclaimed = await start_proxy(
        standins.settings().model_copy(update={"listen": ListenAddress(path=str(leftover))})
    )
    assert reclaimed.proxy_url == f"unix:{leftover}"

    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    with pytest.raises(ListenError, match="is not a socket"):
        await start_proxy(
            standins.settings().model_copy(update={"listen": ListenAddress(path=str(regular))})
        )
    assert regular.read_text() == "keep me"


def accepts_connections(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        return probe.connect_ex(str(path)) == 0


async def test_a_draining_proxy_leaves_its_successors_unix_socket_alone(
    start_standins: StartStandins, start_proxy: StartProxy, tmp_path: Path
) -> None:
    held = HeldRoute()
    standins = await start_standins(held.routes())
    path = tmp_path / "proxy.sock"
    settings = standins.settings().model_copy(update={"listen": ListenAddress(path=str(path))})
    old = await start_proxy(settings)

    connector = aiohttp.UnixConnector(path=str(path))
    async with aiohttp.ClientSession(connector=connector) as session:
        slow = asyncio.create_task(session.get("http://localhost/slow"))
        await held.arrived.wait()
        draining = asyncio.create_task(old.stop())
        while accepts_connections(path):  # noqa: ASYNC110 - until the old listener closes
            await asyncio.sleep(0.01)
        assert path.is_socket()  # its socket file stays until the drain ends
        new = await start_proxy(settings)
        held.release.set()
        (await slow).release()
        await draining

    assert path.is_socket()
    connector = aiohttp.UnixConnector(path=str(path))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.get("http://localhost/version") as response,
    ):
        assert response.status == 200
    assert new.proxy_url == f"unix:{path}"


async def test_a_malformed_request_is_logged_without_its_bytes(
    proxy: ProxyServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    response = await raw_exchange(
        proxy.proxy_url,
        b"GET /x?apikey=QUERY-VALUE HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer CLIENT-CRED\x01\r\nConnection: close\r\n\r\n",
    )
    assert response.status == 400
    assert "QUERY-VALUE" not in caplog.text
    assert "CLIENT-CRED" not in caplog.text
    assert "Refused a malformed request" in caplog.text


@pytest.mark.parametrize(("configured", "mode"), [(None, 0o660), ("0600", 0o600), (0o666, 0o666)])
async def test_unix_sockets_get_the_configured_mode(
    tmp_path: Path,
    standins: Standins,
    start_proxy: StartProxy,
    configured: object,
    mode: int,
) -> None:
    document = settings_document(standins.token_url, standins.upstream_url)
    document["listen"] = f"unix:{tmp_path / 'proxy.sock'}"
    document["admin_listen"] = f"unix:{tmp_path / 'admin.sock'}"
    if configured is not None:
        document["unix_socket_mode"] = configured
    await start_proxy(Settings.model_validate(document))
    for name in ("proxy.sock", "admin.sock"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == mode


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """All the server sends until it closes the connection (long before the test's own
    timeout, where a client that is slow to send its head is dropped)."""
    return await asyncio.wait_for(reader.read(), timeout=30)


async def test_a_client_slow_to_send_its_request_head_is_closed_while_others_are_served(
    standins: Standins, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    document = settings_document(standins.token_url, standins.upstream_url)
    document["client_header_timeout"] = 0.5
    proxy = await start_proxy(Settings.model_validate(document))
    connections = []
    for url in (proxy.proxy_url, proxy.proxy_url, proxy.admin_url):
        host, port = url.removeprefix("http://").rsplit(":", 1)
        connections.append(await asyncio.open_connection(host, int(port)))
    (half, half_writer), (silent, _), (admin, admin_writer) = connections
    half_writer.write(b"GET /version HTTP/1.1\r\nHost: proxy\r\n")  # no blank line: unfinished
    admin_writer.write(b"GET /metrics HTTP/1.1\r\n")

    async with client.get(f"{proxy.proxy_url}/version") as response:
        assert response.status == 200
    assert await closed_by_server(half) == b""
    assert await closed_by_server(silent) == b""
    assert await closed_by_server(admin) == b""
    for _, writer in connections:
        writer.close()


async def test_a_kept_alive_connection_gets_the_same_time_for_its_next_request_head(
    standins: Standins, start_proxy: StartProxy
) -> None:
    document = settings_document(standins.token_url, standins.upstream_url)
    document["client_header_timeout"] = 0.5
    proxy = await start_proxy(Settings.model_validate(document))
    host, port = proxy.proxy_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /version HTTP/1.1\r\nHost: proxy\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    length = int(re.search(rb"Content-Length: (\d+)", head, re.IGNORECASE).group(1))  # type: ignore[union-attr]
    await reader.readexactly(length)

    writer.write(b"GET /version HTTP/1.1\r\n")
    assert await closed_by_server(reader) == b""
    writer.close()


async def test_an_impatient_second_signal_still_writes_the_waiting_access_lines(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stream = io.StringIO()
    access_log.configure(LogSettings(format="json"), stream, worker=None)
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)  # the process edge, not the event loop
    try:
        stops = StopSignals(signals=(signal.SIGUSR1,))
        stops._on_signal(signal.SIGUSR1)
        access_log.write(AccessRecord.begin("id"), method="GET", path="/", status=200, tenant="t")
        stops._on_signal(signal.SIGUSR1)  # before the event loop's turn ends
        assert exits == [1]
        assert '"path":"/"' in stream.getvalue().replace(" ", "")
    finally:
        access_log.configure(LogSettings(access=False), sys.stderr, None)


def test_the_collector_skips_what_start_and_reloads_leave_and_collects_their_garbage() -> None:
    """`serve` settles the collector after start and after each reload; run in a process
    of its own, as freezing would reach every later test in this one."""
    script = """
import gc
import weakref
from proxy.server import YOUNG_COLLECTION_THRESHOLD, settle_garbage_collector
class Node:
    pass
def cycle():
    node = Node()
    node.itself = node
    return weakref.ref(node)
before = gc.get_threshold()
start_garbage = cycle()
settle_garbage_collector()
frozen = gc.get_freeze_count()
assert frozen > 1000, frozen
assert gc.get_threshold() == (YOUNG_COLLECTION_THRESHOLD, *before[1:]), gc.get_threshold()
assert start_garbage() is None, "start-up garbage was frozen, not collected"
config = Node()
config.itself = config
replaced = weakref.ref(config)
settle_garbage_collector()
del config
settle_garbage_collector()
assert replaced() is None, "what a reload replaced stayed frozen"
assert gc.get_freeze_count() > 1000, gc.get_freeze_count()
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.stdout == "ok\n", done.stderr


def test_a_proxy_server_made_before_its_event_loop_runs_then_serves_in_it() -> None:
    """Nothing in the constructor needs a running loop: an embedding program may make the
    server first and run it in a loop it starts later."""
    closed = "http://127.0.0.1:9"  # the discard port: nothing answers, nothing is sent
    server = ProxyServer(Settings.model_validate(settings_document(closed, closed)))

    async def serve_once() -> int:
        await server.start()
        try:
            async with (
                aiohttp.ClientSession() as client,
                client.get(f"{server.admin_url}/healthz") as answer,
            ):
                return answer.status
        finally:
            await server.stop()

    assert asyncio.run(serve_once()) == 200


async def refused(url: str) -> bool:
    try:
        _, writer = await connect(url)
    except ConnectionError:  # refused, or reset as the listener closed
        return True
    writer.close()
    return False


async def test_an_upload_in_flight_when_the_stop_begins_is_read_to_its_end(
    standins: Standins, proxy: ProxyServer
) -> None:
    reader, writer = await connect(proxy.proxy_url)
    writer.write(
        b"POST /sink HTTP/1.1\r\nHost: proxy\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"
    )
    await writer.drain()
    in_flight = "skill_engine_proxy_requests_in_flight"
    for _ in range(1000):
        if proxy.metrics.registry.get_sample_value(in_flight) == 1:
            break
        await asyncio.sleep(0.01)
    stopping = asyncio.create_task(proxy.stop())
    for _ in range(1000):
        if await refused(proxy.proxy_url):
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the stop has moved on to waiting for what is in flight

    try:
        answer = await read_to_close(reader, writer, b"6\r\nsecond\r\n0\r\n\r\n")
    finally:
        await stopping
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer
    assert b"\r\nConnection: close" in head
    assert b'"bytes": 11' in body


async def test_at_the_stop_idle_connections_close_and_busy_ones_after_their_answer(
    start_standins: StartStandins, start_proxy: StartProxy
) -> None:
    """A kept-alive connection idle when the stop begins takes no request any more: one
    forwarded late in the drain could be cut off at its end, after the upstream acted."""
    held = HeldRoute()
    standins = await start_standins(held.routes())
    proxy = await start_proxy(standins.settings())
    idle_reader, idle_writer = await connect(proxy.proxy_url)
    idle_writer.write(b"GET /version HTTP/1.1\r\nHost: proxy\r\n\r\n")
    first = await idle_reader.readuntil(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 ")
    length = re.search(rb"Content-Length: (\d+)", first)
    assert length
    await idle_reader.readexactly(int(length[1]))
    busy_reader, busy_writer = await connect(proxy.proxy_url)
    busy_writer.write(b"GET /slow HTTP/1.1\r\nHost: proxy\r\n\r\n")
    await held.arrived.wait()

    stopping = asyncio.create_task(proxy.stop())
    try:
        assert await asyncio.wait_for(idle_reader.read(), timeout=10) == b""  # closed
        held.release.set()
        answer = await read_to_close(busy_reader, busy_writer, b"")
    finally:
        held.release.set()
        idle_writer.close()
        await stopping
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b"\r\nConnection: close" in answer
    assert answer.endswith(b"finished")
