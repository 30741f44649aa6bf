"""Token stores: the file store across processes of one node, Redis across a fleet."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import Settings
from proxy.metrics import Metrics
from proxy.server import ProxyServer
from proxy.store import FileStore, TokenStoreError, key_digest
from proxy.tokens import SystemClock, Token, TokenKey, parse_token_response
from tests.conftest import Standins, StartProxy
from tests.support import (
    TENANT,
    FakeClock,
    eventually,
    proxy_command,
    sample,
    settings_document,
    subprocess_env,
    write_config,
)

KEY = TokenKey("https://token.example/oauth/token", "client", "aud", "tenant", ("read",))


def token(name: str, lifetime: float = 3600) -> Token:
    return parse_token_response(
        {"access_token": name, "expires_in": lifetime},
        obtained_at=time.monotonic(),
        wall_time=time.time(),
        endpoint="E",
    )


class Fetches:
    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, key: TokenKey) -> Token:
        self.count += 1
        return token(f"fetched-{self.count}")


def everything(_token: Token) -> bool:
    return True


def nothing(_token: Token) -> bool:
    return False


# The file store, in this process.


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    return tmp_path / "tokens"


async def test_a_fresh_stored_token_is_read_not_fetched(store_dir: Path) -> None:
    fetches = Fetches()
    first = FileStore(store_dir, Metrics(), SystemClock())
    second = FileStore(store_dir, Metrics(), SystemClock())
    fetched = await first.obtain(KEY, everything, fetches)
    read = await second.obtain(KEY, everything, fetches)
    assert fetches.count == 1
    assert read.fingerprint == fetched.fingerprint
    assert read.expires_at_wall == fetched.expires_at_wall


async def test_a_stored_token_that_is_not_fresh_is_replaced(store_dir: Path) -> None:
    fetches = Fetches()
    store = FileStore(store_dir, Metrics(), SystemClock())
    first = await store.obtain(KEY, everything, fetches)
    second = await store.obtain(KEY, nothing, fetches)
    assert second.fingerprint != first.fingerprint
    assert (await store.obtain(KEY, everything, fetches)).fingerprint == second.fingerprint
    assert fetches.count == 2


async def test_token_files_are_for_this_user_alone(store_dir: Path) -> None:
    await FileStore(store_dir, Metrics(), SystemClock()).obtain(KEY, everything, Fetches())
    assert stat.S_IMODE(store_dir.stat().st_mode) == 0o700
    token_file = store_dir / f"{key_digest(KEY)}.json"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert "client-secret" not in token_file.name


def open_to_others(path: Path) -> str:
    path.mkdir(mode=0o755)
    path.chmod(0o755)
    return "is open to other users (mode 0755); make it 0700"


def a_symlink(path: Path) -> str:
    (path.parent / "elsewhere").mkdir(mode=0o700)
    path.symlink_to(path.parent / "elsewhere")
    return "is a symbolic link; name a directory, not a link to one"


def a_dangling_symlink(path: Path) -> str:
    path.symlink_to(path.parent / "nowhere")
    return "is a symbolic link; name a directory, not a link to one"


def a_regular_file(path: Path) -> str:
    path.write_text("not a directory")
    return "is not a directory; name a directory, or a path to create"


def under_a_regular_file(path: Path) -> str:
    path.parent.rename(path.parent.with_name("moved"))
    path.parent.write_text("in the way")
    return "cannot be created: Not a directory"


def another_users(path: Path) -> str:
    if os.getuid() != 0:
        pytest.skip("only root can give a directory to another user")
    path.mkdir(mode=0o700)
    os.chown(path, 4321, -1)
    return f"belongs to another user (uid 4321); name a directory of this user (uid {os.getuid()})"


UNUSABLE_DIRECTORIES = [
    open_to_others,
    a_symlink,
    a_dangling_symlink,
    a_regular_file,
    under_a_regular_file,
    another_users,
]


@pytest.mark.parametrize("arrange", UNUSABLE_DIRECTORIES)
async def test_an_unusable_directory_is_refused_naming_the_key_and_the_path(
    tmp_path: Path, arrange: Callable[[Path], str]
) -> None:
    directory = tmp_path / "parent" / "tokens"
    directory.parent.mkdir()
    problem = arrange(directory)
    with pytest.raises(TokenStoreError) as refused:
        FileStore(directory, Metrics(), SystemClock())
    assert str(refused.value) == (
        f"token_store.path: the token store directory {directory} {problem}."
    )


@pytest.mark.parametrize("arrange", [open_to_others, a_symlink, a_regular_file])
async def test_run_with_an_unusable_directory_exits_1_naming_the_key_and_the_path(
    tmp_path: Path, standins: Standins, arrange: Callable[[Path], str]
) -> None:
    directory = tmp_path / "parent" / "tokens"
    directory.parent.mkdir()
    problem = arrange(directory)
    document = settings_document(standins.token_url, standins.upstream_url)
    document["token_store"] = {"backend": "file", "path": str(directory)}
    config = write_config(tmp_path / "config.yaml", document)
    process = await asyncio.create_subprocess_exec(
        *proxy_command("run", "--config", str(config)),
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 1
    message = f"token_store.path: the token store directory {directory} {problem}."
    assert stderr.decode().strip().endswith(message)


async def test_a_damaged_token_file_is_replaced(store_dir: Path) -> None:
    fetches = Fetches()
    store = FileStore(store_dir, Metrics(), SystemClock())
    await store.obtain(KEY, everything, fetches)
    (store_dir / f"{key_digest(KEY)}.json").write_text("{not json")
    assert (await store.obtain(KEY, everything, fetches)).fingerprint
    assert fetches.count == 2
    assert (await store.obtain(KEY, everything, fetches)).fingerprint
    assert fetches.count == 2


async def test_concurrent_obtains_fetch_once(store_dir: Path) -> None:
    fetches = Fetches()
    stores = [FileStore(store_dir, Metrics(), SystemClock()) for _ in range(5)]
    results = await asyncio.gather(*(store.obtain(KEY, everything, fetches) for store in stores))
    assert fetches.count == 1
    assert len({result.fingerprint for result in results}) == 1


# Proxies in this process sharing a file store.

EXPIRY = "skill_engine_proxy_token_expiry_timestamp_seconds"


async def expiry_gauge(proxy: ProxyServer) -> float:
    async with (
        aiohttp.ClientSession() as client,
        client.get(f"{proxy.admin_url}/metrics") as response,
    ):
        return sample(await response.text(), EXPIRY, tenant=TENANT, scopes="")


async def test_the_expiry_gauge_follows_tokens_taken_from_the_store(
    tmp_path: Path, standins: Standins, start_proxy: StartProxy
) -> None:
    # Renewed however long nobody sends a request: the clocks leap hours ahead.
    document = settings_document(standins.token_url, standins.upstream_url, idle_after=86400)
    document["token_store"] = {"backend": "file", "path": str(tmp_path / "tokens")}
    settings = Settings.model_validate(document)
    clocks = FakeClock(), FakeClock()
    first = await start_proxy(settings, clock=clocks[0])
    await eventually(lambda: len(standins.tokens.issued) == 1, "the first proxy's token")
    second = await start_proxy(settings, clock=clocks[1])
    await eventually(lambda: second.tokens.problem(key_of(second)) is None, "the stored token")

    # The second proxy read the first one's token, and exports its expiry all the same.
    expiry = await expiry_gauge(first)
    assert expiry > time.time()
    assert await expiry_gauge(second) == expiry
    assert len(standins.tokens.requests) == 1

    # The first proxy renews (with a longer life, so that the expiry surely moves)...
    standins.tokens.lifetime = 7200
    clocks[0].advance(3000)
    await eventually(lambda: len(standins.tokens.issued) == 2, "the renewal")
    await eventually_reads(lambda: expiry_gauge(first), lambda value: value > expiry)
    renewed = await expiry_gauge(first)
    assert await expiry_gauge(second) == expiry

    # ...and the second, due to renew in turn, takes the renewed token from the store.
    clocks[1].advance(3000)
    await eventually_reads(lambda: expiry_gauge(second), lambda value: value == renewed)
    assert len(standins.tokens.requests) == 2

    # The other way round: the first proxy, which fetched before, follows a renewal of the
    # second one's too.
    standins.tokens.lifetime = 10800
    clocks[1].advance(6000)
    await eventually(lambda: len(standins.tokens.issued) == 3, "the second renewal")
    await eventually_reads(lambda: expiry_gauge(second), lambda value: value > renewed)
    clocks[0].advance(6000)
    latest = await expiry_gauge(second)
    await eventually_reads(lambda: expiry_gauge(first), lambda value: value == latest)
    assert len(standins.tokens.requests) == 3


def key_of(proxy: ProxyServer) -> TokenKey:
    (key,) = proxy.tokens.held_keys()
    return key


async def eventually_reads(
    read: Callable[[], Awaitable[float]], holds: Callable[[float], bool]
) -> None:
    """Until what `read` gives satisfies `holds`."""
    for _ in range(1000):
        if holds(await read()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never happened; the last value was {await read()}")


# Processes of the proxy sharing tokens.


class Proxies:
    """Proxy processes started with `run`, each on its own port."""

    def __init__(self) -> None:
        self.processes: list[asyncio.subprocess.Process] = []
        self.urls: list[str] = []
        self.logs: list[list[str]] = []

    async def start(self, config: Path) -> str:
        process = await asyncio.create_subprocess_exec(
            *proxy_command("run", "--config", str(config)),
            stderr=asyncio.subprocess.PIPE,
            env=subprocess_env(),
        )
        assert process.stderr is not None
        lines: list[str] = []
        while True:
            line = (await asyncio.wait_for(process.stderr.readline(), timeout=30)).decode()
            assert line, "".join(lines)
            lines.append(line)
            if "Listening on " in line:
                break
        asyncio.get_running_loop().create_task(self._drain(process.stderr, lines))
        url = line.split("Listening on ", 1)[1].split()[0]
        self.processes.append(process)
        self.urls.append(url)
        self.logs.append(lines)
        return url

    async def _drain(self, stream: asyncio.StreamReader, lines: list[str]) -> None:
        while line := await stream.readline():
            lines.append(line.decode())

    async def stop(self) -> None:
        for process in self.processes:
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            await asyncio.wait_for(process.wait(), timeout=30)


@pytest.fixture
async def proxies() -> AsyncIterator[Proxies]:
    started = Proxies()
    yield started
    for process in started.processes:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def spread(urls: list[str], requests: int, path: str = "/echo") -> list[int]:
    """`requests` concurrent requests, spread round-robin over the proxies at `urls`."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def call(number: int) -> int:
            async with session.get(f"{urls[number % len(urls)]}{path}") as response:
                await response.read()
                return response.status

        return await asyncio.gather(*(call(number) for number in range(requests)))


