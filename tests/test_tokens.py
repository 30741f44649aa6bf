"""Token policy without sockets: usable tokens, renewal ahead of time, failures, single flight."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import random
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

import jwt
import pytest

from proxy.errors import (
    BadTokenResponse,
    CredentialsRejected,
    TokenEndpointUnreachable,
    TokenUnavailable,
)
from proxy.tokens import (
    BACKOFF_BASE,
    BACKOFF_CAP,
    MAX_LIFETIME,
    REFRESH_JITTER,
    REFUSAL_HOLD_OFF,
    REFUSAL_HOLD_OFF_CAP,
    REJECTED_COOL_DOWN,
    Freshness,
    RenewalPolicy,
    Token,
    TokenKeeper,
    TokenKey,
    parse_token_response,
)
from tests.support import FakeClock

KEY = TokenKey("https://token.example/oauth/token", "client", "aud", "tenant", ("read",))
WALL = 1_800_000_000.0


def parse(payload: object, *, obtained_at: float = 0.0) -> Token:
    return parse_token_response(payload, obtained_at=obtained_at, wall_time=WALL, endpoint="E")


class FixedJitter:
    """Jitter that always takes the same place in its range, from 0 (bottom) to 1 (top)."""

    def __init__(self, place: float) -> None:
        self.place = place

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.place


def UpperJitter() -> FixedJitter:  # noqa: N802 - reads as the class it stands for
    """Backoff delays are their ceilings, refreshes fall exactly at `refresh_at`."""
    return FixedJitter(1.0)


class Fetch:
    """A fetch that counts its calls, can be held, and fails as told."""

    def __init__(self, clock: FakeClock, lifetime: float = 3600) -> None:
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.times: list[float] = []
        """The moment of each call, on the clock."""
        self.release = asyncio.Event()
        self.release.set()
        self.failures: list[TokenUnavailable] = []

    async def __call__(self, key: TokenKey, is_fresh: Freshness) -> Token:
        self.calls += 1
        obtained_at = self.clock.now()
        self.times.append(obtained_at)
        await self.release.wait()
        if self.failures:
            raise self.failures.pop(0)
        return parse(
            {"access_token": f"token-{self.calls}", "expires_in": self.lifetime},
            obtained_at=obtained_at,
        )


class Events:
    def __init__(self) -> None:
        self.taken: list[str] = []
        self.forgotten: list[TokenKey] = []
        self.stale = 0
        self.refreshes: list[bool] = []
        self.retries: list[str] = []

    def took(self, key: TokenKey, token: Token) -> None:
        self.taken.append(token.fingerprint)

    def forgot(self, key: TokenKey) -> None:
        self.forgotten.append(key)

    def stale_use(self, key: TokenKey) -> None:
        self.stale += 1

    def refreshed(self, key: TokenKey, succeeded: bool) -> None:
        self.refreshes.append(succeeded)

    def retried(self, key: TokenKey, reason: str) -> None:
        self.retries.append(reason)


MakeKeeper = Callable[..., TokenKeeper]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fetch(clock: FakeClock) -> Fetch:
    return Fetch(clock)


@pytest.fixture
def events() -> Events:
    return Events()


@pytest.fixture
async def make_keeper(clock: FakeClock, fetch: Fetch, events: Events) -> AsyncIterator[MakeKeeper]:
    keepers: list[TokenKeeper] = []

    def make(rng: Any = None, **options: Any) -> TokenKeeper:
        policy = RenewalPolicy(**options)
        keeper = TokenKeeper(
            fetch,
            policy=lambda _key: policy,
            clock=clock,
            events=events,
            rng=rng or UpperJitter(),
        )
        keepers.append(keeper)
        return keeper

    yield make
    for keeper in keepers:
        await keeper.close()


async def settle() -> None:
    """Let the keeper's tasks run until they wait on the clock or on the fetch."""
    for _ in range(20):
        await asyncio.sleep(0)


async def advance(clock: FakeClock, seconds: float) -> None:
    clock.advance(seconds)
    await settle()


async def wake_the_worker(clock: FakeClock) -> None:
    """Move the clock to the moment the keeper's worker waits for, and let it act."""
    await settle()
    clock.advance(max(0.0, clock.next_wake() - clock.now()))
    await settle()


