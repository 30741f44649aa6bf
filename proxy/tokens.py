"""Token policy: what a usable token is, when it is renewed, and what happens when renewing fails.

Nothing here does I/O. `TokenKeeper` is given a `fetch` coroutine function (the token
endpoint client in production, a fake in policy tests) and a `Clock`, so every rule below
can be tested without sockets and without waiting.

For each key (token URL, client, audience, tenant, scope set) the keeper holds one token, in
a `cachetools.TLRUCache` that stops handing it out at its real expiry, and one background
worker:

- A request takes the current token without waiting while it is usable: until
  `expires_at - refresh_margin`, and after that until `expires_at` only while no newer token
  can be had (a renewal is under way, started by that request if need be, or failing).
- The worker renews the token at `refresh_at` of its lifetime (with a little jitter), unless
  nobody used the key for `idle_after` seconds: then it waits until somebody does.
- A failed fetch is retried with capped exponential backoff and full jitter, not sooner
  than the token endpoint's own Retry-After; until then a caller without a usable token is
  told at once when the next try is due. Rejected credentials are not retried for a
  cool-down.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import hashlib
import logging
import math
import random
import re
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import jwt
from cachetools import TLRUCache
from pydantic import SecretStr

from proxy.errors import (
    BadTokenResponse,
    CredentialsRejected,
    TokenEndpointUnreachable,
    TokenUnavailable,
)

logger = logging.getLogger("skill_engine_proxy")

# RFC 6750 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
_TOKEN_TYPE = re.compile(r"[A-Za-z][A-Za-z_-]{0,15}")
# expires_in and a JWT's exp this far apart mean one of the two clocks is off.
_CLOCK_SKEW_WARNING = 60.0

# Auth0's longest access token lifetime (30 days): a longer expires_in is a mistake or
# hostile, and taken as this, so that the token is still renewed some day.
MAX_LIFETIME = 30 * 24 * 3600.0

# Retries of a failed fetch: full jitter over base * 2**n, never more than the cap.
BACKOFF_BASE = 1.0
BACKOFF_CAP = 60.0
# After rejected credentials, one new try per cool-down, whatever the callers do.
REJECTED_COOL_DOWN = 60.0
# After an upstream 401 replaced a token, another 401 soon after says the upstream refuses
# fresh tokens (a wrong audience, say): the token is replaced again only once it is this
# old, and each such replacement doubles the wait, up to the cap, so that tokens nobody
# accepts cost a handful of token requests a day, not one per request.
REFUSAL_HOLD_OFF = 60.0
REFUSAL_HOLD_OFF_CAP = 3600.0
# The Retry-After a caller gets while a retry is under way: its outcome is soon known.
_RETRY_UNDER_WAY = 1.0
# How much earlier than `refresh_at` a refresh may fall, so that proxies started together
# do not all renew in the same second.
REFRESH_JITTER = 0.05


Freshness = Callable[["Token"], bool]
"""Whether a token another process fetched is one the keeper would take instead of fetching."""
Fetch = Callable[["TokenKey", Freshness], Awaitable["Token"]]
"""Obtain a token for a key: from a shared store when it holds a fresh one, else by fetching."""


class Clock(Protocol):
    """Monotonic time, and a way to wait for a moment of it."""

    def now(self) -> float: ...

    async def sleep_until(self, moment: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.monotonic()

    async def sleep_until(self, moment: float) -> None:
        await asyncio.sleep(max(0.0, moment - time.monotonic()))


class TokenEvents(Protocol):
    """What the keeper reports, for metrics."""

    def took(self, key: TokenKey, token: Token) -> None:
        """`token` is the key's token from now on, fetched or read from a shared store."""
        ...

    def forgot(self, key: TokenKey) -> None:
        """The key and its token are dropped: no route leads to it any more."""
        ...

    def stale_use(self, key: TokenKey) -> None: ...

    def refreshed(self, key: TokenKey, succeeded: bool) -> None: ...

    def retried(self, key: TokenKey, reason: str) -> None: ...


