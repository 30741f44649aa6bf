"""What several test modules share: settings, a raw HTTP client, a fake clock, metric reads."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.config import Settings

# The stand-in's credentials; tests grep logs and answers for them.
CLIENT_ID = "standin-client"
SECRET = "standin-secret"
AUDIENCE = "standin.techwolf.ai"
TENANT = "acme_test"


def settings_document(standin_token_url: str, upstream_url: str, **auth: Any) -> dict[str, Any]:
    """A config document for the stand-ins; `auth` keys override the defaults, and
    `upstream` holds keys of the upstream section. Logs are text (tests read them as a
    person would) and a stop does not wait for load balancers."""
    upstream = auth.pop("upstream", {})
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "log": {"format": "text"},
        "shutdown": {"drain_delay": 0},
        "upstream": {"url": upstream_url, **upstream},
        "auth": {
            "token_url": standin_token_url,
            "client_id": CLIENT_ID,
            "client_secret": SECRET,
            "audience": AUDIENCE,
            "tenant": TENANT,
            **auth,
        },
    }


def make_settings(standin_token_url: str, upstream_url: str, **auth: Any) -> Settings:
    return Settings.model_validate(settings_document(standin_token_url, upstream_url, **auth))


class FakeClock:
    """A monotonic clock the test moves by hand; sleepers wake when it passes their moment."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []
        self.sleeps = 0

    def now(self) -> float:
        return self._now

    async def sleep_until(self, moment: float) -> None:
        self.sleeps += 1
        if moment <= self._now:
            return
        future = asyncio.get_running_loop().create_future()
        self._sleepers.append((moment, future))
        await future

    def next_wake(self) -> float:
        """The earliest moment a sleeper still waits for."""
        return min(moment for moment, future in self._sleepers if not future.done())

    def advance(self, seconds: float) -> None:
        self._now += seconds
        waiting = []
        for moment, future in self._sleepers:
            if moment <= self._now:
                if not future.done():
                    future.set_result(None)
            elif not future.done():
                waiting.append((moment, future))
        self._sleepers = waiting


