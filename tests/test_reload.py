"""Reloading the config and rotating secrets without a restart."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import Settings, load_settings
from proxy.reload import ConfigSource, Reloader
from proxy.server import ProxyServer
from proxy.standins import Answer
from tests.conftest import Standins, StartProxy
from tests.support import (
    SECRET,
    TENANT,
    eventually,
    running_proxy,
    sample,
    settings_document,
    write_config,
)

NEW_SECRET = "rotated-secret"


class KubernetesSecret:
    """A directory laid out as the kubelet mounts a Secret: `name -> ..data/name`,
    `..data -> ..<timestamp>`, updated by swapping the `..data` symlink at once."""

    def __init__(self, directory: Path, name: str, value: str) -> None:
        self.directory = directory
        self.name = name
        self.generation = 0
        directory.mkdir()
        self.update(value)
        (directory / name).symlink_to(Path("..data") / name)

    @property
    def path(self) -> Path:
        return self.directory / self.name

    def update(self, value: str) -> None:
        self.generation += 1
        version = self.directory / f"..2026_12_04_{self.generation}"
        version.mkdir()
        (version / self.name).write_text(value + "\n")
        swap = self.directory / "..data_tmp"
        swap.symlink_to(version.name)
        os.replace(swap, self.directory / "..data")  # the kubelet's atomic rename


@dataclass
class Reloading:
    """A proxy in this process with a reloader watching its config file."""

    server: ProxyServer
    config: Path
    document: dict[str, Any]
    reloader: Reloader

    def rewrite(self, **changes: Any) -> None:
        self.document.update(changes)
        write_config(self.config, self.document)

    def auth(self, **changes: Any) -> None:
        self.document["auth"] = {**self.document["auth"], **changes}
        write_config(self.config, self.document)


StartReloading = Callable[..., Any]


@pytest.fixture
async def start_reloading(
    tmp_path: Path, start_proxy: StartProxy
) -> AsyncIterator[Callable[..., Any]]:
    reloaders: list[Reloader] = []

    async def start(standins: Standins, **auth: Any) -> Reloading:
        document = settings_document(standins.token_url, standins.upstream_url, **auth)
        config = write_config(tmp_path / "config.yaml", document)
        settings = load_settings(config)
        server = await start_proxy(settings)
        reloader = Reloader(
            ConfigSource(str(config), settings),
            settings,
            server.reconfigure,
            outcome=server.metrics.reloaded,
            interval=0.02,
        )
        reloader.start()
        reloaders.append(reloader)
        return Reloading(server, config, document, reloader)

    yield start
    for reloader in reloaders:
        await reloader.close()


async def fingerprint_used(client: aiohttp.ClientSession, proxy: ProxyServer) -> str:
    async with client.get(f"{proxy.proxy_url}/echo") as response:
        assert response.status == 200, await response.text()
        return str((await response.json())["token_fingerprint"])


async def metrics_of(client: aiohttp.ClientSession, proxy: ProxyServer) -> str:
    async with client.get(f"{proxy.admin_url}/metrics") as response:
        return await response.text()


def secrets_sent(standins: Standins) -> list[str]:
    return [request.json()["client_secret"] for request in standins.tokens.requests]


async def test_a_secret_file_swapped_like_kubernetes_is_used_for_the_next_token(
    tmp_path: Path, standins: Standins
) -> None:
    secret = KubernetesSecret(tmp_path / "secret", "client_secret", SECRET)
    document = settings_document(
        standins.token_url,
        standins.upstream_url,
        client_secret=None,
        client_secret_file=str(secret.path),
    )
    config = write_config(tmp_path / "config.yaml", document)
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.proxy_url}/echo") as response:
            old = (await response.json())["token_fingerprint"]
        mtime = secret.path.stat().st_mtime_ns

        standins.tokens.client_secret = NEW_SECRET
        secret.update(NEW_SECRET)
        os.utime(secret.path, ns=(mtime, mtime))  # the change must not hinge on mtime
        await proxy.wait_for_log("Token renewed")

        assert secrets_sent(standins) == [SECRET, NEW_SECRET]
        async with client.get(f"{proxy.proxy_url}/echo") as response:
            assert (await response.json())["token_fingerprint"] != old
        async with client.get(f"{proxy.admin_url}/metrics") as response:
            metrics = await response.text()
        assert await proxy.stop() == 0
    assert sample(metrics, "skill_engine_proxy_config_reloads_total", outcome="success") == 1
    assert f"{secret.path} changed" in proxy.log
    assert NEW_SECRET not in proxy.log


async def test_a_new_secret_that_is_rejected_keeps_the_old_token_in_use(
    standins: Standins,
    start_reloading: StartReloading,
    caplog: pytest.LogCaptureFixture,
) -> None:
    proxy = await start_reloading(standins)
    async with aiohttp.ClientSession() as client:
        old = await fingerprint_used(client, proxy.server)
        proxy.auth(client_secret="not-" + SECRET)
        await eventually(lambda: len(standins.tokens.requests) == 2)
        await eventually(lambda: "rejected the client credentials" in caplog.text)
        assert await fingerprint_used(client, proxy.server) == old
    assert "not-" + SECRET not in caplog.text


async def test_an_invalid_config_is_refused_and_the_running_one_keeps_serving(
    standins: Standins, start_reloading: StartReloading, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = await start_reloading(standins)
    proxy.auth(client_id=None, client_secret="leaked-" + SECRET)
    await eventually(lambda: "Reload refused" in caplog.text)

    refusal = next(record for record in caplog.records if "Reload refused" in record.message)
    assert refusal.levelno == logging.ERROR
    assert "auth.client_id: input should be a valid string" in refusal.message
    assert "leaked-" not in caplog.text
    async with aiohttp.ClientSession() as client:
        await fingerprint_used(client, proxy.server)
        metrics = await metrics_of(client, proxy.server)
    assert sample(metrics, "skill_engine_proxy_config_reloads_total", outcome="error") == 1
    assert len(standins.tokens.requests) == 1


async def test_a_new_listen_address_waits_for_a_restart(
    standins: Standins, start_reloading: StartReloading, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    proxy = await start_reloading(standins)
    started_on = proxy.document["listen"]

    def reloaded(times: int) -> Callable[[], bool]:
        return lambda: caplog.text.count("Reloaded the config") == times

    def warned() -> int:
        return caplog.text.count("listen changed since the proxy started")

    proxy.rewrite(listen="127.0.0.1:1", replay_body_limit=10)
    await eventually(reloaded(1))
    assert warned() == 1
    assert proxy.server.settings.listen.port != 1
    assert proxy.server.settings.replay_body_limit == 10
    async with aiohttp.ClientSession() as client:
        await fingerprint_used(client, proxy.server)

    # Every reload says it again while the running listener is not the config's...
    proxy.rewrite(replay_body_limit=200)
    await eventually(reloaded(2))
    assert warned() == 2
    assert proxy.server.settings.replay_body_limit == 200

    # ...and none once the config names the running one again.
    proxy.rewrite(listen=started_on, replay_body_limit=3000)
    await eventually(reloaded(3))
    assert warned() == 2


async def test_new_credentials_take_over_once_their_token_is_in_hand(
    standins: Standins, start_reloading: StartReloading, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    proxy = await start_reloading(standins)
    async with aiohttp.ClientSession() as client:
        old = await fingerprint_used(client, proxy.server)

        standins.tokens.client_id = "new-client"
        standins.tokens.gate.clear()  # the token for the new client_id is held back
        proxy.auth(client_id="new-client")
        await eventually(lambda: len(standins.tokens.requests) == 2)
        assert await fingerprint_used(client, proxy.server) == old  # the old one serves on

        standins.tokens.gate.set()
        await eventually(lambda: "Reloaded the config" in caplog.text)
        assert await fingerprint_used(client, proxy.server) != old
        assert [key.client_id for key in proxy.server.tokens.held_keys()] == ["new-client"]


EXPIRY = "skill_engine_proxy_token_expiry_timestamp_seconds"


@pytest.mark.parametrize(
    "change", [{"client_id": "new-client"}, {"audience": "new.techwolf.ai"}, {"token_url": None}]
)
async def test_the_expiry_gauge_shows_the_new_token_after_new_credentials(
    standins: Standins,
    start_reloading: StartReloading,
    caplog: pytest.LogCaptureFixture,
    change: dict[str, Any],
) -> None:
    caplog.set_level(logging.INFO)
    proxy = await start_reloading(standins)
    async with aiohttp.ClientSession() as client:
        await fingerprint_used(client, proxy.server)
        before = sample(await metrics_of(client, proxy.server), EXPIRY, tenant=TENANT, scopes="")
        assert before > 0

        standins.tokens.lifetime = 7200  # the new token's expiry differs from the old one's
        standins.tokens.client_id = change.get("client_id", standins.tokens.client_id)
        standins.tokens.audience = change.get("audience", standins.tokens.audience)
        if "token_url" in change:  # the same endpoint under another URL: another client
            change["token_url"] = standins.token_url.replace("127.0.0.1", "localhost")
        proxy.auth(**change)
        await eventually(lambda: "Reloaded the config" in caplog.text)

        (key,) = proxy.server.tokens.held_keys()
        token = proxy.server.tokens.cached(key)
        assert token is not None
        after = sample(await metrics_of(client, proxy.server), EXPIRY, tenant=TENANT, scopes="")
    assert after == token.expires_at_wall
    assert after > before


async def test_a_newer_reload_replaces_one_still_waiting_for_its_tokens(
    standins: Standins, start_reloading: StartReloading, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    proxy = await start_reloading(standins)
    standins.tokens.answer_next(
        Answer(401, {"error": "access_denied", "error_description": "no"}), times=1000
    )
    proxy.auth(client_id="never-works")
    await eventually(lambda: "fetching tokens with the new credentials" in caplog.text)

    proxy.auth(client_id="standin-client", refresh_margin=30)
    await eventually(lambda: "Reloaded the config" in caplog.text)
    assert "A newer reload replaces the one still waiting for tokens" in caplog.text
    assert [key.client_id for key in proxy.server.tokens.held_keys()] == ["standin-client"]


class HeldLoad:
    """A config loader that, once called, holds until the test lets it go (or 10 s pass)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.released_by_the_test = False
        self.thread: int | None = None

    def __call__(self, path: str) -> Settings:
        self.thread = threading.get_ident()
        self.started.set()
        self.released_by_the_test = self.release.wait(timeout=10)
        return load_settings(path)


