"""The stand-in services: they must answer like the real ones wherever the proxy can tell."""

from __future__ import annotations

import aiohttp
import pytest

from tests.conftest import Standins
from tests.support import AUDIENCE, CLIENT_ID, SECRET, TENANT, raw_exchange


async def issued_token(standins: Standins) -> str:
    body = {
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
        "audience": AUDIENCE,
        "grant_type": "client_credentials",
        "tenant": TENANT,
    }
    async with (
        aiohttp.ClientSession() as client,
        client.post(standins.token_url, json=body) as response,
    ):
        assert response.status == 200
        return str((await response.json())["access_token"])


@pytest.mark.parametrize("target", ["/bytes/1000", "/bytes/1000?length=1", "/version"])
async def test_the_skill_engine_answers_head_without_a_body(
    standins: Standins, target: str
) -> None:
    token = await issued_token(standins)
    request = f"HEAD {target} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
    head = await raw_exchange(standins.upstream_url, f"{request}Connection: close\r\n\r\n".encode())
    assert head.status == 200
    assert head.body == b""