class NoEvents:
    def took(self, key: TokenKey, token: Token) -> None:
        pass

    def forgot(self, key: TokenKey) -> None:
        pass

    def stale_use(self, key: TokenKey) -> None:
        pass

    def refreshed(self, key: TokenKey, succeeded: bool) -> None:
        pass

    def retried(self, key: TokenKey, reason: str) -> None:
        pass


@dataclass(frozen=True, slots=True)
class TokenKey:
    """What a token is valid for. `scopes` is sorted and unique; None asks for all scopes."""

    token_url: str
    client_id: str
    audience: str
    tenant: str
    scopes: tuple[str, ...] | None
    _hash: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Hashed once: every request looks its key up, and hashing five fields each time
        # would cost more than the rest of the lookup.
        object.__setattr__(self, "_hash", hash(self._fields()))

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple[type[TokenKey], tuple[Any, ...]]:
        # Rebuilt, not copied, in another process: string hashes differ between processes.
        return TokenKey, self._fields()

    def _fields(self) -> tuple[str, str, str, str, tuple[str, ...] | None]:
        return self.token_url, self.client_id, self.audience, self.tenant, self.scopes

    @property
    def scopes_label(self) -> str:
        """The scope set as the metrics show it: sorted, space-separated, empty for all."""
        return " ".join(self.scopes or ())


@dataclass(frozen=True, slots=True)
class Token:
    """A bearer token with its lifetime. The token itself is never printed."""

    authorization: SecretStr = field(repr=False)
    """The whole `Authorization` header value, built once: `Bearer <token>`."""
    fingerprint: str
    lifetime: float
    obtained_at: float
    """Monotonic time the token request was sent: the lifetime counts from no earlier."""
    expires_at: float
    """Monotonic real expiry: the earlier of `expires_in` and a JWT's `exp`."""
    expires_at_wall: float
    """Wall-clock real expiry, for the expiry gauge."""
    exp_skew: float | None = None
    """A JWT's `exp` minus the expiry `expires_in` gives, in seconds; None if not a JWT."""
    granted_scope: str = ""


def token_record(token: Token) -> dict[str, Any]:
    """`token` as plain data another process can read back (times on the wall clock)."""
    lived = token.expires_at - token.obtained_at
    return {
        "access_token": token.authorization.get_secret_value().removeprefix("Bearer "),
        "lifetime": token.lifetime,
        "obtained_at_wall": token.expires_at_wall - lived,
        "expires_at_wall": token.expires_at_wall,
        "exp_skew": token.exp_skew,
        "scope": token.granted_scope,
    }


def token_from_record(record: Any, *, now: float, wall_now: float) -> Token | None:
    """The token `token_record` wrote, on this process's monotonic clock; None if the
    record is not one."""
    try:
        access_token = record["access_token"]
        obtained_at_wall = float(record["obtained_at_wall"])
        expires_at_wall = float(record["expires_at_wall"])
        lifetime = float(record["lifetime"])
        skew = record.get("exp_skew")
        scope = record.get("scope", "")
    except (KeyError, TypeError, ValueError):
        return None
    if not isinstance(access_token, str) or not _B64TOKEN.fullmatch(access_token):
        return None
    obtained_at = now - (wall_now - obtained_at_wall)
    return Token(
        authorization=SecretStr(f"Bearer {access_token}"),
        fingerprint=fingerprint(access_token),
        lifetime=lifetime,
        obtained_at=obtained_at,
        expires_at=obtained_at + (expires_at_wall - obtained_at_wall),
        expires_at_wall=expires_at_wall,
        exp_skew=float(skew) if isinstance(skew, int | float) else None,
        granted_scope=scope if isinstance(scope, str) else "",
    )


def fingerprint(token: str) -> str:
    """A short, one-way name for a token, safe to log."""
    return hashlib.sha256(token.encode()).hexdigest()[:12]