async def test_a_reload_reads_the_config_off_the_event_loop(
    tmp_path: Path,
    standins: Standins,
    start_proxy: StartProxy,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    config = write_config(
        tmp_path / "config.yaml", settings_document(standins.token_url, standins.upstream_url)
    )
    settings = load_settings(config)
    proxy = await start_proxy(settings)
    load = HeldLoad()
    reloader = Reloader(ConfigSource(str(config), settings), settings, proxy.reconfigure, load=load)
    reloader.start()
    try:
        reloader.request("a test")
        await eventually(load.started.is_set, "the reload began reading the config")
        # The read is under way and holds: requests are served meanwhile.
        async with aiohttp.ClientSession() as client:
            await fingerprint_used(client, proxy)
        load.release.set()
        await eventually(lambda: "Reloaded the config" in caplog.text)
    finally:
        load.release.set()
        await reloader.close()
    assert load.released_by_the_test
    assert load.thread != threading.get_ident()


async def test_the_next_secret_is_tried_when_the_current_one_is_rejected(
    standins: Standins, start_proxy: StartProxy, caplog: pytest.LogCaptureFixture
) -> None:
    settings = standins.settings(client_secret="retired-secret", client_secret_next=SECRET)
    proxy = await start_proxy(settings)
    async with aiohttp.ClientSession() as client:
        first = await fingerprint_used(client, proxy)
        assert secrets_sent(standins) == ["retired-secret", SECRET]
        warning = next(
            record for record in caplog.records if "client_secret_next" in record.message
        )
        assert warning.levelno == logging.WARNING

        (key,) = proxy.tokens.held_keys()
        proxy.tokens.renew(key)  # the next secret is the current one now: no detour
        await eventually(lambda: len(standins.tokens.requests) == 3)
        await eventually(lambda: len(standins.tokens.issued) == 2)
        assert secrets_sent(standins)[2] == SECRET
        assert await fingerprint_used(client, proxy) != first
    assert "retired-secret" not in caplog.text


async def test_sighup_rereads_the_config_in_a_running_process(
    tmp_path: Path, standins: Standins
) -> None:
    document = settings_document(standins.token_url, standins.upstream_url)
    config = write_config(tmp_path / "config.yaml", document)
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as client:
        async with client.get(f"{proxy.proxy_url}/version") as response:
            assert response.status == 200

        standins.tokens.client_secret = NEW_SECRET
        document["auth"]["client_secret"] = NEW_SECRET
        write_config(config, document)
        proxy.process.send_signal(signal.SIGHUP)
        await proxy.wait_for_log("(SIGHUP)")
        await proxy.wait_for_log("Reloaded the config")
        await eventually(lambda: NEW_SECRET in secrets_sent(standins))
        assert await proxy.stop() == 0
    assert NEW_SECRET not in proxy.log
