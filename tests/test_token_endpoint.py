"""The token request on the wire, and how the token endpoint's answers are read."""

from __future__ import annotations

import base64
import html
import json
import re
import time
import unicodedata
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import pytest

from proxy import __version__
from proxy.config import AuthSettings, NetworkSettings
from proxy.errors import (
    BadTokenResponse,
    CredentialsRejected,
    TokenEndpointUnreachable,
    TokenUnavailable,
    describe_client_error,
)
from proxy.metrics import Metrics
from proxy.network import Outbound
from proxy.standins import Answer
from proxy.token_endpoint import TokenEndpoint, new_token_session, token_key, token_request_body
from proxy.tokens import Token
from tests.conftest import Standins
from tests.support import AUDIENCE, CLIENT_ID, SECRET, TENANT, KeptAliveUpstream


@pytest.fixture
async def fetch(standins: Standins) -> AsyncIterator[Any]:
    """Fetch one token from the stand-in with the given auth overrides."""
    outbound = Outbound(NetworkSettings())
    async with new_token_session(outbound) as session:

        async def fetch_token(**auth: Any) -> Token:
            settings = standins.settings(**auth).auth
            endpoint = TokenEndpoint(session, settings, Metrics(), outbound=outbound)
            return await endpoint.fetch(token_key(settings))

        yield fetch_token


@pytest.mark.parametrize(
    ("scopes", "sent_scopes"),
    [
        (None, None),
        (["read"], ["read"]),
        (["write", "read", "read_reports", "read"], ["read", "read_reports", "write"]),
    ],
)
async def test_the_token_request_is_the_documented_one(
    standins: Standins, fetch: Any, scopes: list[str] | None, sent_scopes: list[str] | None
) -> None:
    extra = {} if scopes is None else {"scopes": scopes}
    token = await fetch(**extra)

    [request] = standins.tokens.requests
    assert request.headers["Content-Type"] == "application/json"
    assert request.headers["Accept"] == "application/json"
    assert request.headers["User-Agent"] == f"skill-engine-proxy/{__version__}"
    # Beyond the documented headers only what HTTP needs: no Accept-Encoding, no repeats.
    assert sorted(name.lower() for name in request.header_names) == [
        "accept",
        "content-length",
        "content-type",
        "host",
        "user-agent",
    ]
    expected = {
        "client_id": CLIENT_ID,
        "client_secret": SECRET,
        "audience": AUDIENCE,
        "grant_type": "client_credentials",
        "tenant": TENANT,
    }
    if sent_scopes is not None:
        expected["scopes"] = sent_scopes
    assert list(request.json().items()) == list(expected.items())  # nothing else, in order
    assert token.lifetime == 3600


@pytest.mark.parametrize(
    ("region", "url"),
    [
        ("eu", "https://techwolf.eu.auth0.com/oauth/token"),
        ("us", "https://techwolf-us.us.auth0.com/oauth/token"),
    ],
)
@pytest.mark.parametrize("scopes", [None, ("read", "write")])
def test_each_region_sends_the_same_body_to_its_own_url(
    region: str, url: str, scopes: tuple[str, ...] | None
) -> None:
    auth = AuthSettings.model_validate(
        {
            "region": region,
            "client_id": CLIENT_ID,
            "client_secret": SECRET,
            "audience": AUDIENCE,
            "tenant": TENANT,
            "scopes": scopes,
        }
    )
    body = token_request_body(auth, auth.scopes)
    assert auth.resolved_token_url == url
    assert token_key(auth).token_url == url
    assert list(body) == ["client_id", "client_secret", "audience", "grant_type", "tenant"] + (
        ["scopes"] if scopes else []
    )
    assert body.get("scopes") == (list(scopes) if scopes else None)
    json.dumps(body)


async def test_rejected_credentials_quote_auth0_and_not_the_secret(fetch: Any) -> None:
    with pytest.raises(CredentialsRejected) as caught:
        await fetch(client_secret="wrong-secret-value")
    message = str(caught.value)
    assert "rejected the client credentials" in message
    assert "HTTP 401: access_denied: Unauthorized" in message
    assert "wrong-secret-value" not in message


