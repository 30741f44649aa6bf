"""Token policy: what a usable token is, how long it is kept, and who fetches a missing one.

Nothing here does I/O. `TokenCache` is given a `fetch` coroutine function (the token
endpoint client in production, a fake in policy tests) and a monotonic clock.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from cachetools import TLRUCache
from pydantic import SecretStr

from proxy.errors import BadTokenResponse, TokenUnavailable

logger = logging.getLogger("skill_engine_proxy")

Clock = Callable[[], float]

# RFC 6750 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")
# Each (token URL, client, audience, tenant, scope set) is one entry; the config bounds them.
_MAX_KEYS = 1024


@dataclass(frozen=True, slots=True)
class TokenKey:
    """What a token is valid for. `scopes` is sorted and unique; None asks for all scopes."""

    token_url: str
    client_id: str
    audience: str
    tenant: str
    scopes: tuple[str, ...] | None

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
    expires_at_wall: float
    """Wall-clock expiry, for the expiry gauge."""
    granted_scope: str = ""

    @property
    def expires_at(self) -> float:
        return self.obtained_at + self.lifetime


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
        raise BadTokenResponse(
            f"The token endpoint {endpoint} answered with token_type {token_type!r}; "
            "only Bearer tokens can be attached."
        )

    lifetime = _seconds(payload.get("expires_in"))
    if lifetime is None:
        raise BadTokenResponse(
            f"The token endpoint {endpoint} answered 200 without a positive expires_in."
        )

    scope = payload.get("scope")
    return Token(
        authorization=SecretStr(f"Bearer {access_token}"),
        fingerprint=fingerprint(access_token),
        lifetime=lifetime,
        obtained_at=obtained_at,
        expires_at_wall=wall_time + lifetime,
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


class TokenCache:
    """One token per `TokenKey`, kept until `lifetime - refresh_margin` after it was requested.

    `cached` is the hot path: a dictionary lookup, no lock and no await. `fetch` runs a
    single flight per key: however many callers find no token, one token request goes out
    and all of them get its token or its error. An error is not kept.
    """

    def __init__(
        self,
        fetch: Callable[[TokenKey], Awaitable[Token]],
        *,
        refresh_margin: float,
        clock: Clock = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._refresh_margin = refresh_margin
        self._clock = clock
        self._tokens: TLRUCache[TokenKey, Token] = TLRUCache(
            maxsize=_MAX_KEYS, ttu=self._usable_until, timer=clock
        )
        self._in_flight: dict[TokenKey, asyncio.Task[Token]] = {}

    def cached(self, key: TokenKey) -> Token | None:
        """The token for `key` if one is still usable now, else None."""
        return self._tokens.get(key)

    async def get(self, key: TokenKey) -> Token:
        """A usable token for `key`, fetching one if none is cached."""
        token = self._tokens.get(key)
        if token is not None:
            return token
        return await self.fetch(key)

    async def fetch(self, key: TokenKey) -> Token:
        """Join the fetch under way for `key`, or start one."""
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.ensure_future(self._fetch_and_keep(key))
            self._in_flight[key] = task
            task.add_done_callback(lambda done: self._forget(key, done))
        # A caller that gives up (its client went away) must not cancel the others' fetch.
        return await asyncio.shield(task)

    async def close(self) -> None:
        """Cancel fetches still under way; used when the proxy stops."""
        tasks = list(self._in_flight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _fetch_and_keep(self, key: TokenKey) -> Token:
        try:
            token = await self._fetch(key)
            if self._usable_until(key, token, 0.0) <= self._clock():
                raise BadTokenResponse(
                    "The token endpoint took longer to answer than its token may be used "
                    f"({token.lifetime:.0f} s minus the refresh margin)."
                )
        except TokenUnavailable as exc:
            logger.error("No token for tenant %s: %s", key.tenant, exc)
            raise
        logger.info(
            "Token fetched for tenant %s (scopes: %s), valid for %.0f s, fingerprint %s",
            key.tenant,
            key.scopes_label or "all",
            token.lifetime,
            token.fingerprint,
        )
        if token.lifetime <= self._refresh_margin:
            logger.warning(
                "The token for tenant %s lives %.0f s, not more than auth.refresh_margin "
                "(%.0f s); it is used for half its lifetime instead.",
                key.tenant,
                token.lifetime,
                self._refresh_margin,
            )
        self._tokens[key] = token
        return token

    def _usable_until(self, _key: object, token: Token, _now: float) -> float:
        margin = self._refresh_margin
        if token.lifetime <= margin:
            # A margin as long as the lifetime would make every token useless on arrival
            # and spend one token request per proxied request.
            margin = token.lifetime / 2
        return token.obtained_at + token.lifetime - margin

    def _forget(self, key: TokenKey, task: asyncio.Task[Token]) -> None:
        if self._in_flight.get(key) is task:
            del self._in_flight[key]
        if not task.cancelled():
            # Every waiter has had the error; mark it retrieved so asyncio does not log it.
            task.exception()
