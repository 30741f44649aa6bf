"""`demo`: the proxy in front of the stand-in token endpoint and Skill Engine, on loopback."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TextIO

from aiohttp import web

from proxy.config import ListenAddress, Settings
from proxy.server import ProxyServer, StopSignals
from proxy.standins import StandinSkillEngine, StandinTokenEndpoint

# The demo's credentials, known to its stand-in token endpoint and to nothing else.
DEMO_CLIENT_ID = "demo-client"
DEMO_SECRET = "demo-secret"  # noqa: S105


@asynccontextmanager
async def standins() -> AsyncIterator[tuple[str, str]]:
    """Run both stand-ins on free loopback ports; yield (token URL, Skill Engine URL)."""
    token_endpoint = StandinTokenEndpoint(client_id=DEMO_CLIENT_ID, client_secret=DEMO_SECRET)
    runners = [
        web.AppRunner(token_endpoint.app(), access_log=None),
        web.AppRunner(StandinSkillEngine(token_endpoint).app(), access_log=None),
    ]
    urls = []
    try:
        for runner in runners:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            host, port = runner.addresses[0][:2]
            urls.append(f"http://{host}:{port}")
        yield f"{urls[0]}/oauth/token", urls[1]
    finally:
        for runner in runners:
            await runner.cleanup()


def demo_settings(
    token_url: str, skill_engine_url: str, listen: ListenAddress, admin_listen: ListenAddress
) -> Settings:
    return Settings.model_validate(
        {
            "listen": listen,
            "admin_listen": admin_listen,
            "upstream": {"url": skill_engine_url},
            "auth": {
                "token_url": token_url,
                "client_id": DEMO_CLIENT_ID,
                "client_secret": DEMO_SECRET,
                "audience": "standin.techwolf.ai",
                "tenant": "demo",
                "scopes": ["read"],
            },
        }
    )


async def run_demo(
    listen: ListenAddress, admin_listen: ListenAddress, out: TextIO = sys.stdout
) -> None:
    """Serve the demo until SIGINT or SIGTERM."""
    async with standins() as (token_url, skill_engine_url):
        server = ProxyServer(demo_settings(token_url, skill_engine_url, listen, admin_listen))
        with StopSignals() as signals:
            await server.start()
            _introduce(server, token_url, skill_engine_url, out)
            await signals.wait()
            await server.stop()


def _introduce(server: ProxyServer, token_url: str, skill_engine_url: str, out: TextIO) -> None:
    curl = _curl(server.proxy_url)
    admin = server.admin_url or ""
    metrics = f"{admin}/metrics" if admin.startswith("http") else f"{_curl(admin)}/metrics"
    out.write(
        f"skill-engine-proxy demo: the proxy listens on {server.proxy_url}, in front of a\n"
        f"stand-in Skill Engine ({skill_engine_url}) and a stand-in token endpoint\n"
        f"({token_url}). No credentials and no network needed.\n\n"
        "Try it:\n"
        f"  {curl}/version\n"
        f"  {curl}/echo/hello -d 'any body'\n"
        f"Metrics: {metrics}\n"
        "Ctrl-C stops the demo.\n"
    )
    out.flush()


def _curl(url: str) -> str:
    """The start of a curl command line for `url`, an http URL or a unix socket."""
    if url.startswith("unix:"):
        return f"curl -s --unix-socket {url.removeprefix('unix:')} http://localhost"
    return f"curl -s {url}"
