"""The command line as a user runs it: separate processes, real signals, exit statuses."""

from __future__ import annotations

import asyncio
import json
import os
import re
import resource
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
import yaml
from aiohttp import web

from proxy import __version__
from proxy.server import has_uvloop
from tests.conftest import Standins, StartStandins
from tests.support import (
    LISTENING,
    SECRET,
    HeldRoute,
    Running,
    alias_bomb,
    collect_lines,
    console_script,
    opened_by_reader,
    proxy_command,
    running_command,
    running_proxy,
    sample,
    settings_document,
    subprocess_env,
    write_and_close,
    write_config,
)


async def run_command(*arguments: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *proxy_command(*arguments),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


@pytest.fixture
def config_for(tmp_path: Path) -> Callable[..., Path]:
    def write(standins: Standins, **auth: object) -> Path:
        document = settings_document(standins.token_url, standins.upstream_url, **auth)
        return write_config(tmp_path / "config.yaml", document)

    return write


async def test_version() -> None:
    status, stdout, _ = await run_command("--version")
    assert status == 0
    assert stdout.strip() == f"skill-engine-proxy {__version__}"


async def test_run_serves_until_sigterm_and_exits_0(
    standins: Standins, config_for: Callable[..., Path]
) -> None:
    async with running_proxy(config_for(standins)) as proxy:
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"{proxy.proxy_url}/version") as response,
        ):
            assert response.status == 200
        assert await proxy.stop() == 0

    start_line = next(line for line in proxy.stderr if "Listening on" in line)
    assert standins.upstream_url in start_line
    assert standins.token_url in start_line
    assert SECRET not in proxy.log
    [token] = standins.tokens.issued
    assert token not in proxy.log


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
async def test_run_serves_on_the_event_loop_asked_for(
    standins: Standins, config_for: Callable[..., Path], loop: str
) -> None:
    async with running_proxy(config_for(standins), "--loop", loop) as proxy:
        assert proxy.event_loop == loop
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"{proxy.proxy_url}/version") as response,
        ):
            assert response.status == 200
        assert await proxy.stop() == 0


async def test_run_takes_uvloop_when_it_is_installed(
    standins: Standins, config_for: Callable[..., Path]
) -> None:
    async with running_proxy(config_for(standins)) as proxy:
        assert proxy.event_loop == ("uvloop" if has_uvloop() else "asyncio")


async def test_asking_for_uvloop_without_it_installed_exits_2(
    tmp_path: Path, standins: Standins, config_for: Callable[..., Path]
) -> None:
    hidden = tmp_path / "no-uvloop" / "uvloop"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('uvloop is not installed here')\n")
    process = await asyncio.create_subprocess_exec(
        *proxy_command("run", "--config", str(config_for(standins)), "--loop", "uvloop"),
        stderr=asyncio.subprocess.PIPE,
        env={**subprocess_env(), "PYTHONPATH": str(hidden.parent)},
    )
    _, stderr = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 2
    assert b"install skill-engine-proxy[speed]" in stderr


async def test_sigterm_lets_the_request_in_flight_finish(
    start_standins: StartStandins, config_for: Callable[..., Path]
) -> None:
    held = HeldRoute()
    standins = await start_standins(held.routes())
    async with running_proxy(config_for(standins)) as proxy, aiohttp.ClientSession() as client:

        async def slow_call() -> tuple[int, str]:
            async with client.get(f"{proxy.proxy_url}/slow") as response:
                return response.status, await response.text()

        in_flight = asyncio.create_task(slow_call())
        await held.arrived.wait()
        proxy.process.send_signal(signal.SIGTERM)
        await proxy.wait_for_log("Stopping")
        held.release.set()
        assert await in_flight == (200, "finished")
        assert await asyncio.wait_for(proxy.process.wait(), timeout=30) == 0


async def test_sigterm_turns_readyz_503_and_serves_on_for_the_drain_delay(
    tmp_path: Path, standins: Standins
) -> None:
    document = settings_document(standins.token_url, standins.upstream_url)
    document["shutdown"] = {"drain_delay": 3, "timeout": 5}
    config = write_config(tmp_path / "drain.yaml", document)
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as client:
        for _ in range(1000):  # ready once the token fetched at start is in hand
            async with client.get(f"{proxy.admin_url}/readyz") as ready:
                if ready.status == 200:
                    break
            await asyncio.sleep(0.01)
        assert ready.status == 200
        proxy.process.send_signal(signal.SIGTERM)
        await proxy.wait_for_log("Draining")
        async with client.get(f"{proxy.admin_url}/readyz") as draining:
            assert draining.status == 503
            assert "draining" in await draining.text()
        async with client.get(f"{proxy.proxy_url}/version") as response:
            assert response.status == 200  # still served while load balancers catch up
        assert await asyncio.wait_for(proxy.process.wait(), timeout=30) == 0
    assert proxy.log.index("Draining") < proxy.log.index("Stopping: no new connections")


