"""Several tenants in one proxy: routes by listener, prefix and header, and scope sets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.config import Settings
from proxy.server import ProxyServer
from tests.conftest import Standins, StartProxy, StartStandins
from tests.support import AUDIENCE, SECRET, raw_exchange, samples


def tenant_auth(standins: Standins, tenant: str, **auth: Any) -> dict[str, Any]:
    return {
        "token_url": standins.token_url,
        "client_id": standins.tokens.client_id,
        "client_secret": SECRET,
        "audience": AUDIENCE,
        "tenant": tenant,
        **auth,
    }


class Fleet:
    """Two tenants, each with its own stand-in token endpoint and Skill Engine."""

    def __init__(self, acme: Standins, beta: Standins) -> None:
        self.acme = acme
        self.beta = beta

    def settings(
        self, routes: list[dict[str, Any]], *, prefetch: bool = False, **top: Any
    ) -> Settings:
        """Without prefetch unless asked, so that token requests are the routes' doing."""
        return Settings.model_validate(
            {
                "listen": "127.0.0.1:0",
                "admin_listen": "127.0.0.1:0",
                "tenants": {
                    "acme": {
                        "auth": tenant_auth(
                            self.acme, "acme_corp", scopes=["read", "write"], prefetch=prefetch
                        ),
                        "upstream": {"url": self.acme.upstream_url},
                    },
                    "beta": {
                        "auth": tenant_auth(self.beta, "beta_corp", prefetch=prefetch),
                        "upstream": {"url": self.beta.upstream_url},
                    },
                },
                "routes": routes,
                **top,
            }
        )


@pytest.fixture
async def fleet(start_standins: StartStandins) -> Fleet:
    acme = await start_standins()
    beta = await start_standins(client_id="beta-client")
    return Fleet(acme, beta)


ROUTES = [
    {"prefix": "/acme", "tenant": "acme", "scopes": ["read"]},
    {"prefix": "/beta", "tenant": "beta"},
    {"header": True, "scopes": ["read", "write"]},
]


@pytest.fixture
async def proxy(fleet: Fleet, start_proxy: StartProxy) -> ProxyServer:
    return await start_proxy(fleet.settings(ROUTES))


async def get(proxy: ProxyServer, target: str, *headers: bytes) -> tuple[int, dict[str, Any]]:
    head = b"".join(header + b"\r\n" for header in headers)
    response = await raw_exchange(
        proxy.proxy_url,
        f"GET {target} HTTP/1.1\r\nHost: x\r\n".encode() + head + b"Connection: close\r\n\r\n",
    )
    answer = json.loads(response.body) if response.body.startswith(b"{") else {}
    return response.status, answer


async def test_a_prefix_picks_the_tenant_and_is_stripped(fleet: Fleet, proxy: ProxyServer) -> None:
    status, echoed = await get(proxy, "/acme/echo/x?q=%2F")
    assert status == 200
    assert echoed["path"] == "/echo/x?q=%2F"
    assert fleet.acme.skill_engine.received[-1].raw_path == "/echo/x?q=%2F"

    status, echoed = await get(proxy, "/beta/echo")
    assert status == 200
    assert fleet.beta.skill_engine.received[-1].raw_path == "/echo"


@pytest.mark.parametrize(("target", "upstream_path"), [("/acme", "/"), ("/acme?x=1", "/?x=1")])
async def test_the_prefix_alone_is_the_root(
    fleet: Fleet, proxy: ProxyServer, target: str, upstream_path: str
) -> None:
    await get(proxy, target)
    assert fleet.acme.skill_engine.received[-1].raw_path == upstream_path


async def test_a_prefix_matches_whole_segments_only(fleet: Fleet, proxy: ProxyServer) -> None:
    status, answer = await get(proxy, "/acmecorp/echo")
    assert status == 404
    assert answer["error"] == "no_route"
    assert list(fleet.acme.skill_engine.received) == []


async def test_each_tenant_gets_its_own_token_and_scopes(fleet: Fleet, proxy: ProxyServer) -> None:
    await get(proxy, "/acme/echo")
    await get(proxy, "/beta/echo")
    [acme_request] = fleet.acme.tokens.requests
    [beta_request] = fleet.beta.tokens.requests
    assert acme_request.json()["tenant"] == "acme_corp"
    assert acme_request.json()["scopes"] == ["read"]
    assert beta_request.json()["tenant"] == "beta_corp"
    assert "scopes" not in beta_request.json()
    assert beta_request.json()["client_id"] == "beta-client"