def shared_config(tmp_path: Path, standins: Standins, name: str, **store: Any) -> Path:
    document = settings_document(
        standins.token_url, standins.upstream_url, prefetch=False, idle_after=0.5
    )
    document["token_store"] = store
    return write_config(tmp_path / name, document)


async def wait_out(standins: Standins) -> None:
    """Until every token the stand-in issued has expired."""
    latest = max(issued.expires_at for issued in standins.tokens.issued.values())
    while time.monotonic() < latest + 0.2:  # noqa: ASYNC110 - the stand-in's clock
        await asyncio.sleep(0.05)


async def test_four_processes_with_the_file_store_fetch_one_token(
    tmp_path: Path, standins: Standins, proxies: Proxies
) -> None:
    standins.tokens.lifetime = 3
    config = shared_config(
        tmp_path, standins, "file.yaml", backend="file", path=str(tmp_path / "tokens")
    )
    urls = [await proxies.start(config) for _ in range(4)]

    assert await spread(urls, 200) == [200] * 200
    assert len(standins.tokens.requests) == 1

    # Across an expiry: nobody renewed the idle token, and again one process fetches.
    await wait_out(standins)
    assert await spread(urls, 200) == [200] * 200
    assert len(standins.tokens.requests) == 2
    await proxies.stop()