async def test_a_secret_echoed_by_the_endpoint_is_masked(standins: Standins, fetch: Any) -> None:
    standins.tokens.answer_next(
        Answer(403, {"error": "access_denied", "error_description": f"bad secret {SECRET}"})
    )
    with pytest.raises(CredentialsRejected) as caught:
        await fetch()
    assert SECRET not in str(caught.value)
    assert "bad secret ***" in str(caught.value)


HARD_SECRET = 'se"c\\ret/\u00e9-<LEAKME>&'
LONG_SECRET = "LEAKME" + "x7Kq2-Zp_9" * 5 + "Wm3rT4Yb"  # 64 characters, as Auth0's


def go_json(secret: str) -> str:
    """JSON as Go's encoding/json writes it: <, > and & escaped as \\u."""
    text = json.dumps(secret)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


@pytest.mark.parametrize(
    ("secret", "echo", "masked"),
    [
        (HARD_SECRET, lambda secret: json.dumps({"client_secret": secret}), True),
        (HARD_SECRET, lambda secret: json.dumps([secret], ensure_ascii=False), True),
        (HARD_SECRET, lambda secret: json.dumps([secret]).replace("/", "\\/"), True),
        (HARD_SECRET, lambda secret: urlencode({"client_secret": secret}), True),
        (HARD_SECRET, repr, False),
        (HARD_SECRET, go_json, False),
        (HARD_SECRET, lambda secret: json.dumps(secret).replace("\\u00e9", "\\u00E9"), False),
        (
            HARD_SECRET,
            lambda secret: re.sub("%..", lambda hex_pair: hex_pair[0].lower(), quote(secret)),
            False,
        ),
        (HARD_SECRET, lambda secret: quote(quote(secret, safe=""), safe=""), False),
        (HARD_SECRET, html.escape, False),
        (HARD_SECRET, lambda secret: unicodedata.normalize("NFD", secret), False),
        (LONG_SECRET, lambda secret: secret[:40], False),
        (LONG_SECRET, str.upper, False),
        (HARD_SECRET, lambda secret: repr(secret.encode()), False),
        (
            LONG_SECRET,
            lambda secret: base64.b64encode(json.dumps({"s": secret}).encode()).decode(),
            False,
        ),
        (LONG_SECRET, lambda secret: secret.encode().hex(), False),
        (LONG_SECRET, lambda secret: str(list(secret.encode())), False),  # Java, Node
        (LONG_SECRET, lambda secret: "[" + " ".join(map(str, secret.encode())) + "]", False),
    ],
    ids=[
        "json-ascii",
        "json-utf8",
        "json-slash",
        "form",
        "python-repr",
        "go-json",
        "json-upper-hex",
        "url-lower-hex",
        "url-twice",
        "html",
        "nfd",
        "cut-short",
        "upper-case",
        "bytes-repr",
        "base64",
        "hex",
        "byte-list",
        "go-byte-list",
    ],
)
async def test_a_secret_echoed_in_an_escaped_spelling_is_masked(
    standins: Standins, fetch: Any, secret: str, echo: Callable[[str], str], masked: bool
) -> None:
    """An endpoint that echoes the request body quotes the secret as JSON or a form
    escapes it: masked. Other spellings, or part of the secret, leave the endpoint's words
    out altogether."""
    description = f"got {echo(secret)}"
    answer = Answer(400, {"error": "invalid_request", "error_description": description})
    message = await refusal(standins, fetch, answer, secret)
    assert ("***" in message) is masked
    assert ("left out" in message) is not masked


async def refusal(standins: Standins, fetch: Any, answer: Answer, secret: str) -> str:
    """What the proxy says of `answer` to a token request with `secret`; never LEAKME."""
    standins.tokens.answer_next(answer)
    with pytest.raises(TokenUnavailable) as caught:
        await fetch(client_secret=secret)
    message = str(caught.value)
    assert "LEAKME" not in message.upper()
    return message


