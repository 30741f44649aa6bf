"""The server's lifecycle in this process: draining on stop, listen errors."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from proxy.config import ListenAddress
from proxy.errors import ListenError
from proxy.server import ProxyServer
from tests.conftest import Standins, StartProxy, StartStandins
from tests.support import HeldRoute


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
