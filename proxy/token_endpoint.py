"""The token endpoint client: one client-credentials request, its answer read into a Token.

This is the only module that sends the client secret anywhere. It translates the token
endpoint's failures into the proxy's errors; `tokens.parse_token_response` judges a 200.
"""

from __future__ import annotations

import html
import json
import logging
import re
import time
import unicodedata
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote, quote_plus, unquote

import aiohttp
from pydantic import SecretStr

from proxy import __version__
from proxy.config import AuthSettings
from proxy.errors import (
    BadTokenResponse,
    CredentialsRejected,
    TokenEndpointUnreachable,
    TokenUnavailable,
    describe_client_error,
)
from proxy.metrics import Metrics
from proxy.network import GuardedConnector, Outbound
from proxy.tokens import Clock, SystemClock, Token, TokenKey, parse_token_response

logger = logging.getLogger("skill_engine_proxy")

# A token answer is a few kilobytes; more than this is not a token endpoint talking.
MAX_ANSWER_BYTES = 64 * 1024
# Auth0 answers in well under a second; past these the endpoint is treated as unreachable.
CONNECT_TIMEOUT = 10.0
TOTAL_TIMEOUT = 30.0
# A Retry-After longer than this is not believed: the proxy tries again after an hour.
MAX_RETRY_AFTER = 3600.0
# OAuth errors that mean the request was understood and the client is not allowed
# (RFC 6749 5.2; Auth0 also answers 401/403 with access_denied).
_REJECTION_ERRORS = frozenset(
    {"invalid_client", "unauthorized_client", "access_denied", "invalid_grant"}
)


def token_key(auth: AuthSettings, scopes: tuple[str, ...] | None = None) -> TokenKey:
    """The cache key of the token `auth` asks for, with `scopes` or else its own."""
    return TokenKey(
        token_url=auth.resolved_token_url,
        client_id=auth.client_id,
        audience=auth.audience,
        tenant=auth.tenant,
        scopes=auth.scopes if scopes is None else scopes,
    )


def client_of(key: TokenKey) -> tuple[str, str, str, str]:
    """Which client credentials a key's token is requested with (one set per tenant)."""
    return key.token_url, key.client_id, key.audience, key.tenant


def token_request_body(
    auth: AuthSettings, scopes: tuple[str, ...] | None, secret: SecretStr | None = None
) -> dict[str, Any]:
    """The documented client-credentials request, with `secret` or else the configured
    client secret; `scopes` only when there are some."""
    body: dict[str, Any] = {
        "client_id": auth.client_id,
        "client_secret": (secret or auth.secret).get_secret_value(),
        "audience": auth.audience,
        "grant_type": "client_credentials",
        "tenant": auth.tenant,
    }
    if scopes is not None:
        body["scopes"] = list(scopes)
    return body


def new_token_session(outbound: Outbound) -> aiohttp.ClientSession:
    """A session for token requests: TLS always verified (the client secret goes only to a
    proven token endpoint), no cookies kept between requests.

    The request carries the documented headers and, beyond what HTTP itself needs (Host,
    Content-Length), only a User-Agent naming the proxy, in place of aiohttp's own; not
    the Accept-Encoding aiohttp would add by default.
    """
    return aiohttp.ClientSession(
        connector=GuardedConnector(ssl=outbound.token_tls),
        timeout=aiohttp.ClientTimeout(total=TOTAL_TIMEOUT, connect=CONNECT_TIMEOUT),
        cookie_jar=aiohttp.DummyCookieJar(),
        headers={"User-Agent": f"skill-engine-proxy/{__version__}"},
        skip_auto_headers={"Accept-Encoding"},
    )