async def test_processes_sharing_a_file_store_refresh_once_per_round(
    tmp_path: Path, standins: Standins, proxies: Proxies
) -> None:
    store = {"backend": "file", "path": str(tmp_path / "tokens")}
    await refresh_rounds(tmp_path, standins, proxies, store)


async def refresh_rounds(
    tmp_path: Path, standins: Standins, proxies: Proxies, store: dict[str, str]
) -> None:
    """Three processes sharing `store`, kept busy through one renewal round: one token
    request for the first token and one for its renewal, not one per process."""
    standins.tokens.lifetime = 4
    document = settings_document(
        standins.token_url,
        standins.upstream_url,
        refresh_at=0.5,
        refresh_margin=0.5,
        prefetch=False,  # the first token is the first request's, once all processes run
    )
    document["token_store"] = store
    config = write_config(tmp_path / "refresh.yaml", document)
    urls = [await proxies.start(config) for _ in range(3)]

    # Keep every process busy through one renewal round (at half the 4 s life).
    deadline = time.monotonic() + 3.2
    while time.monotonic() < deadline:
        assert await spread(urls, 6) == [200] * 6
        await asyncio.sleep(0.1)
    assert len(standins.tokens.requests) == 2  # fetched once, renewed once: not per process
    await proxies.stop()