async def test_a_second_sigterm_during_the_drain_exits_at_once(
    tmp_path: Path, standins: Standins
) -> None:
    document = settings_document(standins.token_url, standins.upstream_url)
    document["shutdown"] = {"drain_delay": 600}
    config = write_config(tmp_path / "drain.yaml", document)
    async with running_proxy(config) as proxy:
        proxy.process.send_signal(signal.SIGTERM)
        await proxy.wait_for_log("Draining")
        assert await proxy.stop(signal.SIGINT) == 1
    assert "exiting without draining" in proxy.log


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"client_id": None}, "auth.client_id: input should be a valid string"),
        ({"tenant": ""}, "auth.tenant: string should have at least 1 character"),
        ({"token_url": "http://auth.example/oauth/token"}, "auth.token_url: the token URL uses"),
        ({"client_secret": "${NOT_SET_ANYWHERE}"}, "environment variable NOT_SET_ANYWHERE"),
        ({"upstream": {"read_timeout": "soon"}}, "upstream.read_timeout: input should be"),
    ],
)
async def test_a_config_error_exits_2_with_one_line_naming_the_key(
    standins: Standins, config_for: Callable[..., Path], auth: dict[str, object], expected: str
) -> None:
    config = config_for(standins, **auth)
    await exits_2_with_one_line(config, f"{config}: ", expected)


async def test_an_alias_bomb_is_refused_with_exit_2_naming_the_key(
    standins: Standins, config_for: Callable[..., Path]
) -> None:
    config = config_for(standins)
    document = json.loads(config.read_text())
    config.write_text(yaml.safe_dump(document) + alias_bomb(7))
    await exits_2_with_one_line(
        config, f"{config}: lol.l5[0]: the YAML aliases expand to more than 100000 values"
    )
    assert not standins.tokens.requests


async def test_admin_listen_on_the_listen_address_exits_2_naming_the_key(
    standins: Standins, config_for: Callable[..., Path]
) -> None:
    with socket.socket() as probe:  # a port nothing listens on, so that only the clash counts
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    config = config_for(standins)
    document = json.loads(config.read_text())
    document["listen"] = document["admin_listen"] = address
    write_config(config, document)
    await exits_2_with_one_line(config, f"{config}: admin_listen: {address} is already taken")


async def exits_2_with_one_line(config: Path, *expected: str) -> None:
    """`run` and `check` with `config` refuse it: exit 2, one line on stderr with `expected`."""
    for command in ("run", "check"):
        status, stdout, stderr = await run_command(command, "--config", str(config))
        assert status == 2
        assert stdout == ""
        assert len(stderr.strip().splitlines()) == 1, stderr
        for text in expected:
            assert text in stderr
        assert SECRET not in stderr


async def test_the_config_path_can_come_from_the_environment(
    standins: Standins, config_for: Callable[..., Path]
) -> None:
    process = await asyncio.create_subprocess_exec(
        *proxy_command("check"),
        stdout=asyncio.subprocess.PIPE,
        env={**subprocess_env(), "SKILL_ENGINE_PROXY_CONFIG": str(config_for(standins))},
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0, stdout
    assert b"/version answered 200" in stdout


async def test_no_config_at_all_exits_2() -> None:
    status, _, stderr = await run_command("run")
    assert status == 2
    assert "SKILL_ENGINE_PROXY_CONFIG" in stderr


async def test_check_succeeds_against_a_working_setup(
    standins: Standins, config_for: Callable[..., Path]
) -> None:
    status, stdout, _ = await run_command("check", "--config", str(config_for(standins)))
    assert status == 0, stdout
    assert "ok: token for tenant" in stdout
    assert "/version answered 200" in stdout
    assert [received.raw_path for received in standins.skill_engine.received] == ["/version"]
    assert SECRET not in stdout


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"client_secret": "wrong-secret"}, "rejected the client credentials"),
        ({"upstream": {"url": "http://127.0.0.1:9/"}}, "FAILED: GET http://127.0.0.1:9/version"),
        ({"audience": "other.techwolf.ai"}, "Service not found"),
    ],
)
async def test_check_fails_with_the_reason(
    standins: Standins, config_for: Callable[..., Path], auth: dict[str, object], expected: str
) -> None:
    status, stdout, _ = await run_command("check", "--config", str(config_for(standins, **auth)))
    assert status == 1
    assert expected in stdout
    assert "wrong-secret" not in stdout