class TokenEndpoint:
    """Requests tokens for one set of client credentials.

    During a rotation (`auth.client_secret_next` set), a rejected current secret is
    followed at once by a try with the next one; if that works, it is the secret used
    from then on.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        auth: AuthSettings,
        metrics: Metrics,
        *,
        clock: Clock | None = None,
        outbound: Outbound,
    ) -> None:
        self._session = session
        self._auth = auth
        self._metrics = metrics
        self._clock = clock or SystemClock()
        self._url = auth.resolved_token_url
        self._outbound = outbound
        self._proxy = outbound.proxy_for(self._url)
        self._secrets = (auth.secret, auth.client_secret_next)
        self._promoted = False
        """The next secret worked where the current one was rejected: it is used now."""

    def successor(self, auth: AuthSettings) -> TokenEndpoint:
        """The endpoint for the same client after a reload read `auth`; a next secret
        already promoted stays promoted while the configured secrets are unchanged."""
        endpoint = TokenEndpoint(
            self._session, auth, self._metrics, clock=self._clock, outbound=self._outbound
        )
        endpoint._promoted = self._promoted and endpoint._secrets == self._secrets
        return endpoint

    @property
    def _secret_values(self) -> list[str]:
        """Every configured secret, as masking looks for them."""
        return [secret.get_secret_value() for secret in self._secrets if secret is not None]

    @property
    def secret(self) -> SecretStr:
        """The secret tokens are requested with now."""
        current, following = self._secrets
        return following if self._promoted and following is not None else current

    def has_credentials_of(self, other: TokenEndpoint) -> bool:
        """Whether `other` requests tokens with the same secrets as this endpoint."""
        return self._secrets == other._secrets

    async def fetch(self, key: TokenKey) -> Token:
        """Request a token for `key`; raise a `TokenUnavailable` that says why not."""
        current, following = self._secrets
        if self._promoted and following is not None:
            return await self._counted(key, following)
        try:
            return await self._counted(key, current)
        except CredentialsRejected:
            if following is None:
                raise
        try:
            token = await self._counted(key, following)
        except CredentialsRejected as exc:
            raise CredentialsRejected(
                f"{exc} auth.client_secret_next was rejected too, as was the current secret."
            ) from None
        self._promoted = True
        logger.warning(
            "The client secret for tenant %s was rejected; auth.client_secret_next worked "
            "and is used from now on. Make it the client secret and remove "
            "client_secret_next to finish the rotation.",
            self._auth.tenant,
        )
        return token

    async def _counted(self, key: TokenKey, secret: SecretStr) -> Token:
        tenant = self._auth.tenant
        started = time.perf_counter()
        try:
            token = await self._request(key, secret)
        except TokenUnavailable as exc:
            self._metrics.token_fetches.labels(tenant, "error").inc()
            self._screen(exc)
            raise
        finally:
            self._metrics.token_fetch_duration.labels(tenant).observe(time.perf_counter() - started)

        self._metrics.token_fetches.labels(tenant, "success").inc()
        return token

    async def _request(self, key: TokenKey, secret: SecretStr) -> Token:
        body = json.dumps(token_request_body(self._auth, key.scopes, secret)).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        obtained_at = self._clock.now()
        wall_time = time.time()
        try:
            async with self._session.post(
                self._url,
                data=body,
                headers=headers,
                allow_redirects=False,
                proxy=self._proxy.url,
                proxy_headers=self._proxy.headers,
            ) as response:
                answer = await _read_limited(response)
                status = response.status
                retry_after = _retry_after(response.headers)
                self._note_rate_limit(response.headers)
        except TimeoutError as exc:
            waited = (
                f"could not be connected to within {CONNECT_TIMEOUT:.0f} s"
                if isinstance(exc, aiohttp.ConnectionTimeoutError)
                else f"did not answer within {TOTAL_TIMEOUT:.0f} s"
            )
            raise TokenEndpointUnreachable(
                f"The token endpoint {self._url} {waited}.", reason="timeout"
            ) from exc
        except aiohttp.ClientError as exc:
            raise TokenEndpointUnreachable(
                f"Could not reach the token endpoint {self._url}: {describe_client_error(exc)}."
            ) from exc

        if status == 200:
            return parse_token_response(
                _json_or_none(answer),
                obtained_at=obtained_at,
                wall_time=wall_time,
                endpoint=self._url,
            )
        raise self._failure(status, answer, retry_after)

    def _screen(self, exc: TokenUnavailable) -> None:
        """Whatever else of the endpoint's a message quotes (a token_type, a reason phrase,
        a parser's view of its bytes) passes the same masking as its error words; if a run
        of a secret still stands, the message tells only what the proxy itself knows."""
        message = _spelt_out(str(exc), self._secret_values)
        if _holds_a_run(message, self._secret_values):
            message = (
                f"The token endpoint {self._url} answered with words that may hold the client "
                "secret; they are left out."
            )
        exc.args = (message,)

    def _note_rate_limit(self, headers: Any) -> None:
        remaining = _number(headers.get("x-ratelimit-remaining"))
        if remaining is not None:
            gauge = self._metrics.token_endpoint_ratelimit_remaining
            gauge.labels(self._auth.tenant).set(remaining)

    def _failure(self, status: int, answer: bytes, retry_after: float | None) -> TokenUnavailable:
        error, description = _oauth_error(_json_or_none(answer))
        quoted = self._quote(error, description)
        if status in (401, 403) or (status == 400 and error in _REJECTION_ERRORS):
            return CredentialsRejected(
                f"The token endpoint {self._url} rejected the client credentials for "
                f"client_id {self._auth.client_id} (HTTP {status}{quoted}). Check auth.client_id, "
                "the client secret, auth.audience and auth.tenant."
            )
        if status == 429:
            return TokenEndpointUnreachable(
                f"The token endpoint {self._url} is rate-limiting token requests "
                f"(HTTP 429{quoted}).",
                retry_after=retry_after,
                reason="rate_limited",
            )
        if status >= 500:
            return TokenEndpointUnreachable(
                f"The token endpoint {self._url} failed with HTTP {status}{quoted}.",
                retry_after=retry_after,
                reason="server_error",
            )
        return BadTokenResponse(
            f"The token endpoint {self._url} answered HTTP {status}{quoted} instead of a token."
        )

    def _quote(self, error: str | None, description: str | None) -> str:
        """Auth0's own words, trimmed, printable, and never the secret even if echoed."""
        # Mask first: trimming or replacing characters could break the secret's match.
        shown = [_masked(part, self._secret_values) for part in (error, description) if part]
        words = ": ".join(part if part is not None else _LEFT_OUT for part in shown)
        if not words:
            return ""
        words = "".join(c if c.isprintable() else " " for c in words)[:300]
        return f": {words}"