async def test_a_header_picks_the_tenant_and_is_not_forwarded(
    fleet: Fleet, proxy: ProxyServer
) -> None:
    status, _ = await get(proxy, "/echo", b"X-Skill-Engine-Tenant: beta")
    assert status == 200
    [received] = fleet.beta.skill_engine.received
    names = {name.lower() for name, _ in received.raw_headers}
    assert b"x-skill-engine-tenant" not in names


async def test_an_unknown_tenant_in_the_header_is_no_route_not_a_default(
    fleet: Fleet, proxy: ProxyServer
) -> None:
    status, answer = await get(proxy, "/echo", b"X-Skill-Engine-Tenant: gamma")
    assert status == 404
    assert answer["error"] == "no_route"
    status, answer = await get(proxy, "/echo")
    assert status == 404
    assert list(fleet.acme.tokens.requests) == []
    assert list(fleet.beta.tokens.requests) == []


async def test_a_request_may_ask_for_a_subset_of_its_routes_scopes(
    fleet: Fleet, proxy: ProxyServer
) -> None:
    status, _ = await get(
        proxy, "/echo", b"X-Skill-Engine-Tenant: acme", b"X-Skill-Engine-Scopes: write"
    )
    assert status == 200
    [token_request] = fleet.acme.tokens.requests
    assert token_request.json()["scopes"] == ["write"]
    names = {name.lower() for name, _ in fleet.acme.skill_engine.received[-1].raw_headers}
    assert b"x-skill-engine-scopes" not in names

    status, _ = await get(
        proxy, "/echo", b"X-Skill-Engine-Tenant: acme", b"X-Skill-Engine-Scopes: read write read"
    )
    assert status == 200
    assert fleet.acme.tokens.requests[-1].json()["scopes"] == ["read", "write"]


@pytest.mark.parametrize(
    "headers",
    [
        [b"X-Skill-Engine-Tenant: beta", b"X-Skill-Engine-Tenant: acme"],
        [b"X-Skill-Engine-Tenant: acme", b"X-Skill-Engine-Tenant: beta"],
        [b"X-Skill-Engine-Tenant: acme", b"X-Skill-Engine-Tenant: acme"],
        [b"X-Skill-Engine-Tenant: beta, acme"],
    ],
    ids=["beta-then-acme", "acme-then-beta", "twice", "list"],
)
async def test_a_header_naming_several_tenants_is_refused(
    fleet: Fleet, proxy: ProxyServer, headers: list[bytes]
) -> None:
    """Neither the first nor the last may win: a gateway that adds its own tenant header
    after the client's would otherwise be overruled by it."""
    for target in ("/echo", "/acme/echo"):  # a prefix route listed first too
        status, answer = await get(proxy, target, *headers)
        assert status == 400
        assert answer["error"] == "bad_request"
    assert list(fleet.acme.tokens.requests) == list(fleet.beta.tokens.requests) == []


@pytest.mark.parametrize(
    "headers",
    [
        [b"X-Skill-Engine-Scopes: read", b"X-Skill-Engine-Scopes: write"],
        [b"X-Skill-Engine-Scopes: read, write"],
        [b"X-Skill-Engine-Scopes: write,read"],
    ],
    ids=["two-lines", "comma-space", "comma"],
)
async def test_scopes_asked_for_in_a_list_or_on_several_lines_are_all_asked_for(
    fleet: Fleet, proxy: ProxyServer, headers: list[bytes]
) -> None:
    status, _ = await get(proxy, "/echo", b"X-Skill-Engine-Tenant: acme", *headers)
    assert status == 200
    [token_request] = fleet.acme.tokens.requests
    assert token_request.json()["scopes"] == ["read", "write"]


async def test_a_scope_not_allowed_on_a_second_line_is_not_ignored(
    fleet: Fleet, proxy: ProxyServer
) -> None:
    status, answer = await get(
        proxy,
        "/echo",
        b"X-Skill-Engine-Tenant: acme",
        b"X-Skill-Engine-Scopes: read",
        b"X-Skill-Engine-Scopes: read_reports",
    )
    assert status == 403
    assert answer["error"] == "scope_not_allowed"


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        ("/acme/echo", [b"X-Skill-Engine-Scopes: write"]),
        ("/echo", [b"X-Skill-Engine-Tenant: acme", b"X-Skill-Engine-Scopes: read_reports"]),
        ("/beta/echo", [b"X-Skill-Engine-Scopes: admin"]),
    ],
)
async def test_scopes_outside_the_route_are_refused(
    fleet: Fleet, proxy: ProxyServer, target: str, headers: list[bytes]
) -> None:
    status, answer = await get(proxy, target, *headers)
    assert status == 403
    assert answer["error"] == "scope_not_allowed"
    assert list(fleet.acme.tokens.requests) == []
    assert list(fleet.beta.tokens.requests) == []