async def test_check_reports_a_redirect_as_a_failure_not_where_it_leads(
    start_standins: StartStandins, config_for: Callable[..., Path]
) -> None:
    routes = web.RouteTableDef()

    @routes.get("/moved/version")
    async def moved(_request: web.Request) -> web.Response:
        raise web.HTTPFound("/version")

    standins = await start_standins(routes)
    config = config_for(standins, upstream={"url": f"{standins.upstream_url}/moved"})
    status, stdout, _ = await run_command("check", "--config", str(config))
    assert status == 1
    assert "/moved/version answered 302: redirect to '/version'" in stdout
    assert len(stdout.splitlines()) == 2


async def test_check_never_prints_the_token_an_upstream_echoes(
    start_standins: StartStandins, config_for: Callable[..., Path]
) -> None:
    routes = web.RouteTableDef()

    @routes.get("/echoing/version")
    async def echoing(request: web.Request) -> web.Response:
        return web.Response(text=f"you sent {request.headers['Authorization']}")

    @routes.get("/redirecting/version")
    async def redirecting(request: web.Request) -> web.Response:
        token = request.headers["Authorization"].removeprefix("Bearer ")
        raise web.HTTPFound(f"/elsewhere?token={token}")

    standins = await start_standins(routes)
    config = config_for(standins, upstream={"url": f"{standins.upstream_url}/echoing"})
    status, stdout, _ = await run_command("check", "--config", str(config))
    assert status == 0
    assert "you sent Bearer <token " in stdout

    config = config_for(standins, upstream={"url": f"{standins.upstream_url}/redirecting"})
    status, redirected, _ = await run_command("check", "--config", str(config))
    assert status == 1
    assert "redirect to '/elsewhere?token=<token " in redirected
    for token in standins.tokens.issued:
        assert token not in stdout + redirected


async def test_check_fails_when_the_upstream_refuses_the_token(
    start_standins: StartStandins, config_for: Callable[..., Path]
) -> None:
    standins = await start_standins()
    standins.tokens.is_valid = lambda token: False  # type: ignore[method-assign]
    status, stdout, _ = await run_command("check", "--config", str(config_for(standins)))
    assert status == 1
    assert "/version answered 401" in stdout


@asynccontextmanager
async def running_demo(*arguments: str) -> AsyncIterator[str]:
    """`demo` with `arguments`; yields what it printed up to "Ctrl-C", then sends SIGINT
    and checks that it exits 0."""
    process = await asyncio.create_subprocess_exec(
        *proxy_command("demo", *arguments),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
    )
    assert process.stdout is not None
    assert process.stderr is not None
    stderr: list[str] = []
    reader = asyncio.create_task(collect_lines(process.stderr, stderr))
    try:
        printed = ""
        while "Ctrl-C" not in printed:
            line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
            assert line, "".join(stderr)
            printed += line.decode()
        yield printed
        process.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(process.wait(), timeout=30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await reader


async def test_demo_answers_the_readme_curl_and_stops_on_ctrl_c() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    async with (
        running_demo("--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0") as printed,
        aiohttp.ClientSession() as client,
    ):
        curls = re.findall(r"curl -s (http://\S+)(?: -d '([^']*)')?", printed)
        assert len(curls) == 2
        async with client.get(curls[0][0]) as response:
            assert response.status == 200
            answer = await response.text()
        assert answer in readme  # the README shows what the demo answers
        echo_url, body = curls[1]
        async with client.post(echo_url, data=body.encode()) as response:
            echoed = await response.json()
        assert echoed["body_bytes"] == len(body)
        assert echoed["token_fingerprint"]
        metrics_url = re.search(r"Metrics: (\S+)", printed)
        assert metrics_url
        async with client.get(metrics_url.group(1)) as response:
            assert "skill_engine_proxy_token_fetches_total" in await response.text()


async def test_demo_on_a_unix_socket_prints_curl_lines_that_work(tmp_path: Path) -> None:
    path = tmp_path / "demo.sock"
    async with running_demo("--listen", f"unix:{path}", "--admin-listen", "127.0.0.1:0") as printed:
        match = re.search(r"curl -s --unix-socket (\S+) (http://localhost/version)", printed)
        assert match, printed
        connector = aiohttp.UnixConnector(path=match.group(1))
        async with (
            aiohttp.ClientSession(connector=connector) as client,
            client.get(match.group(2)) as response,
        ):
            assert response.status == 200
    assert not path.exists()


@pytest.mark.parametrize("log_format", ["text", "json"])
async def test_a_taken_port_exits_1_saying_so_in_the_logs_format(
    standins: Standins, config_for: Callable[..., Path], log_format: str
) -> None:
    async with running_proxy(config_for(standins)) as first:
        port = first.proxy_url.rsplit(":", 1)[1]
        document = settings_document(standins.token_url, standins.upstream_url)
        document["listen"] = f"127.0.0.1:{port}"
        document["log"] = {"format": log_format}
        config = write_config(Path(str(config_for(standins)) + ".second.yaml"), document)
        status, _, stderr = await run_command("run", "--config", str(config))
    assert status == 1
    last = stderr.strip().splitlines()[-1]
    assert f"Cannot listen on 127.0.0.1:{port}" in last
    if log_format == "json":
        assert json.loads(last)["level"] == "ERROR"


async def test_a_demo_on_a_taken_port_says_how_to_choose_another() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        status, _, stderr = await run_command("demo", "--listen", address)
    assert status == 1
    assert f"Cannot listen on {address}" in stderr
    assert "--listen" in stderr


def _vm_kib(pid: int, field_name: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field_name}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field_name} for {pid}")