JITTERS = [FixedJitter(0.0), FixedJitter(0.5), FixedJitter(1.0)] + [
    random.Random(seed)  # noqa: S311 - test jitter
    for seed in range(5)
]


# What a usable token is.


@pytest.mark.parametrize("expires_in", [3600, "3600", 3600.0, " 86400 "])
def test_expires_in_may_be_a_number_or_a_numeric_string(expires_in: object) -> None:
    token = parse({"access_token": "abc", "expires_in": expires_in, "token_type": "Bearer"})
    assert token.lifetime == float(str(expires_in).strip())
    assert token.expires_at == token.lifetime
    assert token.authorization.get_secret_value() == "Bearer abc"


@pytest.mark.parametrize("expires_in", [MAX_LIFETIME + 1, 1e20, "1e300"])
def test_an_expires_in_past_any_auth0_lifetime_is_taken_as_the_longest(
    expires_in: object, caplog: pytest.LogCaptureFixture
) -> None:
    token = parse({"access_token": "abc", "expires_in": expires_in, "token_type": "Bearer"})
    assert token.lifetime == MAX_LIFETIME
    assert token.expires_at == MAX_LIFETIME
    assert "taken as 2592000 s" in caplog.text


def test_a_jwt_as_long_lived_as_its_expires_in_shows_no_clock_skew() -> None:
    lifetime = 40 * 24 * 3600
    token = parse({"access_token": jwt_token(WALL + lifetime), "expires_in": lifetime})
    assert token.lifetime == MAX_LIFETIME
    assert token.expires_at == MAX_LIFETIME
    assert token.exp_skew == 0


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


def jwt_token(exp: float) -> str:
    return jwt.encode({"sub": "client", "exp": exp}, "k" * 32, algorithm="HS256")


def test_a_jwt_is_a_valid_bearer_token() -> None:
    token_text = jwt_token(WALL + 3600)
    token = parse({"access_token": token_text, "expires_in": 3600})
    assert token.authorization.get_secret_value() == f"Bearer {token_text}"
    assert token.expires_at == 3600


def test_a_jwt_exp_earlier_than_expires_in_wins() -> None:
    token = parse({"access_token": jwt_token(WALL + 100), "expires_in": 3600}, obtained_at=50)
    assert token.expires_at == 150
    assert token.expires_at_wall == WALL + 100
    assert token.exp_skew == 100 - 3600


def test_expires_in_earlier_than_a_jwt_exp_wins() -> None:
    token = parse({"access_token": jwt_token(WALL + 7200), "expires_in": 3600})
    assert token.expires_at == 3600


def test_a_jwt_exp_too_large_for_a_float_is_ignored() -> None:
    token_text = jwt.encode({"exp": int("9" * 400)}, "k" * 32, algorithm="HS256")
    assert parse({"access_token": token_text, "expires_in": 60}).expires_at == 60


def test_token_repr_never_shows_the_token() -> None:
    token = parse({"access_token": "very-secret-token", "expires_in": 60})
    assert "very-secret-token" not in repr(token)
    assert "very-secret-token" not in str(token)


# How long a token is used, and renewal ahead of time.


async def test_requests_never_wait_while_a_refresh_runs(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch, events: Events
) -> None:
    keeper = make_keeper(refresh_at=0.8)
    first = await keeper.fetch(KEY)

    fetch.release.clear()
    await advance(clock, 3600 * 0.8)
    assert fetch.calls == 2  # the refresh started by itself
    assert keeper.cached(KEY) is first
    await advance(clock, 3600 * 0.19)  # past the margin, the refresh still running
    assert keeper.cached(KEY) is first

    fetch.release.set()
    await settle()
    second = keeper.cached(KEY)
    assert second is not None
    assert second is not first
    assert events.refreshes == [True]
    assert events.stale == 0


async def test_every_token_taken_and_every_key_forgotten_is_reported(
    make_keeper: MakeKeeper, clock: FakeClock, events: Events
) -> None:
    keeper = make_keeper(refresh_at=0.8)
    first = await keeper.fetch(KEY)
    await advance(clock, 3600 * 0.8)
    second = keeper.cached(KEY)
    assert second is not None
    assert second is not first
    assert events.taken == [first.fingerprint, second.fingerprint]

    keeper.forget(KEY)
    keeper.forget(KEY)  # gone already: nothing more to report
    assert events.forgotten == [KEY]


