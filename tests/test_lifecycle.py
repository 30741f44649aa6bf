"""The token lifecycle end to end, over loopback sockets, with the proxy's clock in hand.

The stand-in token endpoint counts what it receives; the proxy's time is a FakeClock, so a
token's life passes in an instant. Background work (refreshes, retries) runs for real over
the sockets, so the tests wait for its outcome, never for a length of time.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.server import ProxyServer
from proxy.standins import Answer
from proxy.tokens import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    REFUSAL_HOLD_OFF,
    REJECTED_COOL_DOWN,
    fingerprint,
)
from tests.conftest import Standins, StartProxy, StartStandins
from tests.support import TENANT, FakeClock, eventually, sample

LIFETIME = 3600


class Lifecycle:
    """A proxy on a fake clock in front of the stand-ins, and ways to talk to it."""

    def __init__(self, standins: Standins, proxy: ProxyServer, clock: FakeClock) -> None:
        self.standins = standins
        self.proxy = proxy
        self.clock = clock
        self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    @property
    def token_requests(self) -> int:
        """Token requests the stand-in received (its answer may not be back yet)."""
        return len(self.standins.tokens.requests)

    def fetches(self) -> int:
        """Token requests whose outcome the proxy has taken in."""
        registry = self.proxy.metrics.registry
        return sum(
            registry.get_sample_value(
                "skill_engine_proxy_token_fetches_total", {"tenant": TENANT, "outcome": outcome}
            )
            or 0
            for outcome in ("success", "error")
        )

    async def get(self, path: str = "/echo", **options: Any) -> tuple[int, dict[str, Any]]:
        async with self.session.get(f"{self.proxy.proxy_url}{path}", **options) as response:
            if response.content_type == "application/json":
                return response.status, {**await response.json(), **response.headers}
            return response.status, dict(response.headers)

    async def fingerprint(self) -> str:
        status, answer = await self.get()
        assert status == 200, answer
        return str(answer["token_fingerprint"])

    async def renewed(self, old: str) -> str:
        """The fingerprint of the token in use once it is no longer `old`."""
        for _ in range(1000):
            if (current := await self.fingerprint()) != old:
                return current
            await asyncio.sleep(0.01)
        raise AssertionError("the token was never renewed")

    async def metric(self, name: str, **labels: str) -> float:
        async with self.session.get(f"{self.proxy.admin_url}/metrics") as response:
            text = await response.text()
        return sample(text, f"skill_engine_proxy_{name}", **labels)

    async def ready(self) -> tuple[int, str]:
        async with self.session.get(f"{self.proxy.admin_url}/readyz") as response:
            return response.status, await response.text()

    async def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        for _ in range(20):
            await asyncio.sleep(0)


@pytest.fixture
async def start_lifecycle(start_standins: StartStandins, start_proxy: StartProxy) -> Any:
    lifecycles: list[Lifecycle] = []

    async def start(
        routes: web.RouteTableDef | None = None,
        token_options: dict[str, Any] | None = None,
        **auth: Any,
    ) -> Lifecycle:
        standins = await start_standins(routes, **(token_options or {}))
        clock = FakeClock()
        proxy = await start_proxy(standins.settings(**auth), clock=clock)
        lifecycle = Lifecycle(standins, proxy, clock)
        lifecycles.append(lifecycle)
        return lifecycle

    yield start
    for lifecycle in lifecycles:
        await lifecycle.session.close()


@pytest.fixture
async def running(start_lifecycle: Any) -> Lifecycle:
    """A proxy that fetched its token at start."""
    lifecycle: Lifecycle = await start_lifecycle()
    await eventually(lambda: lifecycle.fetches() == 1, "the token fetched at start")
    await eventually(lambda: lifecycle.proxy.lifecycle.token_problem() is None, "ready")
    return lifecycle


async def test_readyz_waits_for_the_first_token(
    start_standins: StartStandins, start_proxy: StartProxy
) -> None:
    standins = await start_standins()
    standins.tokens.gate.clear()
    proxy = await start_proxy(standins.settings(), clock=FakeClock())
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{proxy.admin_url}/readyz") as response:
            assert response.status == 503
            assert "no token yet" in await response.text()
        standins.tokens.gate.set()
        await eventually(lambda: proxy.lifecycle.token_problem() is None, "the first token")
        async with session.get(f"{proxy.admin_url}/readyz") as response:
            assert response.status == 200
    assert len(standins.tokens.requests) == 1


async def test_without_prefetch_the_first_request_fetches(start_lifecycle: Any) -> None:
    lifecycle: Lifecycle = await start_lifecycle(prefetch=False)
    assert (await lifecycle.ready())[0] == 200
    assert lifecycle.token_requests == 0
    assert await lifecycle.fingerprint()
    assert lifecycle.token_requests == 1


async def test_without_prefetch_a_failing_endpoint_makes_it_unready_until_it_heals(
    start_lifecycle: Any,
) -> None:
    lifecycle: Lifecycle = await start_lifecycle(prefetch=False)
    lifecycle.standins.tokens.answer_next(Answer(503), times=10_000)
    assert (await lifecycle.get())[0] == 503
    status, text = await lifecycle.ready()
    assert status == 503
    assert "no token" in text

    lifecycle.standins.tokens.recover()  # nobody sends another request: it heals by itself
    await lifecycle.advance(BACKOFF_CAP)
    await eventually(lambda: lifecycle.proxy.lifecycle.token_problem() is None, "healed")
    assert (await lifecycle.ready())[0] == 200


async def test_no_request_waits_during_a_refresh(running: Lifecycle) -> None:
    first = await running.fingerprint()
    running.standins.tokens.gate.clear()

    await running.advance(LIFETIME * 0.8)
    await eventually(lambda: running.token_requests == 2, "the refresh reaching the endpoint")
    results = await asyncio.gather(*(running.fingerprint() for _ in range(20)))
    assert set(results) == {first}  # served at once, with the current token
    await running.advance(LIFETIME * 0.19)  # past the refresh margin: still nobody waits
    assert await running.fingerprint() == first

    running.standins.tokens.gate.set()
    await running.renewed(first)
    assert running.token_requests == 2
    assert await running.metric("token_refreshes_total", tenant=TENANT, outcome="success") == 1


async def test_a_refresh_that_fails_twice_serves_the_old_token_and_succeeds_on_the_third_try(
    running: Lifecycle, caplog: pytest.LogCaptureFixture
) -> None:
    first = await running.fingerprint()
    running.standins.tokens.answer_next(Answer(500, {"error": "server_error"}), times=2)

    await running.advance(LIFETIME * 0.8)
    await eventually(lambda: running.fetches() == 2, "the refresh")
    assert await running.fingerprint() == first
    await running.advance(BACKOFF_BASE)
    await eventually(lambda: running.fetches() == 3, "the first retry")
    assert await running.fingerprint() == first
    await running.advance(BACKOFF_BASE * 2)
    await eventually(lambda: running.fetches() == 4, "the second retry")
    await running.renewed(first)
    assert await running.metric("token_refreshes_total", tenant=TENANT, outcome="error") == 2
    assert await running.metric("token_refreshes_total", tenant=TENANT, outcome="success") == 1
    assert (
        await running.metric("token_fetch_retries_total", tenant=TENANT, reason="server_error") == 2
    )
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1


async def test_every_request_served_while_the_refresh_fails_is_a_stale_use(
    running: Lifecycle,
) -> None:
    first = await running.fingerprint()
    running.standins.tokens.answer_next(Answer(503), times=10_000)
    await running.advance(LIFETIME * 0.8)  # the refresh fails, well before the margin
    await eventually(lambda: running.fetches() == 2, "the refresh")
    for _ in range(3):
        assert await running.fingerprint() == first
    assert await running.metric("token_stale_uses_total", tenant=TENANT) == 3


async def test_an_outage_longer_than_the_token_gives_503_with_retry_after_and_heals(
    running: Lifecycle,
) -> None:
    running.standins.tokens.answer_next(Answer(503), times=10_000)
    await running.advance(LIFETIME * 0.8)
    await eventually(lambda: running.fetches() == 2, "the refresh")
    while running.clock.now() < 1000 + LIFETIME:  # the token's life runs out, in use
        status, _ = await running.get()
        assert status == 200
        await running.advance(60)

    before = running.token_requests
    for _ in range(10):
        status, answer = await running.get()
        assert status == 503
        assert answer["error"] == "token_unavailable"
        assert int(answer["Retry-After"]) >= 0
    assert running.token_requests - before <= 1  # not a fetch per request
    status, text = await running.ready()
    assert status == 503
    assert "no token" in text

    running.standins.tokens.recover()  # the endpoint is back: nobody sends a request
    await running.advance(BACKOFF_CAP)  # the backoff is capped: a retry falls due by then
    await eventually(lambda: running.proxy.lifecycle.token_problem() is None, "recovery")
    assert (await running.ready())[0] == 200
    assert (await running.get())[0] == 200


async def test_a_429_is_waited_out_as_long_as_retry_after_says(running: Lifecycle) -> None:
    running.standins.tokens.answer_next(Answer(429, None, {"Retry-After": "30"}))
    await running.advance(LIFETIME * 0.8)
    await eventually(lambda: running.fetches() == 2, "the refresh")

    await running.advance(29)
    await asyncio.sleep(0.05)
    assert running.token_requests == 2
    await running.advance(1)
    await eventually(lambda: running.fetches() == 3, "the retry after 30 s")


async def test_rejected_credentials_cost_one_token_request_per_cool_down(
    start_lifecycle: Any, caplog: pytest.LogCaptureFixture
) -> None:
    lifecycle: Lifecycle = await start_lifecycle(client_secret="not-the-secret")
    await eventually(lambda: lifecycle.fetches() == 1, "the start-up fetch")
    await eventually(lambda: lifecycle.proxy.lifecycle.token_problem() is not None, "rejected")

    for _ in range(50):
        status, answer = await lifecycle.get()
        assert status == 503
        assert "rejected the client credentials" in answer["message"]
        assert int(answer["Retry-After"]) <= REJECTED_COOL_DOWN
    assert lifecycle.token_requests == 1
    status, text = await lifecycle.ready()
    assert status == 503
    assert "credentials rejected" in text

    await lifecycle.advance(REJECTED_COOL_DOWN)
    await eventually(lambda: lifecycle.fetches() == 2, "one try after the cool-down")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "not-the-secret" not in caplog.text


async def test_credentials_put_right_make_the_proxy_ready_by_itself(start_lifecycle: Any) -> None:
    lifecycle: Lifecycle = await start_lifecycle(client_secret="not-the-secret")
    await eventually(lambda: lifecycle.fetches() == 1, "the start-up fetch")
    assert (await lifecycle.ready())[0] == 503

    lifecycle.standins.tokens.client_secret = "not-the-secret"  # the operator fixes it upstream
    await lifecycle.advance(REJECTED_COOL_DOWN)
    await eventually(lambda: lifecycle.proxy.lifecycle.token_problem() is None, "ready again")
    assert (await lifecycle.ready())[0] == 200
    assert await lifecycle.fingerprint()


async def test_a_renewal_answered_with_garbage_is_retried(running: Lifecycle) -> None:
    first = await running.fingerprint()
    running.standins.tokens.answer_next(Answer(200, b"<html>maintenance</html>"))
    await running.advance(LIFETIME * 0.8)
    await eventually(lambda: running.fetches() == 2, "the refresh")
    assert await running.fingerprint() == first
    await running.advance(BACKOFF_BASE)
    await eventually(lambda: running.fetches() == 3, "the retry")
    await running.renewed(first)
    retries = await running.metric(
        "token_fetch_retries_total", tenant=TENANT, reason="bad_response"
    )
    assert retries == 1


async def test_an_idle_scope_set_stops_refreshing(start_lifecycle: Any) -> None:
    lifecycle: Lifecycle = await start_lifecycle(idle_after=600)
    await eventually(lambda: lifecycle.fetches() == 1, "the start-up fetch")
    for _ in range(10):
        await lifecycle.advance(LIFETIME * 0.1)
    await asyncio.sleep(0.05)
    assert lifecycle.token_requests == 1

    assert await lifecycle.fingerprint()  # used again past its margin: fetched on demand
    assert lifecycle.token_requests == 2


async def test_a_jwt_exp_earlier_than_expires_in_wins(
    start_lifecycle: Any, caplog: pytest.LogCaptureFixture
) -> None:
    lifecycle: Lifecycle = await start_lifecycle(token_options={"exp_offset": -(LIFETIME - 300)})
    await eventually(lambda: lifecycle.fetches() == 1, "the start-up fetch")
    first = await lifecycle.fingerprint()

    expiry = await lifecycle.metric("token_expiry_timestamp_seconds", tenant=TENANT, scopes="")
    assert abs(expiry - (time.time() + 300)) < 60  # the exp, not expires_in (3600)
    # expires_in and exp disagree by more than a minute: a clock is off, said once.
    assert sum("clock" in r.getMessage() for r in caplog.records) == 1

    await lifecycle.advance(300 * 0.8)  # a refresh at 0.8 of the exp lifetime, not of 3600
    await eventually(lambda: lifecycle.fetches() == 2, "a refresh by the token's exp")
    assert await lifecycle.renewed(first)
    assert sum("clock" in r.getMessage() for r in caplog.records) == 1


def replay_routes(seen_bodies: list[bytes]) -> web.RouteTableDef:
    routes = web.RouteTableDef()

    @routes.post("/upload")
    async def upload(request: web.Request) -> web.Response:
        body = await request.read()
        seen_bodies.append(body)
        return web.json_response({"sha256": hashlib.sha256(body).hexdigest()})

    @routes.get("/forbidden")
    async def forbidden(_request: web.Request) -> web.Response:
        return web.json_response({"error": "forbidden"}, status=403)

    return routes


def condemning_routes(condemned: set[str], arrivals: asyncio.Event, expected: int) -> Any:
    """`/gathered`: answers 401 to a token whose fingerprint is in `condemned`, once
    `expected` such requests are waiting, so all of them carried it; 200 to others."""
    routes = web.RouteTableDef()
    waiting: list[int] = []

    @routes.get("/gathered")
    async def gathered(request: web.Request) -> web.Response:
        token = request.headers["Authorization"].partition(" ")[2]
        if fingerprint(token) not in condemned:
            return web.json_response({"token_fingerprint": fingerprint(token)})
        waiting.append(1)
        if len(waiting) == expected:
            arrivals.set()
        await arrivals.wait()
        return web.json_response({"error": "invalid_token"}, status=401)

    return routes


def refusing_routes(attempts: list[str]) -> web.RouteTableDef:
    """`/always-401`: refuses every token, as an upstream of another audience would."""
    routes = web.RouteTableDef()

    @routes.get("/always-401")
    async def always_401(request: web.Request) -> web.Response:
        attempts.append(request.headers["Authorization"])
        return web.json_response({"error": "invalid_token"}, status=401)

    return routes


async def test_200_concurrent_401s_cause_one_new_fetch_and_one_replay_each(
    start_lifecycle: Any,
) -> None:
    condemned: set[str] = set()
    all_arrived = asyncio.Event()
    lifecycle: Lifecycle = await start_lifecycle(
        routes=condemning_routes(condemned, all_arrived, expected=200)
    )
    await eventually(lambda: lifecycle.fetches() == 1, "the start-up fetch")
    condemned.add(await lifecycle.fingerprint())
    received_before = len(lifecycle.standins.skill_engine.received)

    results = await asyncio.gather(*(lifecycle.get("/gathered") for _ in range(200)))

    assert [status for status, _ in results] == [200] * 200
    assert {answer["token_fingerprint"] for _, answer in results}.isdisjoint(condemned)
    assert lifecycle.token_requests == 2
    assert len(lifecycle.standins.skill_engine.received) - received_before == 400
    replayed = await lifecycle.metric(
        "upstream_unauthorized_total", tenant=TENANT, outcome="replayed"
    )
    assert replayed == 200


async def test_a_replayed_request_refused_again_is_not_replayed_twice(
    start_lifecycle: Any,
) -> None:
    attempts: list[str] = []
    lifecycle: Lifecycle = await start_lifecycle(routes=refusing_routes(attempts))
    await eventually(lambda: lifecycle.fetches() == 1, "the start-up fetch")

    status, _ = await lifecycle.get("/always-401")
    assert status == 401
    assert len(attempts) == 2  # the first try and one replay, with a new token
    assert attempts[0] != attempts[1]
    assert lifecycle.token_requests == 2


async def test_a_small_body_is_replayed_intact(start_lifecycle: Any) -> None:
    seen: list[bytes] = []
    lifecycle: Lifecycle = await start_lifecycle(routes=replay_routes(seen))
    await eventually(lambda: lifecycle.fetches() == 1, "the start-up fetch")
    lifecycle.standins.tokens.revoke_all()

    body = b"x" * 60_000
    async with lifecycle.session.post(f"{lifecycle.proxy.proxy_url}/upload", data=body) as response:
        assert response.status == 200
        assert (await response.json())["sha256"] == hashlib.sha256(body).hexdigest()
    assert seen == [body]  # the stand-in reads bodies only once a token is valid


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_large_or_unsized_body_with_a_401_is_passed_through_not_replayed(
    start_lifecycle: Any, chunked: bool
) -> None:
    lifecycle: Lifecycle = await start_lifecycle(routes=replay_routes([]))
    await eventually(lambda: lifecycle.fetches() == 1, "the start-up fetch")
    lifecycle.standins.tokens.revoke_all()

    async def stream() -> Any:
        yield b"y" * 1000

    data: Any = stream() if chunked else b"y" * 100_000
    async with lifecycle.session.post(f"{lifecycle.proxy.proxy_url}/upload", data=data) as response:
        assert response.status == 401
    assert (
        await lifecycle.metric("upstream_unauthorized_total", tenant=TENANT, outcome="passed") == 1
    )
    # The token was still dropped: the next request gets a new one.
    assert await lifecycle.fingerprint()
    assert lifecycle.token_requests == 2


async def test_a_token_revoked_moments_after_its_fetch_is_replaced_and_the_request_replayed(
    running: Lifecycle,
) -> None:
    first = await running.fingerprint()
    running.standins.tokens.revoke_all()
    second = await running.fingerprint()  # the 401 is not seen: the request was replayed
    assert second != first
    assert running.token_requests == 2
    assert (
        await running.metric("upstream_unauthorized_total", tenant=TENANT, outcome="replayed") == 1
    )


async def test_an_upstream_that_refuses_fresh_tokens_gets_its_401s_passed_not_a_fetch_each(
    start_lifecycle: Any, caplog: pytest.LogCaptureFixture
) -> None:
    attempts: list[str] = []
    lifecycle: Lifecycle = await start_lifecycle(routes=refusing_routes(attempts))
    await eventually(lambda: lifecycle.fetches() == 1, "the start-up fetch")

    assert (await lifecycle.get("/always-401"))[0] == 401  # replayed once with a new token
    assert lifecycle.token_requests == 2
    for _ in range(20):  # the new token is refused too: no new one for each request
        assert (await lifecycle.get("/always-401"))[0] == 401
    assert lifecycle.token_requests == 2
    assert len(attempts) == 2 + 20

    await lifecycle.advance(REFUSAL_HOLD_OFF)  # the hold-off ends: one more try
    assert (await lifecycle.get("/always-401"))[0] == 401
    assert lifecycle.token_requests == 3
    await lifecycle.advance(REFUSAL_HOLD_OFF)  # the next hold-off is twice as long
    assert (await lifecycle.get("/always-401"))[0] == 401
    assert lifecycle.token_requests == 3

    refusing = [r for r in caplog.records if "refuses fresh tokens" in r.getMessage()]
    assert len(refusing) == 1
    assert refusing[0].levelno == logging.WARNING


async def test_a_403_is_passed_through_without_a_new_token(start_lifecycle: Any) -> None:
    lifecycle: Lifecycle = await start_lifecycle(routes=replay_routes([]))
    await eventually(lambda: lifecycle.fetches() == 1, "the start-up fetch")
    status, _ = await lifecycle.get("/forbidden")
    assert status == 403
    assert lifecycle.token_requests == 1


async def test_the_rate_limit_auth0_reports_is_exported(start_lifecycle: Any) -> None:
    lifecycle: Lifecycle = await start_lifecycle(prefetch=False)
    lifecycle.standins.tokens.ratelimit_remaining = 29
    assert await lifecycle.fingerprint()
    assert await lifecycle.metric("token_endpoint_ratelimit_remaining", tenant=TENANT) == 29
