"""`run --workers N`: processes sharing listeners, tokens and metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import tempfile
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import Standins, StartStandins
from tests.support import (
    TENANT,
    HeldRoute,
    opened_by_reader,
    proxy_command,
    sample,
    samples,
    settings_document,
    subprocess_env,
    write_and_close,
    write_config,
)


@dataclass
class Supervisor:
    process: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    async def wait_for(self, pattern: str, count: int = 1) -> list[re.Match[str]]:
        for _ in range(3000):
            found = list(re.finditer(pattern, self.log))
            if len(found) >= count:
                return found
            assert self.process.returncode is None, self.log
            await asyncio.sleep(0.01)
        raise AssertionError(f"never logged {pattern!r}:\n{self.log}")


@asynccontextmanager
async def workers(config: Path, count: int = 2) -> AsyncIterator[Supervisor]:
    """`run --workers` in a session of its own (its own process group, as under systemd),
    killed with its workers afterwards if it still runs."""
    process = await asyncio.create_subprocess_exec(
        *proxy_command("run", "--config", str(config), "--workers", str(count)),
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
        start_new_session=True,
    )
    supervisor = Supervisor(process)

    async def collect() -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            supervisor.lines.append(line.decode())

    collecting = asyncio.create_task(collect())
    try:
        yield supervisor
    finally:
        with contextlib.suppress(ProcessLookupError):  # the whole group: workers too
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        await collecting


@pytest.fixture
async def supervisor(tmp_path: Path, standins: Standins) -> AsyncIterator[Supervisor]:
    document = settings_document(standins.token_url, standins.upstream_url)
    config = write_config(tmp_path / "workers.yaml", document)
    async with workers(config) as supervisor:
        yield supervisor


ACCESS_LINE = r"skill_engine_proxy\.access \[worker (\d)\]: GET /version 200"


async def listening(supervisor: Supervisor) -> tuple[str, str]:
    found = await supervisor.wait_for(
        r"\[worker \d\]: Listening on (\S+) \(admin: (\S+), event loop", 2
    )
    assert {match.groups() for match in found} == {found[0].groups()}  # one address, shared
    return found[0].group(1), found[0].group(2)


async def test_two_workers_serve_share_one_token_and_sum_their_metrics(
    supervisor: Supervisor, standins: Standins
) -> None:
    proxy_url, admin_url = await listening(supervisor)
    metrics_dir = (await supervisor.wait_for(r"metrics through (\S+)\."))[0].group(1)

    # A new connection per request: the kernel spreads connections over the workers.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(100):
            async with session.get(f"{proxy_url}/version") as response:
                assert response.status == 200
        # A request is counted just before its access line is written.
        served = await supervisor.wait_for(ACCESS_LINE, 100)
        async with session.get(f"{admin_url}/metrics") as response:
            text = await response.text()

    assert len(standins.tokens.requests) == 1
    by_worker = Counter(match.group(1) for match in served)
    assert set(by_worker) == {"0", "1"}, by_worker  # both workers served
    # Whichever worker answered /metrics, it reports the requests of both.
    counted = [
        value
        for (name, _), value in samples(text).items()
        if name == "skill_engine_proxy_requests_total"
    ]
    assert sum(counted) == 100
    assert (
        sample(text, "skill_engine_proxy_requests_total", tenant=TENANT, method="GET", status="200")
        == 100
    )

    supervisor.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(supervisor.process.wait(), timeout=30) == 0
    assert not Path(metrics_dir).exists()


async def test_a_worker_that_dies_is_replaced(supervisor: Supervisor) -> None:
    proxy_url, _ = await listening(supervisor)
    first = int((await supervisor.wait_for(r"Worker 0 started \(pid (\d+)\)"))[0].group(1))
    os.kill(first, signal.SIGKILL)
    await supervisor.wait_for(r"Worker 0 exited with status -9")
    await supervisor.wait_for(r"Worker 0 started \(pid (\d+)\)", 2)
    await supervisor.wait_for(r"\[worker 0\]: Listening on", 2)

    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(20):
            async with session.get(f"{proxy_url}/version") as response:
                assert response.status == 200
    supervisor.process.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(supervisor.process.wait(), timeout=30) == 0


async def test_sighup_reaches_every_worker_even_one_just_started(supervisor: Supervisor) -> None:
    await listening(supervisor)
    first = int((await supervisor.wait_for(r"Worker 0 started \(pid (\d+)\)"))[0].group(1))
    os.kill(first, signal.SIGKILL)
    await supervisor.wait_for(r"Worker 0 started \(pid (\d+)\)", 2)
    # Worker 0 is starting again: the SIGHUP waits for its handler instead of killing it.
    supervisor.process.send_signal(signal.SIGHUP)
    await supervisor.wait_for(r"\[worker \d\]: Reloaded the config", 2)
    assert "exited with status -1" not in supervisor.log  # SIGHUP is signal 1
    supervisor.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(supervisor.process.wait(), timeout=30) == 0


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


async def test_workers_stop_when_their_supervisor_is_killed(supervisor: Supervisor) -> None:
    await listening(supervisor)
    pids = [int(match.group(1)) for match in await supervisor.wait_for(r"started \(pid (\d+)\)", 2)]
    supervisor.process.kill()
    await supervisor.process.wait()
    for _ in range(3000):
        if not any(alive(pid) for pid in pids):
            break
        await asyncio.sleep(0.01)
    assert not any(alive(pid) for pid in pids)
    assert "The supervisor is gone; stopping." in supervisor.log


async def test_workers_share_a_unix_socket(tmp_path: Path, standins: Standins) -> None:
    path = tmp_path / "proxy.sock"
    route_path = tmp_path / "route.sock"
    document = settings_document(standins.token_url, standins.upstream_url)
    document["listen"] = f"unix:{path}"
    # A route's own unix socket: bound by the supervisor too, and known to every worker's
    # router as that route's listener.
    document["routes"] = [
        {"listen": f"unix:{route_path}", "tenant": "default"},
        {"prefix": "/main", "tenant": "default"},
    ]
    config = write_config(tmp_path / "unix.yaml", document)
    process = await asyncio.create_subprocess_exec(
        *proxy_command("run", "--config", str(config), "--workers", "2"),
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
    )
    supervisor = Supervisor(process)
    assert process.stderr is not None
    while len(re.findall(r"\[worker \d\]: Listening on", supervisor.log)) < 2:
        line = await asyncio.wait_for(process.stderr.readline(), timeout=30)
        assert line, supervisor.log
        supervisor.lines.append(line.decode())

    statuses = []
    for socket_path, target in [(path, "/main/version"), (route_path, "/version")]:
        connector = aiohttp.UnixConnector(path=str(socket_path), force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(10):
                async with session.get(f"http://localhost{target}") as response:
                    statuses.append(response.status)
    assert statuses == [200] * 20
    process.send_signal(signal.SIGTERM)
    await process.communicate()
    assert process.returncode == 0
    assert not path.exists()
    assert not route_path.exists()


@pytest.mark.parametrize("shared", ["listen", "admin_listen"])
async def test_a_second_proxy_on_a_taken_address_exits_1_and_the_first_keeps_it(
    tmp_path: Path, start_standins: StartStandins, shared: str
) -> None:
    ours, theirs = await start_standins(), await start_standins()
    first_config = write_config(
        tmp_path / "first.yaml", settings_document(ours.token_url, ours.upstream_url)
    )
    async with workers(first_config) as first:
        proxy_url, admin_url = await listening(first)
        document = settings_document(theirs.token_url, theirs.upstream_url, tenant="another")
        document[shared] = (proxy_url if shared == "listen" else admin_url).removeprefix("http://")
        async with workers(write_config(tmp_path / "second.yaml", document)) as second:
            assert await asyncio.wait_for(second.process.wait(), timeout=30) == 1
        assert f"Cannot listen on {document[shared]}" in second.log
        assert "Worker 0 started" not in second.log

        # A new connection per request: none of them reaches the other proxy.
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(50):
                async with session.get(f"{proxy_url}/version") as response:
                    assert response.status == 200
        assert len(ours.skill_engine.received) == 50
        assert not theirs.skill_engine.received
        assert not theirs.tokens.requests


async def refuses_connections(url: str) -> bool:
    """Whether connecting to `url` is refused, once the listeners had a moment to close."""
    host, _, port = url.removeprefix("http://").rpartition(":")
    for _ in range(500):
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 5)
        except ConnectionRefusedError:
            return True
        except TimeoutError:
            continue
        writer.close()
        await writer.wait_closed()
        await asyncio.sleep(0.01)
    return False


async def test_sigterm_to_the_whole_process_group_drains_and_exits_0(
    tmp_path: Path, start_standins: StartStandins
) -> None:
    held = HeldRoute()
    standins = await start_standins(held.routes())
    document = settings_document(standins.token_url, standins.upstream_url)
    async with (
        workers(write_config(tmp_path / "group.yaml", document)) as supervisor,
        aiohttp.ClientSession() as client,
    ):
        proxy_url, _ = await listening(supervisor)

        async def slow_call() -> tuple[int, str]:
            async with client.get(f"{proxy_url}/slow") as response:
                return response.status, await response.text()

        in_flight = asyncio.create_task(slow_call())
        await held.arrived.wait()
        # As systemd, `timeout` or `kill -TERM -PGID` do: each worker gets SIGTERM
        # directly, and again from the supervisor. The supervisor is held meanwhile, so
        # that its SIGTERM reaches each worker after the worker's own, never merged with it.
        os.kill(supervisor.process.pid, signal.SIGSTOP)
        os.killpg(supervisor.process.pid, signal.SIGTERM)
        await supervisor.wait_for(r"\[worker \d\]: Received SIGTERM\.", 2)
        os.kill(supervisor.process.pid, signal.SIGCONT)
        await supervisor.wait_for(r"Received SIGTERM: the workers drain and stop")
        await supervisor.wait_for(r"\[worker \d\]: Stopping: no new connections", 2)
        assert await refuses_connections(proxy_url)

        held.release.set()
        assert await in_flight == (200, "finished")
        assert await asyncio.wait_for(supervisor.process.wait(), timeout=30) == 0
    assert "without draining" not in supervisor.log
    assert "exited with status" not in supervisor.log


async def test_a_sighup_while_the_supervisor_starts_does_not_end_it(
    tmp_path: Path, standins: Standins
) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    document = settings_document(standins.token_url, standins.upstream_url)
    async with workers(fifo) as supervisor:
        # Reading its config: past its imports, before its SIGHUP handler is in place.
        config = await opened_by_reader(fifo, supervisor.process)
        supervisor.process.send_signal(signal.SIGHUP)
        write_and_close(config, document)
        proxy_url, _ = await listening(supervisor)
        async with aiohttp.ClientSession() as client, client.get(f"{proxy_url}/version") as got:
            assert got.status == 200
        supervisor.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(supervisor.process.wait(), timeout=30) == 0


async def test_a_second_signal_stops_at_once_and_leaves_no_token_behind(
    supervisor: Supervisor,
) -> None:
    tokens_before = set(Path(tempfile.gettempdir()).glob("skill-engine-proxy-tokens-*"))
    proxy_url, _ = await listening(supervisor)
    metrics_dir = (await supervisor.wait_for(r"metrics through (\S+)\."))[0].group(1)
    async with aiohttp.ClientSession() as session, session.get(f"{proxy_url}/version") as answer:
        assert answer.status == 200  # the token is in the shared directory now

    supervisor.process.send_signal(signal.SIGTERM)
    await supervisor.wait_for(r"the workers drain and stop")
    supervisor.process.send_signal(signal.SIGTERM)
    assert await asyncio.wait_for(supervisor.process.wait(), timeout=30) == 1
    assert "stopping the workers at once" in supervisor.log
    assert not Path(metrics_dir).exists()
    assert set(Path(tempfile.gettempdir()).glob("skill-engine-proxy-tokens-*")) <= tokens_before


async def test_the_supervisor_logs_in_the_configured_format(
    tmp_path: Path, standins: Standins
) -> None:
    document = settings_document(standins.token_url, standins.upstream_url)
    document["log"] = {"format": "json"}
    async with workers(write_config(tmp_path / "json.yaml", document)) as supervisor:
        await supervisor.wait_for(r'"message": "Listening on', 2)
        supervisor.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(supervisor.process.wait(), timeout=30) == 0
    for line in supervisor.lines:
        assert isinstance(json.loads(line), dict), line


async def test_an_unusable_token_store_stops_the_supervisor_with_one_error(
    tmp_path: Path, standins: Standins
) -> None:
    """Each worker would fail alike, and be restarted, and fail again: the supervisor
    checks the store before it starts any."""
    document = settings_document(standins.token_url, standins.upstream_url)
    document["log"] = {"format": "json"}
    document["token_store"] = {"backend": "file", "path": str(tmp_path / "file" / "store")}
    (tmp_path / "file").write_text("in the way")
    process = await asyncio.create_subprocess_exec(
        *proxy_command(
            "run", "--workers", "2", "--config", str(write_config(tmp_path / "c.yaml", document))
        ),
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 1
    lines = [json.loads(line) for line in stderr.decode().splitlines()]
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert [error["message"].split(":")[0] for error in errors] == ["token_store.path"]