_LEFT_OUT = "(words left out: they may hold the client secret)"


def _masked(words: str, secrets: list[str]) -> str | None:
    """The token endpoint's `words` with each secret masked where spelt as an echo of the
    request body would (`_spelt_out`), or None if they may still hold one: data in an
    encoding such as base64, hex or a list of byte values, or a run of its letters and
    digits (`_holds_a_run`)."""
    words = _spelt_out(words, secrets)
    if _ENCODED_BYTES.search(words) or any(
        _has_letter_and_digit(match.group(0)) for match in _ENCODED_RUN.finditer(words)
    ):
        return None
    return None if _holds_a_run(words, secrets) else words


def _spelt_out(text: str, secrets: list[str]) -> str:
    """`text` with each secret masked as written and as a JSON string or a URL carries it."""
    for secret in secrets:
        as_json = {
            json.dumps(secret, ensure_ascii=ascii_only)[1:-1] for ascii_only in (True, False)
        }
        spellings = {secret, quote(secret, safe=""), quote_plus(secret)} | as_json
        spellings |= {spelling.replace("/", "\\/") for spelling in as_json}  # JSON may escape /
        for spelling in sorted(spellings, key=len, reverse=True):
            text = text.replace(spelling, "***")
    return text


def _holds_a_run(text: str, secrets: list[str]) -> bool:
    """Whether 12 of a secret's letters and digits in a row (all of them, for one of 8 to
    12) stand in `text` once escapes are undone and case folded (`_skeleton`)."""
    found = _skeleton(text)
    for secret in secrets:
        skeleton = _skeleton(secret)
        if len(skeleton) < _SKELETON_MIN:
            continue
        run = min(len(skeleton), _SKELETON_RUN)
        runs = {skeleton[at : at + run] for at in range(len(skeleton) - run + 1)}
        if any(found[at : at + run] in runs for at in range(len(found) - run + 1)):
            return True
    return False