def parse_token_response(
    payload: Any, *, obtained_at: float, wall_time: float, endpoint: str
) -> Token:
    """The token in a 200 answer of the token endpoint, or `BadTokenResponse`."""
    if not isinstance(payload, dict):
        raise BadTokenResponse(f"The token endpoint {endpoint} answered 200 without a JSON object.")

    access_token = payload.get("access_token")
    if not isinstance(access_token, str) or not access_token:
        raise BadTokenResponse(
            f"The token endpoint {endpoint} answered 200 without a non-empty access_token."
        )
    if not _B64TOKEN.fullmatch(access_token):
        # RFC 6750 2.1: a bearer token is a b64token; anything else cannot go in the header.
        raise BadTokenResponse(
            f"The token endpoint {endpoint} answered 200 with an access_token that is not "
            "a valid bearer token."
        )

    token_type = payload.get("token_type", "Bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        # Named only if it reads as a token type (RFC 6749 7.1: "bearer", "mac"), never the
        # endpoint's text at length: it could echo anything.
        shown = repr(token_type) if _TOKEN_TYPE.fullmatch(str(token_type)) else "of another kind"
        raise BadTokenResponse(
            f"The token endpoint {endpoint} answered with token_type {shown}; "
            "only Bearer tokens can be attached."
        )

    lifetime = _seconds(payload.get("expires_in"))
    if lifetime is None:
        raise BadTokenResponse(
            f"The token endpoint {endpoint} answered 200 without a positive expires_in."
        )
    reported = lifetime
    if lifetime > MAX_LIFETIME:
        logger.warning(
            "The token endpoint %s gave a token expires_in %.0f s, longer than any Auth0 "
            "access token lives; it is taken as %.0f s (30 days).",
            endpoint,
            lifetime,
            MAX_LIFETIME,
        )
        lifetime = MAX_LIFETIME

    exp = _jwt_expiry(access_token)
    exp_skew = None if exp is None else exp - (wall_time + reported)
    # The token is good for the shorter of the two: expires_in, or the JWT's own exp.
    real_lifetime = lifetime if exp is None else min(lifetime, exp - wall_time)
    scope = payload.get("scope")
    return Token(
        authorization=SecretStr(f"Bearer {access_token}"),
        fingerprint=fingerprint(access_token),
        lifetime=lifetime,
        obtained_at=obtained_at,
        expires_at=obtained_at + real_lifetime,
        expires_at_wall=wall_time + real_lifetime,
        exp_skew=exp_skew,
        granted_scope=scope if isinstance(scope, str) else "",
    )


def _seconds(value: Any) -> float | None:
    """A positive, finite number of seconds from an int or a numeric string, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        seconds = float(value.strip() if isinstance(value, str) else value)
    except (ValueError, OverflowError):
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        return None
    return seconds


def _jwt_expiry(access_token: str) -> float | None:
    """The `exp` claim when the token is a JWT, read without checking its signature: the
    proxy is not the token's audience, it only needs to know when the token stops working."""
    try:
        claims = jwt.decode(access_token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        return None
    try:
        seconds = float(exp)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


@dataclass(frozen=True, slots=True)
class RenewalPolicy:
    """When one key's token is renewed: the config's auth.refresh_margin, auth.refresh_at
    and auth.idle_after of its tenant."""

    refresh_margin: float = 60.0
    refresh_at: float = 0.8
    idle_after: float = 3600.0


class KeyPhase(enum.Enum):
    """Where the renewal of one key's token stands."""

    EMPTY = "empty"
    """Nothing fetched yet, or the token was dropped after an upstream 401."""
    VALID = "valid"
    """The last fetch succeeded."""
    FAILING = "failing"
    """The last fetch failed for a reason that may pass; a retry is due at `retry_at`."""
    REJECTED = "rejected"
    """The token endpoint refused the credentials; no new try before `retry_at`."""


@dataclass(eq=False)
class _KeyState:
    key: TokenKey
    policy: RenewalPolicy
    phase: KeyPhase = KeyPhase.EMPTY
    usable_until: float = -math.inf
    """Past this, the key's token is attached only if no newer one can be had."""
    expires_at: float = -math.inf
    """The real expiry of the key's token; -inf while it has none (never had, or dropped)."""
    refresh_at: float = math.inf
    retry_at: float = -math.inf
    failure: TokenUnavailable | None = None
    failures: int = 0
    fetched: bool = False
    """A fetch for this key has succeeded at least once."""
    kept: bool = False
    """Readiness depends on this key: its failures are retried even while it is idle."""
    last_used: float = -math.inf
    parked: bool = False
    """The worker found the key idle and waits for a request before renewing."""
    hold_off: float = REFUSAL_HOLD_OFF
    """How old a token must be before a 401 soon after the last one replaces it too."""
    last_refusal: float = -math.inf
    """When the upstream last refused this key's current token."""
    refusing_warned: bool = False
    """The WARNING that the upstream refuses fresh tokens was logged in this streak."""
    refused: Token | None = None
    """The last token the upstream refused: a shared store's copy of it is not taken."""
    renew_now: bool = False
    """The credentials changed: fetch a new token as soon as no fetch is under way."""
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once a fetch for this key has succeeded."""
    expiry_reported: bool = False
    short_warned: bool = False
    skew_warned: bool = False
    in_flight: asyncio.Task[Token] | None = None
    worker: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def is_failing(self) -> bool:
        return self.phase is KeyPhase.FAILING or self.phase is KeyPhase.REJECTED


class TokenKeeper:
    """One token per `TokenKey`, renewed ahead of time and kept through token endpoint outages.

    `cached` is the hot path: a dictionary lookup, a clock reading, a cache lookup (which
    reads the clock too) and a few comparisons; no lock, no await, no allocation. `fetch`
    is for callers that found no usable token: it joins the first fetch, or starts one, or
    fails at once while the token endpoint is failing.

    The tokens themselves live in a TLRU cache whose time-to-use is each token's real
    expiry and whose timer is the keeper's clock: whatever the per-key bookkeeping says, an
    expired token is never handed out.
    """

    def __init__(
        self,
        fetch: Fetch,
        *,
        policy: Callable[[TokenKey], RenewalPolicy],
        clock: Clock | None = None,
        events: TokenEvents | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._fetch = fetch
        self._policy = policy
        self._clock = clock or SystemClock()
        self._events = events or NoEvents()
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._states: dict[TokenKey, _KeyState] = {}
        # No size bound: the config bounds the keys, and `forget` removes those it drops.
        self._tokens: TLRUCache[TokenKey, Token, float] = TLRUCache(
            math.inf, _real_expiry, timer=self._clock.now
        )
        self._closed = False

    def cached(self, key: TokenKey) -> Token | None:
        """The token to attach for `key` now, or None when the caller must `fetch`."""
        state = self._states.get(key)
        if state is None:
            return None
        now = self._clock.now()
        try:
            # The cache reads the clock after `now`: a token it hands out is valid at `now`.
            token = self._tokens[key]
        except KeyError:  # none yet, dropped, or past its real expiry
            return None
        state.last_used = now
        if state.parked:
            self._unpark(state)  # renewal was due while nobody asked: now somebody does
        if state.failure is not None:
            # Renewing this token fails: every request it serves meanwhile is a stale use,
            # before the margin as after it.
            self._events.stale_use(key)
        elif now >= state.usable_until and state.in_flight is None and not self._closed:
            # Past the margin with no renewal under way (the key was idle, or the worker
            # has yet to wake): renew now. No newer token can be had sooner than that
            # renewal brings it, so this one serves until then.
            self._start_attempt(state)
        return token

    async def fetch(self, key: TokenKey) -> Token:
        """A usable token for `key`, fetched if need be; `TokenUnavailable` says why not
        and, in `retry_after`, when the keeper tries again."""
        if self._closed:
            raise TokenEndpointUnreachable("The proxy is stopping; no new token is fetched.")
        state = self._state(key)
        token = self.cached(key)
        if token is not None:
            return token
        now = self._clock.now()
        if state.failure is not None:
            # The token endpoint is failing: callers are told when the next try is due at
            # once, not made to wait for a retry that may hang as long as its timeout.
            self._report_expiry(state, now)
            if state.in_flight is not None:
                raise _again(state.failure, _RETRY_UNDER_WAY)
            if now < state.retry_at:
                raise _again(state.failure, state.retry_at - now)
        if state.in_flight is None:
            self._start_attempt(state)
        assert state.in_flight is not None
        # A caller that gives up (its client went away) must not cancel the others' fetch.
        return await asyncio.shield(state.in_flight)

    def keep(self, key: TokenKey, kept: bool = True) -> None:
        """Retry the token for `key` while it fails even when nobody asks for it: readiness
        depends on it, and a proxy nobody sends requests to must become ready by itself.
        `kept=False` ends that, for a key no route needs at start any more."""
        if kept:
            self._state(key).kept = True
        elif (state := self._states.get(key)) is not None:
            state.kept = False

    def held_keys(self) -> list[TokenKey]:
        """Every key the keeper holds a token or a worker for."""
        return list(self._states)

    def renew(self, key: TokenKey) -> None:
        """Fetch a new token for `key` now, because its credentials changed; the current
        token stays in use until the new one is in hand (or expires)."""
        state = self._states.get(key)
        if state is None or self._closed or (key not in self._tokens and not state.is_failing()):
            return  # nothing to replace: the next request fetches with the new credentials
        state.renew_now = True
        state.retry_at = -math.inf  # new credentials deserve a try before any cool-down ends
        self._unpark(state)

    def reconsider_policies(self) -> None:
        """Read every key's renewal policy again (after a reload); the next token obeys it."""
        for state in self._states.values():
            state.policy = self._policy(state.key)

    async def wait_for_tokens(self, keys: list[TokenKey]) -> None:
        """Return once a fetch for each of `keys` (held by the keeper) has succeeded."""
        await asyncio.gather(*(self._states[key].arrived.wait() for key in keys))

    def forget(self, key: TokenKey) -> None:
        """Drop `key`, its token and its worker: no route leads to it any more."""
        state = self._states.pop(key, None)
        if state is None:
            return
        self._discard(key)
        for task in (state.worker, state.in_flight):
            if task is not None:
                task.cancel()
        self._events.forgot(key)

    def prefetch(self, key: TokenKey) -> None:
        """Fetch the token for `key` now, without waiting for it, and `keep` it."""
        self.keep(key)
        state = self._states[key]
        if state.in_flight is None and key not in self._tokens:
            self._start_attempt(state)

    def problem(self, key: TokenKey) -> str | None:
        """Why a request for `key` could not be served now, or None if it could (a key
        whose token lapsed while idle can: it is fetched on demand)."""
        state = self._states.get(key)
        if state is None:
            return None
        if key in self._tokens:
            return None
        if isinstance(state.failure, CredentialsRejected):
            return f"credentials rejected: {state.failure}"
        if state.failure is not None:
            return f"no token: {state.failure}"
        return None if state.fetched else "no token yet"

    def failure(self, key: TokenKey) -> TokenUnavailable | None:
        """Why the last fetch for `key` failed, while it is still failing."""
        state = self._states.get(key)
        return None if state is None else state.failure

    def drop(self, key: TokenKey, token: Token) -> bool:
        """Forget `token` after the upstream refused it, and fetch a new one, if it is still
        the current token (so that a burst of 401s costs one fetch); True if it was dropped.

        A refusal out of the blue always drops the token, however young: one revoked moments
        after its fetch is recovered from at once. A refusal soon after the last one says
        the upstream refuses fresh tokens too (a wrong audience or tenant, say): the token
        is kept, and its 401s go to the clients, until it is `hold_off` old; then it is
        replaced and the hold-off doubles, up to an hour. The streak ends when no refusal
        came for twice the hold-off.
        """
        state = self._states.get(key)
        if state is None or self._tokens.get(key) is not token:
            return False
        now = self._clock.now()
        streak = now - state.last_refusal <= 2 * state.hold_off
        state.last_refusal = now
        if not streak:
            state.hold_off = REFUSAL_HOLD_OFF
            state.refusing_warned = False
            logger.warning(
                "The upstream refused the token for tenant %s (fingerprint %s); fetching a "
                "new one.",
                key.tenant,
                token.fingerprint,
            )
        else:
            self._warn_refusing(state)
            if now - token.obtained_at < state.hold_off:
                return False
            state.hold_off = min(2 * state.hold_off, REFUSAL_HOLD_OFF_CAP)
            logger.info(
                "Replacing the token for tenant %s (fingerprint %s) that the upstream keeps "
                "refusing; the next replacement waits %.0f s.",
                key.tenant,
                token.fingerprint,
                state.hold_off,
            )
        self._replace(state, token, now)
        return True

    def _replace(self, state: _KeyState, refused: Token, now: float) -> None:
        """Forget the refused token and fetch another, unless a fetch is under way or due."""
        self._discard(state.key)
        state.expires_at = -math.inf
        state.refused = refused
        state.usable_until = -math.inf
        state.refresh_at = math.inf
        if state.phase is KeyPhase.VALID:
            state.phase = KeyPhase.EMPTY
        if state.in_flight is None and now >= state.retry_at and not self._closed:
            self._start_attempt(state)

    def _warn_refusing(self, state: _KeyState) -> None:
        """Once per streak: the upstream refuses the tokens that replace refused ones."""
        if state.refusing_warned:
            return
        state.refusing_warned = True
        logger.warning(
            "The upstream refuses fresh tokens for tenant %s too: the audience or the tenant "
            "is likely wrong; check auth.audience and auth.tenant against what TechWolf gave "
            "you. Its 401s now go to the clients, and the token is replaced at most once "
            "per %.0f s, then less and less often, down to once an hour.",
            state.key.tenant,
            state.hold_off,
        )

    async def close(self) -> None:
        """Stop every worker and fetch; used when the proxy stops."""
        self._closed = True
        tasks = [
            task
            for state in self._states.values()
            for task in (state.worker, state.in_flight)
            if task is not None
        ]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _state(self, key: TokenKey) -> _KeyState:
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = _KeyState(key, self._policy(key))
            state.worker = asyncio.create_task(self._work(state), name=f"tokens:{key.tenant}")
        state.last_used = self._clock.now()
        if state.parked:
            self._unpark(state)
        return state

    def _discard(self, key: TokenKey) -> None:
        with contextlib.suppress(KeyError):  # gone already, or expired meanwhile
            del self._tokens[key]

    def _unpark(self, state: _KeyState) -> None:
        state.parked = False
        state.wake.set()

    def _report_expiry(self, state: _KeyState, now: float) -> None:
        """Once per failure streak: the token kept in use while renewals failed ran out."""
        if state.expiry_reported or not -math.inf < state.expires_at <= now:
            return
        state.expiry_reported = True
        logger.error(
            "The token for tenant %s has expired and renewing it keeps failing: %s Requests "
            "get 503 until a renewal succeeds.",
            state.key.tenant,
            state.failure,
        )

    def _start_attempt(self, state: _KeyState) -> asyncio.Task[Token]:
        task = asyncio.create_task(self._attempt(state))
        state.in_flight = task

        def finished(done: asyncio.Task[Token]) -> None:
            if state.in_flight is done:
                state.in_flight = None
            state.wake.set()  # the worker plans its next step from the new state
            if not done.cancelled():
                done.exception()  # every waiter has had it; asyncio need not log it

        task.add_done_callback(finished)
        return task

    async def _attempt(self, state: _KeyState) -> Token:
        state.renew_now = False
        if state.failure is not None:
            self._events.retried(state.key, state.failure.reason)
        try:
            token = await self._fetch(state.key, self._freshness(state))
            if self._usable_until(state, token) <= self._clock.now():
                raise self._unusable_on_arrival(token)
        except TokenUnavailable as exc:
            raise self._failed(state, exc) from None
        except Exception as exc:
            # A bug, not the endpoint's doing: still a failed fetch, retried like one. Its
            # message may quote a secret it was handling: only its type and where it was
            # raised are told, to the log and to callers.
            logger.error(
                "Fetching a token for tenant %s failed unexpectedly (%s), at:\n%s",
                state.key.tenant,
                type(exc).__name__,
                "".join(traceback.format_tb(exc.__traceback__)).rstrip(),
            )
            unexpected = BadTokenResponse(
                f"Fetching a token failed unexpectedly ({type(exc).__name__})."
            )
            raise self._failed(state, unexpected) from None
        self._succeeded(state, token)
        return token

    def _unusable_on_arrival(self, token: Token) -> BadTokenResponse:
        skew = token.exp_skew
        if skew is not None and skew < -_CLOCK_SKEW_WARNING:
            return BadTokenResponse(
                f"The token's exp claim ends its life {-skew:.0f} s before its expires_in "
                "does, too soon to use it: this machine's clock or the token endpoint's is off."
            )
        return BadTokenResponse(
            "The token endpoint took longer to answer than its token may be used "
            f"({token.lifetime:.0f} s minus the refresh margin)."
        )

    def _freshness(self, state: _KeyState) -> Freshness:
        """Which token found in a shared store this key takes instead of fetching one: not
        the token being replaced, and not yet due for renewal itself."""
        replaced = self._tokens.get(state.key) or state.refused

        def is_fresh(token: Token) -> bool:
            if replaced is not None and token.fingerprint == replaced.fingerprint:
                return False
            earliest, _latest = self._renewal_window(state, token)
            return self._clock.now() < earliest

        return is_fresh

    def _succeeded(self, state: _KeyState, token: Token) -> None:
        key = state.key
        if state.failure is not None:
            how = "fetched again after failures"
        else:
            how = "renewed" if key in self._tokens else "fetched"
        state.phase = KeyPhase.VALID
        self._tokens[key] = token
        state.expires_at = token.expires_at
        state.fetched = True
        state.usable_until = self._usable_until(state, token)
        state.refresh_at = self._refresh_time(state, token)
        state.failure = None
        state.failures = 0
        state.retry_at = -math.inf
        state.expiry_reported = False
        state.arrived.set()
        self._events.took(key, token)
        logger.info(
            "Token %s for tenant %s (scopes: %s), valid for %.0f s, fingerprint %s",
            how,
            key.tenant,
            key.scopes_label or "all",
            token.expires_at - token.obtained_at,
            token.fingerprint,
        )
        lifetime = token.expires_at - token.obtained_at
        margin = state.policy.refresh_margin
        if lifetime <= 2 * margin and not state.short_warned:
            state.short_warned = True
            logger.warning(
                "The token for tenant %s lives %.0f s, less than twice auth.refresh_margin "
                "(%.0f s); it is used for half its lifetime instead.",
                key.tenant,
                lifetime,
                margin,
            )
        skew = token.exp_skew
        if skew is not None and abs(skew) > _CLOCK_SKEW_WARNING and not state.skew_warned:
            state.skew_warned = True
            logger.warning(
                "The token for tenant %s expires %.0f s %s by its exp claim than by "
                "expires_in: this machine's clock or the token endpoint's is off. The "
                "earlier of the two is used.",
                key.tenant,
                abs(skew),
                "earlier" if skew < 0 else "later",
            )

    def _failed(self, state: _KeyState, exc: TokenUnavailable) -> TokenUnavailable:
        """Record a failed fetch; the error to raise, with the next try in Retry-After."""
        key = state.key
        now = self._clock.now()
        first = state.failures == 0
        state.failures += 1
        state.failure = exc
        if isinstance(exc, CredentialsRejected):
            entered = state.phase is not KeyPhase.REJECTED
            state.phase = KeyPhase.REJECTED
            state.retry_at = now + REJECTED_COOL_DOWN
            if entered:
                logger.error(
                    "%s No new token request for tenant %s for %.0f s.",
                    exc,
                    key.tenant,
                    REJECTED_COOL_DOWN,
                )
        else:
            state.phase = KeyPhase.FAILING
            state.retry_at = now + self._backoff(state.failures, exc.retry_after)
            if first:
                self._log_failure_streak(state, exc, now)
        return _again(exc, state.retry_at - now)

    def _log_failure_streak(self, state: _KeyState, exc: TokenUnavailable, now: float) -> None:
        token = self._tokens.get(state.key)
        if token is not None:
            logger.warning(
                "Renewing the token for tenant %s failed: %s The current token stays in use "
                "for up to %.0f s more; retrying in %.1f s.",
                state.key.tenant,
                exc,
                token.expires_at - now,
                state.retry_at - now,
            )
        else:
            logger.error(
                "No token for tenant %s: %s Retrying in %.1f s.",
                state.key.tenant,
                exc,
                state.retry_at - now,
            )

    def _backoff(self, failures: int, retry_after: float | None) -> float:
        ceiling = min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (failures - 1))
        delay = self._rng.uniform(0, ceiling)
        return max(delay, retry_after or 0.0)

    def _usable_until(self, state: _KeyState, token: Token) -> float:
        lifetime = token.expires_at - token.obtained_at
        # A margin as long as the lifetime would make a token useless on arrival, and a
        # nearly as long one would renew it every few seconds: use half the life at most.
        return token.expires_at - min(state.policy.refresh_margin, lifetime / 2)

    def _refresh_time(self, state: _KeyState, token: Token) -> float:
        return self._rng.uniform(*self._renewal_window(state, token))

    def _renewal_window(self, state: _KeyState, token: Token) -> tuple[float, float]:
        """The moments between which `token` is renewed: up to `REFRESH_JITTER` of its age
        before the latest, so that proxies started together do not renew together."""
        lifetime = token.expires_at - token.obtained_at
        # At refresh_at of the lifetime, but never later than a little before the margin:
        # a request arriving right then must find the renewal under way, not wait for it.
        latest = min(
            token.obtained_at + lifetime * state.policy.refresh_at,
            self._usable_until(state, token) - lifetime * REFRESH_JITTER,
        )
        return latest - (latest - token.obtained_at) * REFRESH_JITTER, latest

    async def _work(self, state: _KeyState) -> None:
        """Renew the token of one key ahead of time, and retry failed fetches."""
        while True:
            try:
                await self._step(state)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("The token worker for tenant %s failed.", state.key.tenant)
                await self._sleep(state, self._clock.now() + BACKOFF_CAP)

    async def _step(self, state: _KeyState) -> None:
        # While a fetch runs, only its end (which wakes the worker) can change the plan.
        await self._sleep(state, None if state.in_flight is not None else self._due(state))
        if state.in_flight is not None:
            return
        now = self._clock.now()
        due = self._due(state)
        if due is None or now < due:
            return
        idle = now - state.last_used >= state.policy.idle_after
        if idle and not state.renew_now and not (state.kept and state.is_failing()):
            # Nobody asked for this key lately: spend no quota on it until someone does.
            # A failing key readiness depends on is retried all the same, so that the
            # proxy becomes ready again by itself when the token endpoint recovers.
            state.parked = True
            return
        try:
            await asyncio.shield(self._start_attempt(state))
        except TokenUnavailable:
            self._events.refreshed(state.key, succeeded=False)
        else:
            self._events.refreshed(state.key, succeeded=True)

    def _due(self, state: _KeyState) -> float | None:
        if state.parked:
            return None
        if state.renew_now:
            return -math.inf
        if state.phase is KeyPhase.VALID:
            return state.refresh_at
        if state.is_failing():
            return state.retry_at
        return None

    async def _sleep(self, state: _KeyState, until: float | None) -> None:
        """Wait until `until` (forever if None) or until something wakes the worker."""
        state.wake.clear()
        waiting: list[asyncio.Future[Any]] = [asyncio.ensure_future(state.wake.wait())]
        if until is not None:
            waiting.append(asyncio.ensure_future(self._clock.sleep_until(until)))
        try:
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waiting:
                task.cancel()


def _real_expiry(_key: TokenKey, token: Token, _now: float) -> float:
    """How long the token cache may hand `token` out: until its real expiry, no later."""
    return token.expires_at


def _again(exc: TokenUnavailable, retry_after: float) -> TokenUnavailable:
    """`exc` again, for another caller, with the time until the next try."""
    return type(exc)(str(exc), retry_after=retry_after, reason=exc.reason)
