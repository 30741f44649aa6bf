"""The admin listener, the metrics, and what never appears in logs, metrics or answers."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from yarl import URL

from proxy.server import ProxyServer
from proxy.standins import Answer
from tests.conftest import Standins, StartProxy, StartStandins
from tests.support import SECRET, TENANT, HeldRoute, eventually, sample, samples


async def scrape(client: aiohttp.ClientSession, proxy: ProxyServer) -> str:
    async with client.get(f"{proxy.admin_url}/metrics") as response:
        assert response.status == 200
        assert response.content_type == "text/plain"
        return await response.text()


def tenant_sample(text: str, name: str, **labels: str) -> float:
    return sample(text, f"skill_engine_proxy_{name}", tenant=TENANT, **labels)


async def test_health_and_readiness(proxy: ProxyServer, client: aiohttp.ClientSession) -> None:
    async with client.get(f"{proxy.admin_url}/healthz") as response:
        assert response.status == 200
    # Listening comes first; ready once the token fetched at start is in hand.
    await eventually(lambda: proxy.lifecycle.token_problem() is None, "the first token")
    async with client.get(f"{proxy.admin_url}/readyz") as response:
        assert response.status == 200


async def test_admin_paths_do_not_shadow_upstream_paths(
    standins: Standins, proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{proxy.proxy_url}/metrics") as response:
        assert response.status == 404  # the stand-in Skill Engine's answer, not the proxy's
        assert "X-Skill-Engine-Proxy-Error" not in response.headers
    assert standins.skill_engine.received[-1].raw_path == "/metrics"


async def test_counters_match_what_happened(
    standins: Standins,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    unused_tcp_port: int,
) -> None:
    proxy = await start_proxy(standins.settings(scopes=["write", "read"], prefetch=False))
    dead = await start_proxy(
        standins.settings(upstream={"url": f"http://127.0.0.1:{unused_tcp_port}"}, prefetch=False)
    )

    for _ in range(3):
        async with client.get(f"{proxy.proxy_url}/version") as response:
            assert response.status == 200
    async with client.post(f"{proxy.proxy_url}/echo", data=b"x") as response:
        assert response.status == 200
    async with client.request("PROPFIND", f"{proxy.proxy_url}/version") as response:
        assert response.status == 405
    async with client.get(f"{dead.proxy_url}/version") as response:
        assert response.status == 502

    text = await scrape(client, proxy)
    assert tenant_sample(text, "requests_total", method="GET", status="200") == 3
    assert tenant_sample(text, "requests_total", method="POST", status="200") == 1
    assert tenant_sample(text, "requests_total", method="other", status="405") == 1
    assert tenant_sample(text, "request_duration_seconds_count", method="GET") == 3
    assert tenant_sample(text, "token_fetches_total", outcome="success") == 1
    assert tenant_sample(text, "token_fetch_duration_seconds_count") == 1
    assert tenant_sample(text, "token_cache_lookups_total", result="miss") == 1
    assert tenant_sample(text, "token_cache_lookups_total", result="hit") == 4
    assert sample(text, "skill_engine_proxy_requests_in_flight") == 0
    assert tenant_sample(text, "token_expiry_timestamp_seconds", scopes="read write") > 0

    dead_text = await scrape(client, dead)
    assert tenant_sample(dead_text, "upstream_errors_total", reason="connect") == 1
    assert tenant_sample(dead_text, "requests_total", method="GET", status="502") == 1


async def test_a_failed_token_fetch_is_counted_once_and_its_waiters_are_told_when(
    standins: Standins, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    proxy = await start_proxy(standins.settings(prefetch=False))
    standins.tokens.answer_next(Answer(500), times=2)
    for _ in range(2):
        async with client.get(f"{proxy.proxy_url}/version") as response:
            assert response.status == 503
            assert int(response.headers["Retry-After"]) >= 0
    text = await scrape(client, proxy)
    assert tenant_sample(text, "token_fetches_total", outcome="error") == 1
    assert tenant_sample(text, "requests_total", method="GET", status="503") == 2
    assert len(standins.tokens.requests) == 1


async def test_a_thousand_paths_add_no_series(
    proxy: ProxyServer, client: aiohttp.ClientSession
) -> None:
    async with client.get(f"{proxy.proxy_url}/echo/warm-up") as response:
        assert response.status == 200
    before = set(samples(await scrape(client, proxy)))

    for number in range(1000):
        async with client.get(f"{proxy.proxy_url}/echo/{number}?q={number}") as response:
            assert response.status == 200

    after = set(samples(await scrape(client, proxy)))
    assert after == before


async def test_secret_and_tokens_never_appear_in_logs_metrics_or_answers(
    start_standins: StartStandins,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    standins = await start_standins(lifetime=30)
    proxy = await start_proxy(standins.settings(refresh_margin=20))
    wrong = await start_proxy(standins.settings(client_secret="wrong-" + SECRET))
    answers: list[str] = []

    async def call(server: ProxyServer, path: str) -> None:
        async with client.get(f"{server.proxy_url}{path}") as response:
            answers.append(await response.text())
            answers.append(str(response.headers))

    await call(proxy, "/echo")
    standins.tokens.answer_next(
        Answer(401, {"error": "access_denied", "error_description": "wrong-" + SECRET})
    )
    await call(wrong, "/version")
    standins.tokens.answer_next(Answer(200, {"access_token": "", "expires_in": 5}))
    await call(wrong, "/version")
    await call(wrong, "/version")
    metrics = await scrape(client, proxy)

    tokens = list(standins.tokens.issued)
    assert tokens, "the stand-in issued no token; the test would prove nothing"
    for secret in (SECRET, *tokens):
        assert secret not in caplog.text
        assert secret not in metrics
        for answer in answers:
            assert secret not in answer


async def test_logged_paths_stay_encoded_and_leave_the_query_out(
    standins: Standins,
    start_proxy: StartProxy,
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
    unused_tcp_port: int,
) -> None:
    dead = {"url": f"http://127.0.0.1:{unused_tcp_port}"}
    proxy = await start_proxy(standins.settings(upstream=dead))
    url = URL(f"{proxy.proxy_url}/a%0AERROR%20forged?api_key=hidden-value", encoded=True)
    async with client.get(url) as response:
        assert response.status == 502

    assert "GET /a%0AERROR%20forged answered 502" in caplog.text
    assert "\nERROR forged" not in caplog.text
    assert "hidden-value" not in caplog.text


async def test_the_in_flight_gauge_counts_requests_being_answered(
    start_standins: StartStandins, start_proxy: StartProxy, client: aiohttp.ClientSession
) -> None:
    held = HeldRoute()
    standins = await start_standins(held.routes())
    proxy = await start_proxy(standins.settings())
    calls = [asyncio.create_task(client.get(f"{proxy.proxy_url}/slow")) for _ in range(2)]
    for _ in range(1000):  # until both are with the upstream
        in_flight = sample(await scrape(client, proxy), "skill_engine_proxy_requests_in_flight")
        if in_flight == 2:
            break
        await asyncio.sleep(0.01)
    assert in_flight == 2
    held.release.set()
    for call in calls:
        async with await call as response:
            assert response.status == 200
    assert sample(await scrape(client, proxy), "skill_engine_proxy_requests_in_flight") == 0