# Redis.


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """A redis-server of this test's own, on a free port, that the test may stop."""

    def __init__(self) -> None:
        self.port = free_port()
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.process = await asyncio.create_subprocess_exec(
            shutil.which("redis-server") or "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            stdout=asyncio.subprocess.DEVNULL,
        )
        for _ in range(500):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.01)
                continue
            writer.close()
            return
        raise AssertionError("redis-server did not start")

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (Debian's redis-server package)")
    server = RedisServer()
    await server.start()
    yield server
    await server.stop()


async def test_three_processes_share_one_token_through_redis_encrypted(
    tmp_path: Path, standins: Standins, proxies: Proxies, redis_server: RedisServer
) -> None:
    import redis.asyncio

    config = shared_config(tmp_path, standins, "redis.yaml", backend="redis", url=redis_server.url)
    urls = [await proxies.start(config) for _ in range(3)]
    assert await spread(urls, 150) == [200] * 150
    assert len(standins.tokens.requests) == 1

    client = redis.asyncio.Redis.from_url(redis_server.url)
    try:
        names = await client.keys("skill-engine-proxy:token:*")
        [name] = [name for name in names if not name.endswith(b":lock")]
        value = await client.get(name)
        ttl = await client.pttl(name)
    finally:
        await client.aclose()
    [issued] = standins.tokens.issued
    assert issued.encode() not in value
    assert value.startswith(b"v1")
    assert 0 < ttl <= 3600 * 1000
    for log in proxies.logs:
        assert issued not in "".join(log)
    await proxies.stop()


async def test_redis_going_away_fails_no_request_and_sharing_resumes(
    tmp_path: Path, standins: Standins, proxies: Proxies, redis_server: RedisServer
) -> None:
    standins.tokens.lifetime = 2
    config = shared_config(tmp_path, standins, "redis.yaml", backend="redis", url=redis_server.url)
    urls = [await proxies.start(config) for _ in range(3)]
    assert await spread(urls, 60) == [200] * 60
    assert len(standins.tokens.requests) == 1

    await redis_server.stop()
    await wait_out(standins)
    assert await spread(urls, 60) == [200] * 60  # no request fails: each fetches alone
    assert 2 <= len(standins.tokens.requests) <= 4

    await redis_server.start()
    for log in proxies.logs:  # each process's probe finds Redis again
        await eventually(lambda log=log: "store works again" in "".join(log))
    await wait_out(standins)
    before = len(standins.tokens.requests)
    assert await spread(urls, 60) == [200] * 60
    assert len(standins.tokens.requests) == before + 1  # shared again
    await proxies.stop()
    for log in ["".join(log) for log in proxies.logs]:
        assert log.count("redis token store failed") == 1  # one WARNING for the outage
        assert log.count("store works again") == 1


async def test_processes_sharing_redis_refresh_once_per_fleet(
    tmp_path: Path, standins: Standins, proxies: Proxies, redis_server: RedisServer
) -> None:
    await refresh_rounds(tmp_path, standins, proxies, {"backend": "redis", "url": redis_server.url})


async def test_a_proxy_killed_holding_the_lock_holds_the_others_only_until_it_expires(
    tmp_path: Path, standins: Standins, proxies: Proxies, redis_server: RedisServer
) -> None:
    config = shared_config(
        tmp_path, standins, "lock.yaml", backend="redis", url=redis_server.url, lock_timeout=3
    )
    urls = [await proxies.start(config) for _ in range(3)]
    standins.tokens.gate.clear()  # token requests are held until the test opens the gate

    async with aiohttp.ClientSession() as session:

        async def status(url: str) -> int | None:
            try:
                async with session.get(f"{url}/echo") as response:
                    await response.read()
                    return response.status
            except aiohttp.ClientError:
                return None

        holder = asyncio.create_task(status(urls[0]))
        await eventually(lambda: len(standins.tokens.requests) == 1)  # it fetches, holding the lock
        others = [asyncio.create_task(status(url)) for url in urls[1:]]
        proxies.processes[0].kill()
        await proxies.processes[0].wait()
        standins.tokens.gate.set()
        assert await holder is None
        assert await asyncio.gather(*others) == [200, 200]

    # Once the dead one's lock expired, one of the others fetched, and the last one read.
    assert len(standins.tokens.requests) == 2
    await proxies.stop()


async def test_a_fetcher_that_dies_holding_the_lock_holds_the_others_only_until_it_expires(
    redis_server: RedisServer,
) -> None:
    import redis.asyncio

    from proxy.redis_store import RedisStore

    client = redis.asyncio.Redis.from_url(redis_server.url)
    store = RedisStore(
        redis_server.url, Metrics(), SystemClock(), lambda _key: "secret", lock_timeout=1
    )
    lock_name = f"skill-engine-proxy:token:{key_digest(KEY)}:lock"
    try:
        # A replica took the lock and died before it fetched or released it.
        assert await client.set(lock_name, b"dead-replica", nx=True, px=500)
        holders: list[bytes | None] = []

        async def fetch(key: TokenKey) -> Token:
            holders.append(await client.get(lock_name))
            return token("after-the-dead")

        obtained = await store.obtain(KEY, everything, fetch)
    finally:
        await store.close()
        await client.aclose()
    assert obtained.fingerprint
    # The store fetched holding the lock itself, taken over once the dead one expired.
    assert holders not in ([b"dead-replica"], [None])
    assert len(holders) == 1


# Redis down, slow or wrong: the outage is remembered, and told once.


class NotRedis:
    """A loopback server in Redis's place that accepts connections and then never answers
    (`answer` None) or answers whatever it is sent with `answer`, which is not Redis."""

    def __init__(self, answer: bytes | None) -> None:
        self.answer = answer
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(4096):
                if self.answer is not None:
                    writer.write(self.answer)
                    await writer.drain()
        writer.close()

    async def stop(self) -> None:
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()


def store_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.levelno == logging.WARNING and "token store failed" in record.getMessage()
    ]


