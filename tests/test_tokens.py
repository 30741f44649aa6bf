"""Token policy without sockets: what a usable token is, how long it lives, single flight."""

from __future__ import annotations

import asyncio

import pytest

from proxy.errors import BadTokenResponse, TokenEndpointUnreachable
from proxy.tokens import Token, TokenCache, TokenKey, parse_token_response
from tests.support import FakeClock

KEY = TokenKey("https://token.example/oauth/token", "client", "aud", "tenant", ("read",))


def parse(payload: object) -> Token:
    return parse_token_response(payload, obtained_at=0.0, wall_time=0.0, endpoint="E")


class CountingFetch:
    """A fetch that counts its calls and can be held or made to fail."""

    def __init__(self, clock: FakeClock, lifetime: float = 3600) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.release = asyncio.Event()
        self.release.set()
        self.failures: list[Exception] = []

    async def __call__(self, key: TokenKey) -> Token:
        self.calls += 1
        await self.release.wait()
        if self.failures:
            raise self.failures.pop(0)
        return parse_token_response(
            {"access_token": f"token-{self.calls}", "expires_in": self.lifetime},
            obtained_at=self.clock(),
            wall_time=0.0,
            endpoint="E",
        )


def test_a_jwt_shaped_token_is_a_valid_bearer_token() -> None:
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJlLV8rLw=="
    assert parse({"access_token": jwt, "expires_in": 60}).authorization.get_secret_value() == (
        f"Bearer {jwt}"
    )


@pytest.mark.parametrize("expires_in", [3600, "3600", 3600.0, " 86400 "])
def test_expires_in_may_be_a_number_or_a_numeric_string(expires_in: object) -> None:
    token = parse({"access_token": "abc", "expires_in": expires_in, "token_type": "Bearer"})
    assert token.lifetime == float(str(expires_in).strip())
    assert token.authorization.get_secret_value() == "Bearer abc"


@pytest.mark.parametrize(
    "payload",
    [
        None,
        [],
        {"expires_in": 3600},
        {"access_token": "", "expires_in": 3600},
        {"access_token": 42, "expires_in": 3600},
        {"access_token": "abc"},
        {"access_token": "abc", "expires_in": 0},
        {"access_token": "abc", "expires_in": -5},
        {"access_token": "abc", "expires_in": "soon"},
        {"access_token": "abc", "expires_in": True},
        {"access_token": "abc", "expires_in": float("inf")},
        {"access_token": "abc", "expires_in": 3600, "token_type": "mac"},
        {"access_token": "two words", "expires_in": 3600},
        {"access_token": "line\r\nbreak", "expires_in": 3600},
        {"access_token": "nul\x00byte", "expires_in": 3600},
        {"access_token": "del\x7f", "expires_in": 3600},
        {"access_token": "caf\u00e9", "expires_in": 3600},
        {"access_token": "=abc", "expires_in": 3600},
    ],
)
def test_an_answer_without_a_usable_token_is_an_error(payload: object) -> None:
    with pytest.raises(BadTokenResponse):
        parse(payload)


def test_token_repr_never_shows_the_token() -> None:
    token = parse({"access_token": "very-secret-token", "expires_in": 60})
    assert "very-secret-token" not in repr(token)
    assert "very-secret-token" not in str(token)


async def test_token_is_reused_until_lifetime_minus_margin_then_fetched_again() -> None:
    clock = FakeClock()
    fetch = CountingFetch(clock, lifetime=3600)
    cache = TokenCache(fetch, refresh_margin=60, clock=clock)

    first = await cache.get(KEY)
    clock.advance(3539.9)
    assert cache.cached(KEY) is first
    assert await cache.get(KEY) is first

    clock.advance(0.1)
    assert cache.cached(KEY) is None
    second = await cache.get(KEY)
    assert second is not first
    assert fetch.calls == 2


async def test_a_margin_longer_than_the_lifetime_keeps_the_token_for_half_of_it() -> None:
    clock = FakeClock()
    fetch = CountingFetch(clock, lifetime=30)
    cache = TokenCache(fetch, refresh_margin=60, clock=clock)

    token = await cache.get(KEY)
    clock.advance(14.9)
    assert cache.cached(KEY) is token
    clock.advance(0.1)
    assert cache.cached(KEY) is None


async def test_concurrent_misses_share_one_fetch() -> None:
    clock = FakeClock()
    fetch = CountingFetch(clock)
    fetch.release.clear()
    cache = TokenCache(fetch, refresh_margin=60, clock=clock)

    waiters = [asyncio.create_task(cache.get(KEY)) for _ in range(100)]
    await asyncio.sleep(0)
    fetch.release.set()
    tokens = await asyncio.gather(*waiters)

    assert fetch.calls == 1
    assert all(token is tokens[0] for token in tokens)


async def test_a_failed_fetch_reaches_every_waiter_and_is_not_kept() -> None:
    clock = FakeClock()
    fetch = CountingFetch(clock)
    fetch.release.clear()
    fetch.failures.append(TokenEndpointUnreachable("down"))
    cache = TokenCache(fetch, refresh_margin=60, clock=clock)

    waiters = [asyncio.create_task(cache.get(KEY)) for _ in range(10)]
    await asyncio.sleep(0)
    fetch.release.set()
    outcomes = await asyncio.gather(*waiters, return_exceptions=True)

    assert all(isinstance(outcome, TokenEndpointUnreachable) for outcome in outcomes)
    assert fetch.calls == 1
    assert cache.cached(KEY) is None
    assert (await cache.get(KEY)).fingerprint
    assert fetch.calls == 2


async def test_a_waiter_that_gives_up_does_not_cancel_the_fetch_for_others() -> None:
    clock = FakeClock()
    fetch = CountingFetch(clock)
    fetch.release.clear()
    cache = TokenCache(fetch, refresh_margin=60, clock=clock)

    impatient = asyncio.create_task(cache.get(KEY))
    patient = asyncio.create_task(cache.get(KEY))
    await asyncio.sleep(0)
    impatient.cancel()
    fetch.release.set()

    assert (await patient).fingerprint
    assert impatient.cancelled()
    assert fetch.calls == 1


async def test_scope_sets_are_separate_keys() -> None:
    clock = FakeClock()
    fetch = CountingFetch(clock)
    cache = TokenCache(fetch, refresh_margin=60, clock=clock)
    other = TokenKey(KEY.token_url, KEY.client_id, KEY.audience, KEY.tenant, ("read", "write"))

    assert await cache.get(KEY) is not await cache.get(other)
    assert fetch.calls == 2


async def test_a_token_that_arrives_past_its_usable_moment_is_an_error_not_attached() -> None:
    clock = FakeClock()

    async def slow_fetch(key: TokenKey) -> Token:
        token = parse_token_response(
            {"access_token": "late", "expires_in": 30},
            obtained_at=clock(),
            wall_time=0.0,
            endpoint="E",
        )
        clock.advance(20)  # the answer took longer than the 15 s the token may be used
        return token

    cache = TokenCache(slow_fetch, refresh_margin=60, clock=clock)
    with pytest.raises(BadTokenResponse, match="took longer to answer"):
        await cache.get(KEY)
    assert cache.cached(KEY) is None