async def test_past_its_margin_a_token_serves_only_until_its_renewal_arrives(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    keeper = make_keeper(idle_after=10)
    first = await keeper.fetch(KEY)
    await advance(clock, 3600 - 60 - 0.001)  # idle all along: nothing was renewed
    assert fetch.calls == 1
    await advance(clock, 0.001)

    fetch.release.clear()
    assert keeper.cached(KEY) is first  # the request does not wait: renewal starts behind it
    await settle()
    assert fetch.calls == 2
    fetch.release.set()
    await settle()
    second = keeper.cached(KEY)
    assert second is not None
    assert second is not first


async def test_a_token_is_never_attached_past_its_real_expiry(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    keeper = make_keeper(idle_after=10)
    first = await keeper.fetch(KEY)
    await advance(clock, 3600)  # idle: nothing renewed it
    assert keeper.cached(KEY) is None
    assert await keeper.fetch(KEY) is not first


async def test_the_token_cache_refuses_an_expired_token_whatever_the_policy_says(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    # No config can set a margin below zero; here it stands for the keeper's own bookkeeping
    # gone wrong, holding a token usable past its real expiry. The cache does not hand it out.
    keeper = make_keeper(refresh_margin=-600)
    first = await keeper.fetch(KEY)
    fetch.release.clear()  # every renewal hangs
    await advance(clock, 3600 - 1)
    assert keeper.cached(KEY) is first
    await advance(clock, 1)
    assert keeper.cached(KEY) is None
    fetch.release.set()


def test_a_token_key_from_another_process_finds_its_token() -> None:
    # String hashes differ between processes: a key must not carry its hash across.
    code = (
        "import pickle, sys; from proxy.tokens import TokenKey; sys.stdout.buffer.write("
        "pickle.dumps(TokenKey('https://t.example', 'client', 'aud', 'tenant', ('read',))))"
    )
    pickled = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONHASHSEED": "1"},
        capture_output=True,
        check=True,
    ).stdout
    key = TokenKey("https://t.example", "client", "aud", "tenant", ("read",))
    assert {key: "token"}[pickle.loads(pickled)] == "token"  # noqa: S301 - our own bytes


async def test_a_lifetime_just_over_the_margin_still_uses_half_of_it(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    fetch.lifetime = 61
    keeper = make_keeper(idle_after=0.05)
    token = await keeper.fetch(KEY)
    await advance(clock, 30)
    assert keeper.cached(KEY) is token  # not 1 s, as lifetime - margin would give


async def test_a_request_at_the_margin_finds_the_renewal_under_way(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    fetch.lifetime = 300  # 0.8 of it is exactly where the 60 s margin begins
    keeper = make_keeper()
    token = await keeper.fetch(KEY)
    fetch.release.clear()
    clock.advance(300 - 60)  # no yield: the worker has not woken yet
    assert keeper.cached(KEY) is token
    await settle()
    assert fetch.calls == 2
    fetch.release.set()


async def test_a_margin_longer_than_the_lifetime_leaves_half_of_it_usable(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    fetch.lifetime = 30
    keeper = make_keeper()  # refresh_margin 60: longer than the token lives
    token = await keeper.fetch(KEY)
    assert fetch.calls == 1  # not useless on arrival: no second fetch at once
    fetch.release.clear()
    await advance(clock, 14)
    assert keeper.cached(KEY) is token
    assert fetch.calls == 2  # renewed ahead of half its life
    await advance(clock, 15.9)
    assert keeper.cached(KEY) is token  # the renewal hangs: served until real expiry
    await advance(clock, 0.1)
    assert keeper.cached(KEY) is None
    fetch.release.set()


async def test_an_idle_key_is_not_refreshed_until_it_is_used_again(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    keeper = make_keeper(idle_after=600, refresh_at=0.5)
    first = await keeper.fetch(KEY)

    await advance(clock, 1800)  # refresh due, but nobody asked for 30 minutes
    assert fetch.calls == 1
    await advance(clock, 600)
    assert fetch.calls == 1

    assert keeper.cached(KEY) is first  # still good: served, and renewal starts behind it
    await settle()
    assert fetch.calls == 2
    assert keeper.cached(KEY) is not first


@pytest.mark.parametrize(
    ("lifetime", "refresh_at"),
    [(3600, 0.8), (300, 0.9)],  # the second renews by its margin, before refresh_at
)
async def test_the_refresh_moment_varies_with_the_jitter_within_its_band(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch, lifetime: float, refresh_at: float
) -> None:
    fetch.lifetime = lifetime
    margin = 60
    # At refresh_at of the life, but no later than a jitter's share of the life before the
    # margin; jitter moves it up to that share earlier, never later.
    latest = min(lifetime * refresh_at, lifetime - margin - lifetime * REFRESH_JITTER)
    earliest = latest * (1 - REFRESH_JITTER)
    latest, earliest = round(latest, 6), round(earliest, 6)

    moments = []
    for jitter in JITTERS:
        keeper = make_keeper(rng=jitter, refresh_at=refresh_at, refresh_margin=margin)
        token = await keeper.fetch(KEY)
        await wake_the_worker(clock)
        moments.append(round(fetch.times[-1] - token.obtained_at, 6))
        assert keeper.cached(KEY) is not token  # that was the refresh
        await keeper.close()

    assert all(earliest <= moment <= latest for moment in moments), moments
    assert all(moment < lifetime - margin for moment in moments)
    assert moments[:3] == [earliest, round((earliest + latest) / 2, 6), latest]
    assert len(set(moments)) == len(JITTERS)  # every draw its own moment


async def test_retry_delays_are_drawn_between_zero_and_a_doubling_capped_ceiling(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    fetch.failures = [TokenEndpointUnreachable("down")] * 12
    keeper = make_keeper(rng=random.Random(7))  # noqa: S311 - test jitter
    with pytest.raises(TokenEndpointUnreachable):
        await keeper.fetch(KEY)
    while fetch.calls <= 12:
        await wake_the_worker(clock)

    delays = [round(later - earlier, 6) for earlier, later in itertools.pairwise(fetch.times)]
    ceilings = [min(BACKOFF_CAP, BACKOFF_BASE * 2**n) for n in range(len(delays))]
    assert ceilings[-3:] == [BACKOFF_CAP] * 3
    assert all(0 <= delay <= ceiling for delay, ceiling in zip(delays, ceilings, strict=True))
    assert len(set(delays)) == len(delays)  # drawn, not fixed
    assert any(delay < ceiling / 2 for delay, ceiling in zip(delays, ceilings, strict=True))


async def test_retry_after_is_a_floor_under_the_drawn_delay(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    floors = [30.0] + [0.5] * 7
    fetch.failures = [
        TokenEndpointUnreachable("429", retry_after=floor, reason="rate_limited")
        for floor in floors
    ]
    keeper = make_keeper(rng=random.Random(3))  # noqa: S311 - test jitter
    with pytest.raises(TokenEndpointUnreachable) as caught:
        await keeper.fetch(KEY)
    assert caught.value.retry_after == 30  # above the first ceiling: Retry-After decides
    while fetch.calls <= len(floors):
        await wake_the_worker(clock)

    delays = [round(later - earlier, 6) for earlier, later in itertools.pairwise(fetch.times)]
    ceilings = [min(BACKOFF_CAP, BACKOFF_BASE * 2**n) for n in range(len(delays))]
    assert delays[0] == 30
    for delay, floor, ceiling in zip(delays, floors, ceilings, strict=True):
        assert floor <= delay <= max(floor, ceiling)
    assert any(delay > 0.5 for delay in delays[1:])  # a draw above the floor stands
    assert keeper.cached(KEY) is not None


async def test_concurrent_misses_share_one_fetch(make_keeper: MakeKeeper, fetch: Fetch) -> None:
    keeper = make_keeper()
    fetch.release.clear()
    waiters = [asyncio.create_task(keeper.fetch(KEY)) for _ in range(100)]
    await settle()
    fetch.release.set()
    tokens = await asyncio.gather(*waiters)

    assert fetch.calls == 1
    assert all(token is tokens[0] for token in tokens)


async def test_a_waiter_that_gives_up_does_not_cancel_the_fetch_for_others(
    make_keeper: MakeKeeper, fetch: Fetch
) -> None:
    keeper = make_keeper()
    fetch.release.clear()
    impatient = asyncio.create_task(keeper.fetch(KEY))
    patient = asyncio.create_task(keeper.fetch(KEY))
    await settle()
    impatient.cancel()
    fetch.release.set()

    assert (await patient).fingerprint
    assert impatient.cancelled()
    assert fetch.calls == 1


async def test_scope_sets_are_separate_keys(make_keeper: MakeKeeper, fetch: Fetch) -> None:
    keeper = make_keeper()
    other = TokenKey(KEY.token_url, KEY.client_id, KEY.audience, KEY.tenant, ("read", "write"))
    assert await keeper.fetch(KEY) is not await keeper.fetch(other)
    assert fetch.calls == 2


async def test_a_token_that_arrives_past_its_usable_moment_is_an_error(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    fetch.lifetime = 30
    fetch.release.clear()
    keeper = make_keeper()
    waiter = asyncio.create_task(keeper.fetch(KEY))
    await settle()
    await advance(clock, 20)  # the answer took longer than the 15 s the token may be used
    fetch.release.set()
    with pytest.raises(BadTokenResponse, match="took longer to answer"):
        await waiter
    assert keeper.cached(KEY) is None


async def test_a_jwt_that_expires_on_arrival_blames_the_clocks(
    make_keeper: MakeKeeper, clock: FakeClock
) -> None:
    async def expired(key: TokenKey, is_fresh: Freshness) -> Token:
        return parse(
            {"access_token": jwt_token(WALL - 10), "expires_in": 3600}, obtained_at=clock.now()
        )

    keeper = TokenKeeper(expired, policy=lambda _key: RenewalPolicy(), clock=clock)
    try:
        with pytest.raises(BadTokenResponse, match="clock"):
            await keeper.fetch(KEY)
    finally:
        await keeper.close()


# When the token endpoint fails.


async def test_a_refresh_that_fails_twice_keeps_serving_the_old_token_then_succeeds(
    make_keeper: MakeKeeper,
    clock: FakeClock,
    fetch: Fetch,
    events: Events,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keeper = make_keeper(refresh_at=0.8)
    first = await keeper.fetch(KEY)
    fetch.failures = [
        TokenEndpointUnreachable("down", reason="server_error"),
        TokenEndpointUnreachable("down", reason="server_error"),
    ]

    await advance(clock, 3600 * 0.8)  # refresh: fails
    assert fetch.calls == 2
    assert keeper.cached(KEY) is first
    await advance(clock, BACKOFF_BASE)  # first retry: fails
    assert fetch.calls == 3
    assert keeper.cached(KEY) is first
    await advance(clock, BACKOFF_BASE * 2)  # second retry: succeeds
    assert fetch.calls == 4

    renewed = keeper.cached(KEY)
    assert renewed is not None
    assert renewed is not first
    assert events.refreshes == [False, False, True]
    assert events.retries == ["server_error", "server_error"]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one per failure streak, not per attempt
    assert "stays in use" in warnings[0].getMessage()


async def test_a_failing_refresh_serves_the_old_token_until_its_real_expiry(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch, events: Events
) -> None:
    keeper = make_keeper(refresh_at=0.8)
    first = await keeper.fetch(KEY)
    fetch.failures = [TokenEndpointUnreachable("down")] * 1000

    await advance(clock, 3600 - 60 + 1)  # past the margin, every renewal failed
    assert keeper.cached(KEY) is first
    assert events.stale == 1

    await advance(clock, 59)  # past the real expiry
    assert keeper.cached(KEY) is None
    with pytest.raises(TokenEndpointUnreachable) as caught:
        await keeper.fetch(KEY)
    assert caught.value.retry_after is not None


async def test_every_request_served_while_renewal_fails_is_a_stale_use(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch, events: Events
) -> None:
    keeper = make_keeper(refresh_at=0.5)
    first = await keeper.fetch(KEY)
    assert keeper.cached(KEY) is first
    assert events.stale == 0  # renewal has not failed

    fetch.failures = [TokenEndpointUnreachable("down")] * 1000
    await advance(clock, 1800)  # the refresh fails, half an hour before the margin
    for _ in range(3):
        assert keeper.cached(KEY) is first
    assert events.stale == 3
    await advance(clock, 3600 - 60 - 1800 + 1)  # past the margin, still failing
    assert keeper.cached(KEY) is first
    assert events.stale == 4

    fetch.failures = []
    await advance(clock, BACKOFF_CAP)  # a retry succeeds: no longer stale
    assert keeper.cached(KEY) is not first
    assert events.stale == 4


async def test_without_a_token_callers_are_told_when_the_next_try_is_due(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    keeper = make_keeper()
    fetch.failures = [TokenEndpointUnreachable("down"), TokenEndpointUnreachable("down")]

    with pytest.raises(TokenEndpointUnreachable) as first:
        await keeper.fetch(KEY)
    assert first.value.retry_after == BACKOFF_BASE
    await advance(clock, 0.25)
    for _ in range(50):
        with pytest.raises(TokenEndpointUnreachable) as again:
            await keeper.fetch(KEY)
        assert again.value.retry_after == pytest.approx(BACKOFF_BASE - 0.25)
    assert fetch.calls == 1  # no fetch per caller

    await advance(clock, 0.75)  # the retry is due: the keeper tries by itself
    assert fetch.calls == 2
    await advance(clock, BACKOFF_BASE * 2)
    assert fetch.calls == 3
    assert keeper.cached(KEY) is not None


async def test_the_worker_waits_quietly_while_a_fetch_runs(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    keeper = make_keeper(idle_after=0.001)  # idle: the worker leaves the retry to requests
    fetch.failures = [TokenEndpointUnreachable("down")]
    with pytest.raises(TokenEndpointUnreachable):
        await keeper.fetch(KEY)
    await advance(clock, 10)  # the retry is due; the worker found the key idle

    fetch.release.clear()
    waiter = asyncio.create_task(keeper.fetch(KEY))  # a request starts the retry
    await settle()
    sleeps = clock.sleeps
    await settle()
    assert clock.sleeps - sleeps <= 1  # no busy loop while the fetch is under way
    fetch.release.set()
    assert (await waiter).fingerprint


async def test_retry_after_from_the_token_endpoint_is_honoured(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    keeper = make_keeper()
    fetch.failures = [TokenEndpointUnreachable("429", retry_after=30, reason="rate_limited")]

    with pytest.raises(TokenEndpointUnreachable) as caught:
        await keeper.fetch(KEY)
    assert caught.value.retry_after == 30
    await advance(clock, 29.9)
    assert fetch.calls == 1
    await advance(clock, 0.1)
    assert fetch.calls == 2
    assert keeper.cached(KEY) is not None


async def test_rejected_credentials_are_tried_once_per_cool_down(
    make_keeper: MakeKeeper,
    clock: FakeClock,
    fetch: Fetch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    keeper = make_keeper()
    fetch.failures = [CredentialsRejected("Check the secret.")] * 3

    for _ in range(100):
        with pytest.raises(CredentialsRejected):
            await keeper.fetch(KEY)
    assert fetch.calls == 1
    await advance(clock, REJECTED_COOL_DOWN)
    assert fetch.calls == 2
    await advance(clock, REJECTED_COOL_DOWN)
    assert fetch.calls == 3

    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "Check the secret." in errors[0].getMessage()


async def test_a_token_nobody_uses_is_not_retried_for_ever(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    keeper = make_keeper(idle_after=100)
    fetch.failures = [TokenEndpointUnreachable("down")] * 1000
    with pytest.raises(TokenEndpointUnreachable):
        await keeper.fetch(KEY)
    for _ in range(20):
        await advance(clock, 60)
    calls = fetch.calls
    for _ in range(20):
        await advance(clock, 60)
    assert fetch.calls == calls


async def test_a_request_for_an_idle_failing_key_restarts_its_retries(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch, events: Events
) -> None:
    keeper = make_keeper(idle_after=100, refresh_at=0.8)
    first = await keeper.fetch(KEY)
    await advance(clock, 3600 * 0.8 - 50)
    assert keeper.cached(KEY) is first  # in use when the refresh falls due
    fetch.failures = [TokenEndpointUnreachable("down")] * 1000
    await advance(clock, 50)
    assert fetch.calls == 2  # the refresh failed
    await advance(clock, 700)  # retries stop: nobody asked for over ten minutes
    calls = fetch.calls

    assert keeper.cached(KEY) is first  # past the margin: the failing token, stale
    await settle()
    assert fetch.calls == calls + 1  # and the request set the retries going again
    assert events.stale == 1


async def test_callers_do_not_wait_for_a_retry_under_way(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    keeper = make_keeper()
    fetch.failures = [TokenEndpointUnreachable("down")]
    with pytest.raises(TokenEndpointUnreachable):
        await keeper.fetch(KEY)
    fetch.release.clear()
    await advance(clock, BACKOFF_BASE)  # the retry starts, and hangs
    assert fetch.calls == 2
    with pytest.raises(TokenEndpointUnreachable) as caught:
        await asyncio.wait_for(keeper.fetch(KEY), timeout=1)
    assert caught.value.retry_after == 1.0
    fetch.release.set()


async def test_an_unexpected_error_in_a_fetch_is_a_failure_and_the_worker_survives(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    keeper = make_keeper()
    first = await keeper.fetch(KEY)
    fetch.failures = [RuntimeError("a bug")]  # type: ignore[list-item]
    await advance(clock, 3600 * 0.8)
    assert fetch.calls == 2
    assert keeper.cached(KEY) is first  # still served while renewal fails
    await advance(clock, BACKOFF_BASE)
    assert fetch.calls == 3  # the worker retried: it did not die
    assert keeper.cached(KEY) is not first


async def test_an_unexpected_error_is_told_without_its_message(
    make_keeper: MakeKeeper, fetch: Fetch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug's message may quote the secret it was handling (a UnicodeEncodeError does)."""
    bug = UnicodeEncodeError("utf-8", "s3cret\udcff", 6, 7, "surrogates")
    fetch.failures = [bug]  # type: ignore[list-item]
    keeper = make_keeper()
    with pytest.raises(BadTokenResponse) as caught:
        await keeper.fetch(KEY)
    assert "failed unexpectedly (UnicodeEncodeError)" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    assert "failed unexpectedly (UnicodeEncodeError), at:" in caplog.text
    assert "s3cret" not in caplog.text


async def test_a_key_readiness_depends_on_recovers_by_itself_after_a_long_outage(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    keeper = make_keeper(idle_after=600)
    fetch.failures = [TokenEndpointUnreachable("down")] * 1000
    keeper.prefetch(KEY)
    await settle()
    for _ in range(4000 // 60):  # more than an hour, nobody sending requests
        await advance(clock, 60)
    assert keeper.problem(KEY) == "no token: down"
    fetch.failures = []
    await advance(clock, BACKOFF_CAP)
    assert keeper.problem(KEY) is None


async def test_rejected_credentials_put_right_are_noticed_by_themselves(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    keeper = make_keeper(idle_after=600)
    fetch.failures = [CredentialsRejected("Check the secret.")] * 1000
    keeper.prefetch(KEY)
    await settle()
    for _ in range(10):
        await advance(clock, 600)
    assert keeper.problem(KEY) == "credentials rejected: Check the secret."
    calls = fetch.calls
    assert calls <= 6000 / REJECTED_COOL_DOWN + 1
    fetch.failures = []  # the operator fixed the secret
    await advance(clock, REJECTED_COOL_DOWN)
    assert keeper.problem(KEY) is None


async def test_an_idle_healthy_key_stays_ready_without_renewals(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    keeper = make_keeper(idle_after=600)
    keeper.prefetch(KEY)
    await settle()
    for _ in range(48):  # two days of readiness probes only
        await advance(clock, 3600)
        assert keeper.problem(KEY) is None
    assert fetch.calls == 1  # nobody used it: no renewal spent quota
    assert await keeper.fetch(KEY)  # the next request fetches on demand
    assert fetch.calls == 2


# After an upstream 401.


async def test_drop_forgets_only_the_current_token_and_fetches_a_new_one(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    keeper = make_keeper()
    token = await keeper.fetch(KEY)
    fetch.release.clear()
    assert keeper.drop(KEY, token)  # moments after its fetch: revoked, say
    assert not keeper.drop(KEY, token)  # the rest of a burst of 401s
    assert keeper.cached(KEY) is None
    await settle()
    assert fetch.calls == 2  # the new token is on its way before anyone asks
    fetch.release.set()
    await settle()
    renewed = keeper.cached(KEY)
    assert renewed is not None
    assert renewed is not token
    assert keeper.problem(KEY) is None


async def a_day_of_requests(keeper: TokenKeeper, clock: FakeClock, *, refused: bool) -> None:
    """One request a minute for a day; each answered 401 by the upstream when `refused`."""
    for _ in range(24 * 60):
        await advance(clock, 60)
        token = keeper.cached(KEY) or await keeper.fetch(KEY)
        if refused:
            keeper.drop(KEY, token)
    await settle()


async def test_an_upstream_that_refuses_every_token_does_not_eat_the_quota(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch, caplog: pytest.LogCaptureFixture
) -> None:
    healthy = make_keeper()
    await a_day_of_requests(healthy, clock, refused=False)
    renewals = fetch.calls

    fetch.calls = 0
    refusing = make_keeper()
    await a_day_of_requests(refusing, clock, refused=True)
    # Drops soon after drops double the wait, from a minute to an hour: a handful a day.
    assert fetch.calls <= renewals + 12
    assert REFUSAL_HOLD_OFF_CAP == 3600
    refusing_fresh = [r for r in caplog.records if "refuses fresh tokens" in r.getMessage()]
    assert len(refusing_fresh) == 1  # once, not once per refusal
    assert refusing_fresh[0].levelno == logging.WARNING
    assert "auth.audience and auth.tenant" in refusing_fresh[0].getMessage()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_fresh_tokens_refused_soon_after_a_drop_are_held_back_ever_longer(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    fetch.lifetime = 86400  # no renewal meanwhile: every new token is a replacement
    keeper = make_keeper()
    refused = await keeper.fetch(KEY)
    assert keeper.drop(KEY, refused)  # a first refusal: replaced at once

    waits = []
    for _ in range(8):
        await settle()
        replacement = keeper.cached(KEY)
        assert replacement is not None
        waited = 0.0
        while not keeper.drop(KEY, replacement):  # refused too: its 401s pass for now
            assert keeper.cached(KEY) is replacement
            await advance(clock, REFUSAL_HOLD_OFF)
            waited += REFUSAL_HOLD_OFF
        waits.append(waited)
    assert waits == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    await settle()
    assert fetch.calls == 1 + 1 + 8


async def test_a_refusal_long_after_the_last_one_replaces_even_a_young_token(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch, caplog: pytest.LogCaptureFixture
) -> None:
    fetch.lifetime = 300
    keeper = make_keeper()
    assert keeper.drop(KEY, await keeper.fetch(KEY))
    await settle()
    replacement = keeper.cached(KEY)
    await advance(clock, 300 * 0.8)  # renewed in the background since
    renewed = keeper.cached(KEY)
    assert renewed is not None
    assert renewed is not replacement
    assert clock.now() - renewed.obtained_at < REFUSAL_HOLD_OFF

    assert keeper.drop(KEY, renewed)  # not soon after the last refusal: one of its own
    assert not [r for r in caplog.records if "refuses fresh tokens" in r.getMessage()]


async def test_a_closed_keeper_fetches_nothing(make_keeper: MakeKeeper, fetch: Fetch) -> None:
    keeper = make_keeper()
    await keeper.close()
    with pytest.raises(TokenEndpointUnreachable, match="stopping"):
        await keeper.fetch(KEY)
    assert fetch.calls == 0


# Readiness.


async def test_readiness_follows_the_token(
    make_keeper: MakeKeeper, clock: FakeClock, fetch: Fetch
) -> None:
    keeper = make_keeper()
    assert keeper.problem(KEY) is None  # a key nobody asked for is nobody's problem
    fetch.release.clear()
    keeper.prefetch(KEY)
    await settle()
    assert keeper.problem(KEY) == "no token yet"
    fetch.release.set()
    await settle()
    assert keeper.problem(KEY) is None
    assert fetch.calls == 1