async def _upload(client: aiohttp.ClientSession, url: str, size: int) -> dict[str, object]:
    block = b"u" * (256 * 1024)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(size // len(block)):
            yield block

    async with client.post(url, data=body()) as response:
        assert response.status == 200
        answer: dict[str, object] = await response.json()
        return answer


async def _download(client: aiohttp.ClientSession, url: str) -> int:
    received = 0
    async with client.get(url) as response:
        assert response.status == 200
        async for chunk in response.content.iter_chunked(256 * 1024):
            received += len(chunk)
    return received


async def test_200_mib_streams_each_way_without_the_proxy_growing_with_it(
    standins: Standins, config_for: Callable[..., Path]
) -> None:
    size = 200 * 1024 * 1024
    async with running_proxy(config_for(standins)) as proxy, aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.proxy_url}/bytes/1024") as response:
            assert response.status == 200
        baseline = _vm_kib(proxy.process.pid, "VmRSS")

        assert await _download(client, f"{proxy.proxy_url}/bytes/{size}") == size
        uploaded = await _upload(client, f"{proxy.proxy_url}/sink", size)
        assert uploaded["bytes"] == size

        growth_mib = (_vm_kib(proxy.process.pid, "VmHWM") - baseline) / 1024
        assert growth_mib < 32, f"the proxy grew by {growth_mib:.0f} MiB for 200 MiB each way"
        assert await proxy.stop() == 0


async def test_a_sighup_while_run_starts_becomes_a_reload_not_its_end(
    tmp_path: Path, standins: Standins
) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    document = settings_document(standins.token_url, standins.upstream_url)
    process = await asyncio.create_subprocess_exec(
        console_script(),
        *("run", "--config", str(fifo)),
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
    )
    assert process.stderr is not None
    proxy = Running(process)
    reader = asyncio.create_task(collect_lines(process.stderr, proxy.stderr))
    try:
        # Reading its config: past its imports, before its SIGHUP handler is in place.
        config = await opened_by_reader(fifo, process)
        process.send_signal(signal.SIGHUP)
        write_and_close(config, document)
        await proxy.wait_for_log("Listening on")
        # The SIGHUP waited for the handler, and reloads: the config is read again.
        write_and_close(await opened_by_reader(fifo, process), document)
        await proxy.wait_for_log("Reloaded the config")

        match = LISTENING.search(proxy.log)
        assert match, proxy.log
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"{match.group(1)}/version") as response,
        ):
            assert response.status == 200
        assert await proxy.stop() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await reader