async def test_ordinary_words_of_the_endpoint_are_kept(standins: Standins, fetch: Any) -> None:
    description = "Client credentials are not valid for audience https://api.example/v2"
    standins.tokens.answer_next(
        Answer(400, {"error": "invalid_request", "error_description": description})
    )
    with pytest.raises(BadTokenResponse) as caught:
        await fetch(client_secret=LONG_SECRET)
    assert description in str(caught.value)


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        # A token_type is named only when it reads as one, never at length.
        (
            Answer(200, {"access_token": "abc", "token_type": LONG_SECRET, "expires_in": 9}),
            "token_type of another kind",
        ),
        (
            Answer(200, {"access_token": "a", "token_type": "MAC", "expires_in": 9}),
            "token_type 'MAC'",
        ),
        # The secret split over the two fields, each too short to tell alone.
        (
            Answer(401, {"error": LONG_SECRET[:10], "error_description": LONG_SECRET[10:20]}),
            "may hold the client secret",
        ),
        # Anywhere in the message as written, it is masked.
        (Answer(401, {"error": "bad", "error_description": f"{LONG_SECRET}"}), "bad: ***"),
    ],
    ids=["token-type", "token-type-short", "split", "as-written"],
)
async def test_no_part_of_the_answer_quotes_the_secret(
    standins: Standins, fetch: Any, answer: Answer, expected: str
) -> None:
    message = await refusal(standins, fetch, answer, LONG_SECRET)
    assert expected in message


def test_a_parsers_quote_of_the_answers_bytes_is_not_repeated() -> None:
    """aiohttp's Python parser quotes the bytes it could not read without a colon first."""
    error = aiohttp.ClientResponseError(
        None,  # type: ignore[arg-type]
        (),
        status=400,
        message=f"Bad status line 'HTTP/1.1 4x1 {LONG_SECRET}'",
    )
    assert describe_client_error(error) == "not a valid HTTP answer (Bad status line)"


async def test_the_error_code_stays_when_the_description_is_left_out(
    standins: Standins, fetch: Any
) -> None:
    description = f"you sent {LONG_SECRET[5:30]}"
    standins.tokens.answer_next(
        Answer(400, {"error": "invalid_request", "error_description": description})
    )
    with pytest.raises(BadTokenResponse) as caught:
        await fetch(client_secret=LONG_SECRET)
    assert "HTTP 400: invalid_request: (words left out" in str(caught.value)