def store_errors(metrics: Metrics) -> float:
    value = metrics.registry.get_sample_value(
        "skill_engine_proxy_token_store_errors_total", {"backend": "redis"}
    )
    return value or 0.0


@pytest.mark.parametrize(
    "answer", [None, b"HTTP/1.1 400 Bad Request\r\n\r\n"], ids=["silent", "nonsense"]
)
async def test_a_redis_that_hangs_or_talks_nonsense_costs_only_the_first_cold_fetch(
    standins: Standins,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
    answer: bytes | None,
) -> None:
    not_redis = NotRedis(answer)
    document = settings_document(standins.token_url, standins.upstream_url, prefetch=False)
    document["token_store"] = {"backend": "redis", "url": await not_redis.start()}
    # A clock that stands still: the back-off after the failure outlasts the test.
    proxy = await start_proxy(Settings.model_validate(document), clock=FakeClock())

    # Each scope set is a token key of its own, so every request is a cold fetch.
    statuses = []
    async with aiohttp.ClientSession() as client:
        for scopes in ("read", "write", "read_reports", "read write"):
            headers = {"X-Skill-Engine-Scopes": scopes}
            async with client.get(f"{proxy.proxy_url}/echo", headers=headers) as response:
                statuses.append(response.status)
            if scopes == "read":
                after_first = not_redis.connections
    await not_redis.stop()

    assert statuses == [200] * 4
    assert len(standins.tokens.requests) == 4
    assert after_first >= 1
    assert not_redis.connections == after_first  # the later fetches left Redis alone
    assert len(store_warnings(caplog)) == 1
    assert store_errors(proxy.metrics) >= 1