async def eventually(condition: Callable[[], object], what: str = "the condition") -> None:
    """Wait until `condition` holds: work in the background, over real sockets or in another
    process, takes a moment."""
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened: {what}")


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    head: bytes = field(repr=False, default=b"")

    def header_values(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key.lower() == name.lower()]


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection of its own to the `http://host:port` of `url`."""
    match = re.match(r"http://([^:/]+):(\d+)", url)
    assert match, url
    return await asyncio.open_connection(match.group(1), int(match.group(2)))


async def read_to_close(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes
) -> bytes:
    """Send `data`, then read until the other end closes (10 s at most); close this end."""
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()


async def raw_exchange(url: str, request: bytes) -> RawResponse:
    """Send `request` byte for byte on a new connection; read the answer until it closes."""
    answer = await read_to_close(*await connect(url), request)
    while answer.startswith(b"HTTP/1.1 1"):  # interim answers such as 100 Continue
        answer = answer.partition(b"\r\n\r\n")[2]
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = [tuple(line.split(": ", 1)) for line in lines]
    return RawResponse(int(status_line.split()[1]), headers, body, head)  # type: ignore[arg-type]


def samples(metrics_text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, keyed by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def sample(metrics_text: str, name: str, **labels: str) -> float:
    return samples(metrics_text).get((name, tuple(sorted(labels.items()))), 0.0)


@dataclass
class HeldRoute:
    """`GET /slow` on an upstream: it answers only once the test releases it."""

    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    def routes(self) -> web.RouteTableDef:
        routes = web.RouteTableDef()

        @routes.get("/slow")
        async def slow(_request: web.Request) -> web.Response:
            self.arrived.set()
            await self.release.wait()
            return web.Response(text="finished")

        return routes


def alias_bomb(levels: int) -> str:
    """A few hundred bytes of YAML, a key `lol`, that stand for 9**levels values once its
    aliases are followed."""
    lines = ["lol:", "  l0: &l0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels + 1):
        lines.append(f"  l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def write_config(path: Path, document: dict[str, Any]) -> Path:
    path.write_text(json.dumps(document))  # JSON is YAML
    return path


async def opened_by_reader(fifo: Path, process: asyncio.subprocess.Process) -> int:
    """A descriptor to write to `fifo`, once `process` opened it to read (a config file
    that is a FIFO holds the process in its loading until the test writes it)."""
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        assert process.returncode is None
        await asyncio.sleep(0.01)


def write_and_close(descriptor: int, document: dict[str, Any]) -> None:
    try:
        os.write(descriptor, json.dumps(document).encode())  # less than a pipe holds
    finally:
        os.close(descriptor)


def proxy_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "proxy", *arguments]


def console_script() -> str:
    """The `skill-engine-proxy` command installed beside this Python."""
    return str(Path(sys.executable).parent / "skill-engine-proxy")


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


LISTENING = re.compile(r"Listening on (http://\S+) \(admin: (http://\S+), event loop: (\w+)\)")


@dataclass
class Running:
    """A proxy process and everything it has written to stderr so far."""

    process: asyncio.subprocess.Process
    proxy_url: str = ""
    admin_url: str = ""
    event_loop: str = ""
    stderr: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.stderr)

    async def wait_for_log(self, text: str) -> None:
        while text not in self.log:
            assert self.process.returncode is None, self.log
            await asyncio.sleep(0.02)

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        return await asyncio.wait_for(self.process.wait(), timeout=30)


async def collect_lines(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while line := await stream.readline():
        lines.append(line.decode())


@asynccontextmanager
async def running_proxy(config: Path, *options: str) -> AsyncIterator[Running]:
    """`skill-engine-proxy run --config` (the console script, as a user runs it), waited
    on until it says where it listens."""
    command = [console_script(), "run", "--config", str(config), *options]
    async with running_command(command, subprocess_env()) as running:
        yield running


@asynccontextmanager
async def running_command(command: list[str], env: dict[str, str]) -> AsyncIterator[Running]:
    """`command`, a proxy that serves, waited on until it says where it listens; killed
    afterwards if it still runs."""
    process = await asyncio.create_subprocess_exec(
        *command, stderr=asyncio.subprocess.PIPE, env=env
    )
    assert process.stderr is not None
    running = Running(process)
    reader = asyncio.create_task(collect_lines(process.stderr, running.stderr))
    try:
        await running.wait_for_log("Listening on")
        match = LISTENING.search(running.log)
        assert match, running.log
        running.proxy_url, running.admin_url, running.event_loop = match.groups()
        yield running
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await reader


class KeptAliveUpstream:
    """A raw server that keeps its connections open and answers each request on them (its
    body, if it has a Content-Length, read and dropped) with what `respond` makes of the
    request's head; it can push bytes nobody asked for on every connection it holds."""

    def __init__(self, respond: Callable[[bytes], Awaitable[bytes]]) -> None:
        self.connections: list[asyncio.StreamWriter] = []
        self._respond = respond
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.connections.append(writer)
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                while head := await reader.readuntil(b"\r\n\r\n"):
                    length = re.search(rb"\r\ncontent-length: *(\d+)", head, re.IGNORECASE)
                    if length:
                        await reader.readexactly(int(length.group(1)))
                    writer.write(await self._respond(head))
                    await writer.drain()

        self._server = await asyncio.start_server(serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def push(self, data: bytes) -> None:
        """Send `data` on every open connection, then give the proxy, which runs in this
        event loop, a moment to read it."""
        for writer in self.connections:
            writer.write(data)
            await writer.drain()
        await asyncio.sleep(0.05)

    async def close(self) -> None:
        for writer in self.connections:
            writer.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
