"""Stand-ins for TechWolf's token endpoint and Skill Engine, as small aiohttp apps.

`demo` runs them on loopback so the proxy can be tried without credentials or network, and
the tests run them to see exactly what the proxy sent. They behave like the real services
where the proxy can tell (status codes, error bodies, bearer checks) and can be told to
misbehave.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web

from proxy.tokens import fingerprint

# What the stand-ins remember of recent requests, for tests and a long-running demo alike.
_REMEMBERED = 1000
_CHUNK = 64 * 1024
ALL_SCOPES = ("read", "write", "read_reports")


@dataclass(frozen=True)
class Answer:
    """A canned answer the stand-in token endpoint gives instead of a token."""

    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenRequest:
    """A token request as the stand-in received it."""

    headers: dict[str, str]
    body: bytes
    header_names: tuple[str, ...] = ()
    """Every header's name as sent, in order, repeats included."""

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class Issued:
    scopes: tuple[str, ...]
    expires_at: float


class StandinTokenEndpoint:
    """Answers client-credentials requests like TechWolf's Auth0 tenant does.

    Tokens are JWTs, as Auth0's are, whose `exp` is `exp_offset` seconds after the moment
    `expires_in` gives (0: they agree). `lifetime` is the `expires_in` it answers (a number,
    or a string to mimic a server that sends one). `delay` holds every answer back; clearing
    `gate` holds them until it is set again; `answer_next` queues canned failures;
    `ratelimit_remaining`, when set, is sent as Auth0's x-ratelimit-remaining.
    """

    def __init__(
        self,
        *,
        client_id: str = "standin-client",
        client_secret: str = "standin-secret",  # noqa: S107 - the stand-in's own secret
        audience: str = "standin.techwolf.ai",
        lifetime: float | str = 3600,
        exp_offset: float = 0.0,
        delay: float = 0.0,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.audience = audience
        self.lifetime = lifetime
        self.exp_offset = exp_offset
        self.delay = delay
        self.gate = asyncio.Event()
        self.gate.set()
        self.ratelimit_remaining: int | None = None
        self.requests: deque[TokenRequest] = deque(maxlen=_REMEMBERED)
        self.issued: dict[str, Issued] = {}
        self._queued: deque[Answer] = deque()
        self._signing_key = secrets.token_bytes(32)

    def answer_next(self, answer: Answer, times: int = 1) -> None:
        """Give `answer` to the next `times` token requests."""
        self._queued.extend([answer] * times)

    def recover(self) -> None:
        """Drop the canned answers still queued: grant tokens again."""
        self._queued.clear()

    def is_valid(self, token: str) -> bool:
        issued = self.issued.get(token)
        return issued is not None and time.monotonic() < issued.expires_at

    def revoke_all(self) -> None:
        """Forget every token issued so far: the stand-in Skill Engine answers 401 to them."""
        self.issued.clear()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth/token", self._token)
        return app

    async def _token(self, request: web.Request) -> web.Response:
        body = await request.read()
        names = tuple(name.decode("latin-1") for name, _ in request.raw_headers)
        self.requests.append(TokenRequest(dict(request.headers), body, names))
        if self.delay:
            await asyncio.sleep(self.delay)
        await self.gate.wait()
        response = _answer(self._queued.popleft()) if self._queued else self._grant(request, body)
        if self.ratelimit_remaining is not None:
            response.headers["x-ratelimit-remaining"] = str(self.ratelimit_remaining)
        return response

    def _grant(self, request: web.Request, body: bytes) -> web.Response:
        if request.content_type != "application/json":
            return _oauth_error(400, "invalid_request", "Content-Type must be application/json")
        try:
            payload = json.loads(body)
        except ValueError:
            return _oauth_error(400, "invalid_request", "Invalid JSON body")
        if not isinstance(payload, dict) or payload.get("grant_type") != "client_credentials":
            return _oauth_error(403, "unauthorized_client", "Grant type not allowed")
        if (
            payload.get("client_id") != self.client_id
            or payload.get("client_secret") != self.client_secret
        ):
            return _oauth_error(401, "access_denied", "Unauthorized")
        if payload.get("audience") != self.audience:
            return _oauth_error(
                403, "access_denied", f"Service not found: {payload.get('audience')}"
            )

        requested = payload.get("scopes")
        scopes = tuple(requested) if isinstance(requested, list) else ALL_SCOPES
        lifetime = float(self.lifetime)
        claims = {
            "iss": "https://stand-in.auth0.example/",
            "sub": f"{self.client_id}@clients",
            "aud": self.audience,
            "iat": int(time.time()),
            "exp": math.ceil(time.time() + lifetime + self.exp_offset),
            "jti": secrets.token_hex(8),
        }
        token = jwt.encode(claims, self._signing_key, algorithm="HS256")
        self.issued[token] = Issued(scopes, time.monotonic() + lifetime + min(self.exp_offset, 0))
        return web.json_response(
            {
                "access_token": token,
                "expires_in": self.lifetime,
                "scope": " ".join(scopes),
                "token_type": "Bearer",
            }
        )


def _oauth_error(status: int, error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=status)


def _answer(answer: Answer) -> web.Response:
    if answer.body is None or isinstance(answer.body, bytes | str):
        return web.Response(status=answer.status, body=answer.body, headers=answer.headers)
    return web.json_response(answer.body, status=answer.status, headers=answer.headers)


@dataclass(frozen=True)
class Received:
    """A request as the stand-in Skill Engine received it, header bytes as sent."""

    method: str
    raw_path: str
    raw_headers: tuple[tuple[bytes, bytes], ...]

    def header_values(self, name: str) -> list[str]:
        wanted = name.lower().encode()
        return [value.decode("latin-1") for key, value in self.raw_headers if key.lower() == wanted]


class StandinSkillEngine:
    """A Skill Engine that accepts only tokens `tokens` issued and unexpired.

    Routes: `GET /version`; `/echo...` (any method) describes the request it got;
    `GET /bytes/{n}` streams n bytes (HEAD: the same headers, no body); `/sink` reads a whole
    body and reports its size and hash.
    """

    def __init__(self, tokens: StandinTokenEndpoint) -> None:
        self.tokens = tokens
        self.received: deque[Received] = deque(maxlen=_REMEMBERED)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._bearer_only])
        app.router.add_get("/version", self._version)
        app.router.add_route("*", r"/echo{tail:[\s\S]*}", self._echo)
        app.router.add_get("/bytes/{size:[0-9]+}", self._bytes)
        app.router.add_route("*", "/sink", self._sink)
        return app

    @web.middleware
    async def _bearer_only(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.received.append(Received(request.method, request.raw_path, tuple(request.raw_headers)))
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not self.tokens.is_valid(token):
            # RFC 6750 3.1: the challenge names the error.
            return web.json_response(
                {"error": "invalid_token", "message": "A valid bearer token is required."},
                status=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        response: web.StreamResponse = await handler(request)
        return response

    async def _version(self, _request: web.Request) -> web.Response:
        return web.json_response({"service": "Skill Engine stand-in", "version": "standin"})

    async def _echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        token = request.headers["Authorization"].partition(" ")[2]
        shown_token = f"Bearer <token {fingerprint(token)}>"
        headers = [
            [name, shown_token if name.lower() == "authorization" else value]
            for name, value in request.headers.items()
        ]
        return web.json_response(
            {
                "method": request.method,
                "path": request.raw_path,
                "headers": headers,
                "body_bytes": len(body),
                "body_sha256": hashlib.sha256(body).hexdigest(),
                "token_fingerprint": fingerprint(token),
            }
        )

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        size = int(request.match_info["size"])
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if "length" in request.query:
            response.content_length = size
        await response.prepare(request)
        if request.method == "HEAD":
            # aiohttp serves HEAD on GET routes; RFC 9110 9.3.2: the headers a GET would
            # get, and no body, or the next answer on the connection starts with its bytes.
            await response.write_eof()
            return response
        block = b"x" * _CHUNK
        while size > 0:
            await response.write(block[:size])
            size -= _CHUNK
        await response.write_eof()
        return response

    async def _sink(self, request: web.Request) -> web.Response:
        digest = hashlib.sha256()
        size = 0
        async for chunk in request.content.iter_any():
            digest.update(chunk)
            size += len(chunk)
        return web.json_response({"bytes": size, "sha256": digest.hexdigest()})