async def test_each_redis_outage_warns_once_and_is_counted_and_sharing_resumes(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    from proxy.redis_store import RETRY_AFTER, RedisStore

    caplog.set_level(logging.INFO, logger="skill_engine_proxy")
    metrics = Metrics()
    clock = FakeClock()  # the probe runs when the test moves it
    store = RedisStore(redis_server.url, metrics, clock, lambda _key: "secret")
    other = RedisStore(redis_server.url, Metrics(), SystemClock(), lambda _key: "secret")
    fetches = Fetches()
    try:
        await redis_server.stop()
        for _ in range(3):
            await store.obtain(KEY, nothing, fetches)
        assert fetches.count == 3
        assert store.is_down
        assert len(store_warnings(caplog)) == 1
        counted = store_errors(metrics)
        assert counted >= 1

        # The probe finds Redis still down: a failure counted, not warned about again.
        clock.advance(RETRY_AFTER)
        await eventually(lambda: store_errors(metrics) > counted)
        assert store.is_down
        assert len(store_warnings(caplog)) == 1

        # Redis is back: the next probe finds it, and tokens are shared again.
        await redis_server.start()
        clock.advance(RETRY_AFTER)
        await eventually(lambda: not store.is_down)
        assert caplog.text.count("store works again") == 1
        written = await store.obtain(KEY, nothing, fetches)
        read = await other.obtain(KEY, everything, fetches)
        assert read.fingerprint == written.fingerprint
        assert fetches.count == 4

        # A new outage is a new WARNING.
        counted = store_errors(metrics)
        await redis_server.stop()
        await store.obtain(KEY, nothing, fetches)
        assert len(store_warnings(caplog)) == 2
        assert store_errors(metrics) > counted
    finally:
        await store.close()
        await other.close()


async def test_a_token_is_written_to_redis_after_its_request_has_it(
    redis_server: RedisServer,
) -> None:
    from proxy.redis_store import RedisStore

    assert redis_server.process is not None
    metrics = Metrics()
    store = RedisStore(redis_server.url, metrics, SystemClock(), lambda _key: "secret")
    other = RedisStore(redis_server.url, Metrics(), SystemClock(), lambda _key: "secret")
    fetches = Fetches()

    async def fetch_then_freeze_redis(key: TokenKey) -> Token:
        redis_server.process.send_signal(signal.SIGSTOP)  # Redis hangs from now on
        return await fetches(key)

    try:
        obtained = await store.obtain(KEY, everything, fetch_then_freeze_redis)
        # The request has its token while the write still waits for Redis: had it waited
        # for the write, the write would have timed out and Redis would count as down.
        assert not store.is_down
        assert store_errors(metrics) == 0
        redis_server.process.send_signal(signal.SIGCONT)
        # The write goes through; the lock is released after it, so the other replica
        # reads the token rather than fetching one.
        read = await other.obtain(KEY, everything, fetches)
        assert read.fingerprint == obtained.fingerprint
        assert fetches.count == 1
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
        await store.close()
        await other.close()


async def test_a_token_redis_holds_under_another_secret_is_reported_once_per_secret(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    from proxy.redis_store import RedisStore

    secrets = {"old": "secret-1", "new": "secret-2"}
    old, new = (
        RedisStore(
            redis_server.url, Metrics(), SystemClock(), lambda _key, side=side: secrets[side]
        )
        for side in secrets
    )

    def unreadable() -> int:
        return caplog.text.count("cannot be read with this proxy's client secret")

    async def take_turns(*replicas: Any) -> None:
        # As mid-rotation: each replica finds the token the one before stored, cannot
        # read it, and fetches and stores its own.
        for replica in replicas:
            await replica.obtain(KEY, nothing, Fetches())

    try:
        await take_turns(old, new, old, new, old, new)
        assert unreadable() == 2  # once by each replica, not at every read

        secrets["old"] = secrets["new"]  # the old side has the new secret now
        await take_turns(new, old, new, old)
        assert unreadable() == 2

        secrets["new"] = "secret-3"  # the next rotation: said once more by each
        await take_turns(new, old, new, old, new, old)
        assert unreadable() == 4
    finally:
        await old.close()
        await new.close()