async def test_a_tenant_on_its_own_listener(fleet: Fleet, start_proxy: StartProxy) -> None:
    proxy = await start_proxy(
        fleet.settings(
            [{"listen": "127.0.0.1:0", "tenant": "beta"}, {"prefix": "/acme", "tenant": "acme"}]
        )
    )
    [beta_url] = proxy.route_urls.values()
    beta_only = await raw_exchange(
        beta_url, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert beta_only.status == 200
    assert fleet.beta.skill_engine.received[-1].raw_path == "/echo"

    # The other routes serve the main listener, never a route's own.
    on_beta_port = await raw_exchange(
        beta_url, b"GET /acme/echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert on_beta_port.header_values("X-Skill-Engine-Proxy-Error") == []  # beta's own 404
    assert fleet.beta.skill_engine.received[-1].raw_path == "/acme/echo"
    main = await raw_exchange(
        proxy.proxy_url, b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert main.status == 404


async def test_a_listener_whose_routes_ignore_the_tenant_header_ignores_repeats_of_it(
    fleet: Fleet, start_proxy: StartProxy
) -> None:
    proxy = await start_proxy(
        fleet.settings([{"listen": "127.0.0.1:0", "tenant": "beta"}, {"header": True}])
    )
    [beta_url] = proxy.route_urls.values()
    request = b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n%s\r\n"
    headers = b"X-Skill-Engine-Tenant: acme\r\nX-Skill-Engine-Tenant: beta\r\n"
    assert (await raw_exchange(beta_url, request % headers)).status == 200
    assert (await raw_exchange(proxy.proxy_url, request % headers)).status == 400


async def test_a_tenant_on_its_own_unix_socket(
    fleet: Fleet, start_proxy: StartProxy, tmp_path: Path
) -> None:
    path = tmp_path / "beta.sock"
    proxy = await start_proxy(
        fleet.settings(
            [{"listen": f"unix:{path}", "tenant": "beta"}, {"prefix": "/acme", "tenant": "acme"}]
        )
    )
    assert list(proxy.route_urls.values()) == [f"unix:{path}"]
    connector = aiohttp.UnixConnector(path=str(path), force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get("http://localhost/echo") as response:
            assert response.status == 200
        async with session.get("http://localhost/acme/echo") as response:
            assert "X-Skill-Engine-Proxy-Error" not in response.headers  # beta's own 404
    assert [received.raw_path for received in fleet.beta.skill_engine.received] == [
        "/echo",
        "/acme/echo",
    ]
    assert list(fleet.acme.skill_engine.received) == []
    [token_request] = fleet.beta.tokens.requests
    assert token_request.json()["tenant"] == "beta_corp"

    # The main listener serves the other routes only.
    status, _ = await get(proxy, "/echo")
    assert status == 404
    status, _ = await get(proxy, "/acme/echo")
    assert status == 200


async def test_hostile_header_values_add_no_metric_series(fleet: Fleet, proxy: ProxyServer) -> None:
    await get(proxy, "/acme/echo")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.admin_url}/metrics") as response:
            before = set(samples(await response.text()))
        for number in range(50):
            await get(
                proxy,
                f"/echo/{number}",
                f"X-Skill-Engine-Tenant: tenant-{number}".encode(),
                f"X-Skill-Engine-Scopes: scope-{number}".encode(),
            )
            await get(
                proxy,
                "/echo",
                b"X-Skill-Engine-Tenant: acme",
                f"X-Skill-Engine-Scopes: read scope-{number}".encode(),
            )
        async with session.get(f"{proxy.admin_url}/metrics") as response:
            after = set(samples(await response.text()))
    labels = {dict(labelset).get("tenant") for _, labelset in after}
    assert labels <= {None, "", "acme_corp", "beta_corp"}
    assert {dict(labelset).get("scopes") for _, labelset in after} <= {None, "read", ""}
    new = after - before
    assert all(dict(labelset).get("tenant") in ("", "acme_corp") for _, labelset in new)


async def test_readiness_waits_for_every_routes_token(
    fleet: Fleet, start_proxy: StartProxy
) -> None:
    fleet.beta.tokens.gate.clear()
    proxy = await start_proxy(fleet.settings(ROUTES, prefetch=True))
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.admin_url}/readyz") as response:
            assert response.status == 503
            assert "beta_corp" in await response.text()
        fleet.beta.tokens.gate.set()
        for _ in range(1000):
            if proxy.lifecycle.token_problem() is None:
                break
            await asyncio.sleep(0.01)
        async with session.get(f"{proxy.admin_url}/readyz") as response:
            assert response.status == 200