async def test_run_holds_sighup_before_it_imports_the_proxy() -> None:
    # Importing proxy.cli takes about half a second: SIGHUP's default action must not
    # have that long to end the process. The mask is read as the import begins.
    code = """if True:
        import importlib.abc, signal, sys
        import proxy.__main__ as entry

        class Watch(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "proxy.cli":
                    held = signal.pthread_sigmask(signal.SIG_BLOCK, set())
                    print("held" if signal.SIGHUP in held else "not held", flush=True)
                return None

        sys.meta_path.insert(0, Watch())
        sys.argv = ["skill-engine-proxy", "run"]
        entry.main()
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=subprocess_env(),
    )
    stdout, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert stdout.decode().split() == ["held"]


async def until_in_flight(client: aiohttp.ClientSession, admin_url: str, count: int) -> None:
    for _ in range(1000):
        async with client.get(f"{admin_url}/metrics") as response:
            text = await response.text()
        if sample(text, "skill_engine_proxy_requests_in_flight") >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never {count} requests in flight")


async def test_a_request_still_waiting_for_a_token_when_the_stop_gives_up_gets_503(
    tmp_path: Path, standins: Standins
) -> None:
    standins.tokens.gate.clear()  # the token endpoint never answers
    document = settings_document(standins.token_url, standins.upstream_url)
    document["shutdown"] = {"drain_delay": 0, "timeout": 0.5}
    config = write_config(tmp_path / "stop.yaml", document)
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as client:
        waiting = asyncio.create_task(client.get(f"{proxy.proxy_url}/version"))
        await until_in_flight(client, proxy.admin_url, 1)
        proxy.process.send_signal(signal.SIGTERM)
        async with await waiting as response:
            assert response.status == 503
            assert (await response.json())["error"] == "token_unavailable"
            assert response.headers["X-Skill-Engine-Proxy-Error"] == "token_unavailable"
        assert await asyncio.wait_for(proxy.process.wait(), timeout=30) == 0
    assert "1 requests still in flight after 0.5 s" in proxy.log
    assert re.search(r"skill_engine_proxy\.access: GET /version 503 ", proxy.log), proxy.log


async def test_a_request_the_stop_cuts_off_upstream_is_closed_and_logged_as_499(
    tmp_path: Path, start_standins: StartStandins
) -> None:
    held = HeldRoute()
    standins = await start_standins(held.routes())
    document = settings_document(standins.token_url, standins.upstream_url)
    document["shutdown"] = {"drain_delay": 0, "timeout": 0.5}
    config = write_config(tmp_path / "stop.yaml", document)
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as client:
        cut_off = asyncio.create_task(client.get(f"{proxy.proxy_url}/slow"))
        await held.arrived.wait()
        proxy.process.send_signal(signal.SIGTERM)
        # The upstream may have acted on it: no answer rather than one that says otherwise.
        with pytest.raises(aiohttp.ClientConnectionError):
            await cut_off
        assert await asyncio.wait_for(proxy.process.wait(), timeout=30) == 0
    assert re.search(r"skill_engine_proxy\.access: GET /slow 499 ", proxy.log), proxy.log


def with_open_file_limit(soft: int, hard: int, command: list[str]) -> list[str]:
    """`command`, run with these limits on open files (set, then exec'd)."""
    code = (
        "import os, resource, sys; "
        "resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[1]), int(sys.argv[2]))); "
        "os.execv(sys.argv[3], sys.argv[3:])"
    )
    return [sys.executable, "-c", code, str(soft), str(hard), *command]


def open_file_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError(f"no open file limit for {pid}")


async def test_run_raises_its_open_file_limit_to_the_hard_limit(
    tmp_path: Path, standins: Standins
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 512:
        pytest.skip(f"a hard limit of {hard} open files leaves nothing to raise")
    document = settings_document(standins.token_url, standins.upstream_url)
    document["log"] = {"format": "text", "level": "debug"}
    config = write_config(tmp_path / "limit.yaml", document)
    command = with_open_file_limit(256, hard, [console_script(), "run", "--config", str(config)])
    async with running_command(command, subprocess_env()) as proxy:
        assert open_file_limits(proxy.process.pid) == (hard, hard)
        assert await proxy.stop() == 0
    assert f"Open file limit raised from 256 to {hard}, the hard limit." in proxy.log


async def test_accepting_without_descriptors_left_is_logged_once_not_per_attempt(
    tmp_path: Path, standins: Standins
) -> None:
    config = write_config(
        tmp_path / "limit.yaml", settings_document(standins.token_url, standins.upstream_url)
    )
    # asyncio's own loop is the one that reports each failed accept (uvloop reports none).
    async with running_proxy(config, "--loop", "asyncio") as proxy:
        pid = proxy.process.pid
        room = len(os.listdir(f"/proc/{pid}/fd")) + 8
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (room, room))
        host, port = proxy.proxy_url.removeprefix("http://").rsplit(":", 1)
        idle = [await asyncio.open_connection(host, int(port)) for _ in range(40)]
        await proxy.wait_for_log("Cannot accept new connections")

        for _, writer in idle:
            writer.close()
        async with (
            aiohttp.ClientSession() as client,
            client.get(f"{proxy.proxy_url}/version") as response,
        ):
            assert response.status == 200  # served again once connections closed
        assert await proxy.stop() == 0
    assert proxy.log.count("Cannot accept new connections") == 1
    assert "out of system resource" not in proxy.log
    assert "Traceback" not in proxy.log, proxy.log