def _has_letter_and_digit(text: str) -> bool:
    return any(c.isdigit() for c in text) and any(c.isalpha() for c in text)


def _skeleton(text: str) -> str:
    """The letters and digits of `text` once the escapes an echo may add are undone (URL,
    twice; JSON's \\u and a bytes repr's \\x, in either case; HTML), Unicode in one normal
    form, case folded."""
    for _ in range(2):
        text = unquote(text)
    text = _JSON_ESCAPE.sub(lambda match: chr(int(match.group(1), 16)), text)
    text = _BYTE_ESCAPES.sub(
        lambda match: bytes.fromhex(match.group(0).replace("\\x", "")).decode(errors="replace"),
        text,
    )
    text = unicodedata.normalize("NFKC", html.unescape(text)).casefold()
    return "".join(filter(str.isalnum, text))


# Base64 (either alphabet) or hex of 15 bytes or more, when it mixes letters and digits as
# encoded data does and words and paths do not; and eight or more byte values in a row.
_ENCODED_RUN = re.compile(r"[A-Za-z0-9+/=_-]{20,}")
_ENCODED_BYTES = re.compile(r"(?:\b\d{1,3}\b[\s,;]+){7}\b\d{1,3}\b")
_JSON_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})")
_BYTE_ESCAPES = re.compile(r"(?:\\x[0-9a-fA-F]{2})+")
# A secret shorter than this, in letters and digits, is masked only as spelt above; a run
# this long of a longer one in other words is no accident.
_SKELETON_MIN = 8
_SKELETON_RUN = 12


async def _read_limited(response: aiohttp.ClientResponse) -> bytes:
    answer = bytearray()
    async for chunk in response.content.iter_any():
        answer += chunk
        if len(answer) > MAX_ANSWER_BYTES:
            raise BadTokenResponse(
                f"The token endpoint {response.url} sent more than {MAX_ANSWER_BYTES} bytes."
            )
    return bytes(answer)


def _json_or_none(answer: bytes) -> Any:
    try:
        return json.loads(answer)
    except (ValueError, RecursionError):
        return None


def _oauth_error(payload: Any) -> tuple[str | None, str | None]:
    """Auth0's `error` and `error_description` (RFC 6749 5.2), when the answer has them."""
    if not isinstance(payload, dict):
        return None, None
    error = payload.get("error")
    description = payload.get("error_description")
    return (
        error if isinstance(error, str) else None,
        description if isinstance(description, str) else None,
    )


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait, from Retry-After or Auth0's x-ratelimit-reset, if either is usable;
    never more than `MAX_RETRY_AFTER`."""
    value = (headers.get("Retry-After") or "").strip()
    delay: float | None = None
    if (seconds := _number(value)) is not None:
        delay = seconds
    elif value:
        # RFC 9110 10.2.3: Retry-After is delay-seconds or an HTTP-date.
        try:
            delay = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, OverflowError):
            delay = None
    if delay is None and (reset := _number(headers.get("x-ratelimit-reset"))) is not None:
        # Auth0 sends the UNIX time at which its rate limit resets.
        delay = reset - time.time()
    return None if delay is None else min(MAX_RETRY_AFTER, max(0.0, delay))


def _number(value: str | None) -> int | None:
    """A header's non-negative integer, when it is one of sane size."""
    value = (value or "").strip()
    if not value.isascii() or not value.isdigit() or len(value) > 15:
        return None
    return int(value)