def token_answer(access_token: str) -> bytes:
    body = json.dumps({"access_token": access_token, "expires_in": 3600}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def test_an_answer_sent_on_an_idle_token_connection_is_no_ones_token(
    fetch: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A token endpoint's stray answer on a pooled connection would be taken as the next
    token request's answer, perhaps another tenant's."""
    issued = 0

    async def token(_: bytes) -> bytes:
        nonlocal issued
        issued += 1
        return token_answer(f"token-{issued}")

    endpoint = KeptAliveUpstream(token)
    try:
        url = await endpoint.start() + "/oauth/token"
        first = await fetch(token_url=url)
        assert first.authorization.get_secret_value() == "Bearer token-1"
        await endpoint.push(token_answer("stray"))

        second = await fetch(token_url=url)
        assert second.authorization.get_secret_value() == "Bearer token-2"
        assert len(endpoint.connections) == 2
        assert "an answer to no request on 1 idle kept-alive connection" in caplog.text
    finally:
        await endpoint.close()


@pytest.mark.parametrize(
    ("answer", "error", "words"),
    [
        (Answer(500, {"error": "server_error"}), TokenEndpointUnreachable, "failed with HTTP 500"),
        (Answer(503, b"<html>down</html>"), TokenEndpointUnreachable, "HTTP 503"),
        (Answer(429, {"error": "too_many_requests"}), TokenEndpointUnreachable, "rate-limiting"),
        (Answer(200, b"not json"), BadTokenResponse, "without a JSON object"),
        (Answer(200, {"access_token": "abc"}), BadTokenResponse, "without a positive expires_in"),
        (Answer(200, {"expires_in": 60}), BadTokenResponse, "without a non-empty access_token"),
        (Answer(400, {"error": "invalid_grant"}), CredentialsRejected, "HTTP 400: invalid_grant"),
        (Answer(400, {"error": "invalid_request"}), BadTokenResponse, "HTTP 400: invalid_request"),
        (Answer(302, None, {"Location": "https://elsewhere"}), BadTokenResponse, "HTTP 302"),
    ],
)
async def test_answers_without_a_token_become_errors(
    standins: Standins, fetch: Any, answer: Answer, error: type[TokenUnavailable], words: str
) -> None:
    standins.tokens.answer_next(answer)
    with pytest.raises(error) as caught:
        await fetch()
    assert type(caught.value) is error
    assert words in str(caught.value)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (Answer(200, {"access_token": "abc", "expires_in": int("9" * 400)}), BadTokenResponse),
        (Answer(200, b"[" * 30000), BadTokenResponse),
        (Answer(429, None, {"Retry-After": "Mon, 01 Jan 99999999999 00:00:00 GMT"}), None),
    ],
)
async def test_absurd_answers_are_errors_not_crashes(
    standins: Standins, fetch: Any, answer: Answer, error: type[TokenUnavailable] | None
) -> None:
    standins.tokens.answer_next(answer)
    with pytest.raises(error or TokenEndpointUnreachable) as caught:
        await fetch()
    assert caught.value.retry_after is None or caught.value.retry_after <= 3600


@pytest.mark.parametrize("retry_after", ["99999999999999999999", "\u0663\u0660"])
async def test_a_retry_after_that_is_not_a_sane_number_is_ignored(
    standins: Standins, fetch: Any, retry_after: str
) -> None:
    standins.tokens.answer_next(Answer(429, None, {"Retry-After": retry_after}))
    with pytest.raises(TokenEndpointUnreachable) as caught:
        await fetch()
    assert caught.value.retry_after is None


async def test_a_secret_echoed_where_the_quote_is_cut_is_still_masked(
    standins: Standins, fetch: Any
) -> None:
    description = "x" * 285 + SECRET + " and more\twords"
    standins.tokens.answer_next(
        Answer(401, {"error": "access_denied", "error_description": description})
    )
    with pytest.raises(CredentialsRejected) as caught:
        await fetch()
    assert "-secr" not in str(caught.value)  # no part of the secret: standin-secret


async def test_rate_limit_answers_say_when_to_retry(standins: Standins, fetch: Any) -> None:
    standins.tokens.answer_next(Answer(429, {"error": "too_many_requests"}, {"Retry-After": "7"}))
    with pytest.raises(TokenEndpointUnreachable) as caught:
        await fetch()
    assert caught.value.retry_after == 7


async def test_auth0s_rate_limit_reset_says_when_to_retry(standins: Standins, fetch: Any) -> None:
    reset = str(int(time.time()) + 40)
    standins.tokens.answer_next(
        Answer(429, {"error": "too_many_requests"}, {"x-ratelimit-reset": reset})
    )
    with pytest.raises(TokenEndpointUnreachable) as caught:
        await fetch()
    assert caught.value.retry_after is not None
    assert 30 < caught.value.retry_after <= 40


async def test_an_oversized_answer_is_refused(standins: Standins, fetch: Any) -> None:
    standins.tokens.answer_next(Answer(200, b"x" * (65 * 1024)))
    with pytest.raises(BadTokenResponse, match="more than"):
        await fetch()


async def test_an_unreachable_endpoint_is_reported(fetch: Any, unused_tcp_port: int) -> None:
    with pytest.raises(TokenEndpointUnreachable, match="Could not reach the token endpoint"):
        await fetch(token_url=f"http://127.0.0.1:{unused_tcp_port}/oauth/token")
