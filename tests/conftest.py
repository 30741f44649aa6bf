"""Fixtures: the stand-in services and the proxy, all on loopback sockets."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp.plugin import AiohttpServer

from proxy.config import Settings
from proxy.server import ProxyServer
from proxy.standins import StandinSkillEngine, StandinTokenEndpoint
from tests.support import make_settings


@dataclass
class Standins:
    tokens: StandinTokenEndpoint
    skill_engine: StandinSkillEngine
    token_url: str
    upstream_url: str

    def settings(self, **auth: Any) -> Settings:
        return make_settings(self.token_url, self.upstream_url, **auth)


StartStandins = Callable[..., Awaitable[Standins]]
StartProxy = Callable[..., Awaitable[ProxyServer]]


@pytest.fixture
def start_standins(aiohttp_server: AiohttpServer) -> StartStandins:
    """Start the stand-ins; `routes` adds test-specific routes to the Skill Engine."""

    async def start(routes: web.RouteTableDef | None = None, **token_options: Any) -> Standins:
        tokens = StandinTokenEndpoint(**token_options)
        skill_engine = StandinSkillEngine(tokens)
        app = skill_engine.app()
        if routes is not None:
            app.router.add_routes(routes)
        token_server = await aiohttp_server(tokens.app())
        skill_server = await aiohttp_server(app)
        return Standins(
            tokens,
            skill_engine,
            str(token_server.make_url("/oauth/token")),
            str(skill_server.make_url("")).rstrip("/"),
        )

    return start


@pytest.fixture
async def standins(start_standins: StartStandins) -> Standins:
    return await start_standins()


@pytest.fixture
async def start_proxy() -> AsyncIterator[StartProxy]:
    """Start the proxy in this process on free loopback ports; stopped after the test."""
    servers: list[ProxyServer] = []

    async def start(settings: Settings, **options: Any) -> ProxyServer:
        server = ProxyServer(settings, **options)
        servers.append(server)
        await server.start()
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def proxy(standins: Standins, start_proxy: StartProxy) -> ProxyServer:
    return await start_proxy(standins.settings())


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that shows answers as sent: no decompression, no cookies, no redirects."""
    async with aiohttp.ClientSession(
        auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
    ) as session:
        yield session
