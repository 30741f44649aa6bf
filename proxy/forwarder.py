"""Forwarding one request: check the target, build the upstream request, attach the token,
send it, and stream the answer back.

The proxy adds nothing the client did not send except the bearer token, the upstream's own
Host and the message framing of its own hop; it passes back what the upstream answered,
minus hop-by-hop headers, without decoding the body.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, TypeVar

import aiohttp
from aiohttp import hdrs, web
from aiohttp.connector import Connection
from aiohttp.http import HttpVersion10, HttpVersion11
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config import UpstreamSettings
from proxy.errors import (
    ERROR_HEADER,
    BadRequest,
    ClientGone,
    ProxyError,
    TokenUnavailable,
    UpstreamTimeout,
    UpstreamUnreachable,
    describe_client_error,
)
from proxy.logs import REQUEST_ID_HEADER, AccessRecord
from proxy.metrics import Metrics
from proxy.network import GuardedConnector, Outbound
from proxy.routes import SCOPES_HEADER, TENANT_HEADER, Destination
from proxy.tokens import Token, TokenKeeper, TokenKey

logger = logging.getLogger("skill_engine_proxy")

# The status already sent to the client, once a relayed answer has begun.
SENT_STATUS = web.RequestKey("sent_status", int)

# RFC 9110 7.6.1: hop-by-hop fields, plus the Connection header's own list (read per
# message) and the obsolete Proxy-Connection that old clients still send.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Request fields the proxy answers for itself at its own hop:
# - Host is the upstream's (RFC 9110 7.2), set from the upstream URL;
# - Authorization is replaced by exactly one bearer token (RFC 6750 2.1);
# - Expect: 100-continue is answered by the proxy once it has a token and is about to
#   forward (RFC 9110 10.1.1), so the upstream gets the body without a second wait.
# - X-Skill-Engine-Tenant and X-Skill-Engine-Scopes are the proxy's own routing headers.
_REQUEST_FIELDS_NOT_FORWARDED = HOP_BY_HOP | {
    "host",
    "authorization",
    "expect",
    TENANT_HEADER.lower(),
    SCOPES_HEADER.lower(),
}
# Answer fields not relayed: the hop-by-hop ones, and the header that marks the proxy's own
# errors, which an upstream must not be able to forge.
_ANSWER_FIELDS_NOT_RELAYED = HOP_BY_HOP | {ERROR_HEADER.lower()}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# An answer with a Content-Length up to this is read whole before it is relayed (as nginx
# buffers answers), so that its header and body leave in one write.
WHOLE_ANSWER_LIMIT = 64 * 1024
# What the proxy itself answers to OPTIONS with Max-Forwards: 0 (RFC 9110 7.6.2).
_ALLOWED_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"

# aiohttp's client would otherwise add these to a request the client sent without them.
_NO_AUTO_HEADERS = frozenset(
    {hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.USER_AGENT, hdrs.CONTENT_TYPE}
)


class _UpstreamHeadersOnly(web.StreamResponse):
    """A relayed answer carries only the upstream's headers (and the framing of this hop).

    aiohttp's server adds Server, and Content-Type to any response with a body, as it
    prepares the headers; they are taken out again when the upstream did not send them.
    aiohttp's one public hook after that step is an Application's `on_response_prepare`,
    which its low-level server does not have: this overrides the private method behind it
    instead, and `test_the_proxy_adds_no_content_type_or_server_of_its_own` notices if a
    newer aiohttp stops calling it.
    """

    added_by_server: tuple[str, ...] = ()

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        for name in self.added_by_server:
            self.headers.popall(name, None)


class ForwardedResponse(_UpstreamHeadersOnly):
    """A response that relays an upstream answer, its body streamed as it arrives."""

    def __init__(self, upstream: aiohttp.ClientResponse) -> None:
        """Raises `UnrelayableHeader` when an upstream header cannot be passed on intact."""
        super().__init__(**_status_and_headers(upstream))
        self.added_by_server = _added_by_server(upstream)


class WholeForwardedResponse(web.Response, _UpstreamHeadersOnly):
    """A relayed answer whose body was read whole: aiohttp writes it with the header in one
    system call instead of two, the largest saving on a small request (bench/)."""

    def __init__(self, upstream: aiohttp.ClientResponse, body: bytes) -> None:
        """Raises `UnrelayableHeader` when an upstream header cannot be passed on intact."""
        super().__init__(body=body, **_status_and_headers(upstream))
        self.added_by_server = _added_by_server(upstream)


def _status_and_headers(upstream: aiohttp.ClientResponse) -> dict[str, Any]:
    return {
        "status": upstream.status,
        "reason": _reason(upstream),
        "headers": forwardable_headers(upstream.raw_headers, _ANSWER_FIELDS_NOT_RELAYED),
    }


def _added_by_server(upstream: aiohttp.ClientResponse) -> tuple[str, ...]:
    return tuple(name for name in (hdrs.SERVER, hdrs.CONTENT_TYPE) if name not in upstream.headers)


def _reason(upstream: aiohttp.ClientResponse) -> str | None:
    """The upstream's reason phrase, or the standard one where aiohttp's writer would drop
    bytes of it; clients ignore it anyway (RFC 9112 4)."""
    reason = upstream.reason
    if reason is None or reason.isascii() or not _holds_raw_bytes(reason):
        return reason
    try:
        return HTTPStatus(upstream.status).phrase
    except ValueError:
        return ""


Relayed = TypeVar("Relayed", ForwardedResponse, WholeForwardedResponse)


class UnrelayableHeader(Exception):
    """A header value holds bytes that are not UTF-8 (obs-text, RFC 9110 5.5).

    aiohttp decodes such bytes to lone surrogates and its writer drops them, so the
    value would arrive changed; the proxy refuses it instead of corrupting it.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


def forwardable_headers(
    raw_headers: Iterable[tuple[bytes, bytes]], dropped: frozenset[str]
) -> CIMultiDict[str]:
    """The headers as received, in order and spelling, without `dropped` (lower case) and
    without the fields the Connection header names (RFC 9110 7.6.1); repeats kept.

    The raw headers keep the sender's spelling, which aiohttp's parsed ones replace for
    well-known names. Bytes that are not UTF-8 are decoded as aiohttp decodes them, to lone
    surrogates, which its writer would drop: such a value raises `UnrelayableHeader`.
    """
    kept = CIMultiDict(
        [
            (name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
            for name, value in raw_headers
        ]
    )
    if hdrs.CONNECTION in kept:
        for value in kept.getall(hdrs.CONNECTION):
            for option in value.split(","):
                kept.popall(option.strip(), None)
    for name in dropped:
        if name in kept:
            del kept[name]
    if not "".join(kept.values()).isascii():
        for name, value in kept.items():
            if _holds_raw_bytes(value):
                raise UnrelayableHeader(name)
    if len(set(map(str.lower, kept.keys()))) < len(kept):
        return _first_spelling(kept)
    return kept


def _first_spelling(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """`headers` with every repeat of a name spelled as its first occurrence: aiohttp's
    client merges headers by exact spelling, so a repeat spelled differently (X-A, then
    x-a) would replace the first."""
    spelling: dict[str, str] = {}
    respelled: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        respelled.add(spelling.setdefault(name.lower(), name), value)
    return respelled


def _holds_raw_bytes(value: str) -> bool:
    return any("\udc80" <= character <= "\udcff" for character in value)


class UpstreamResponse(aiohttp.ClientResponse):
    """aiohttp's answer, which also ends a connection whose framing cannot be trusted.

    RFC 9112 6.1: a recipient of an HTTP/1.0 message with Transfer-Encoding closes the
    connection after it. aiohttp reads such an answer as chunked and, once its body is
    complete, pools the connection, before the forwarder has seen the answer.
    """

    async def start(self, connection: Connection) -> UpstreamResponse:
        protocol = connection.protocol
        await super().start(connection)
        if (
            protocol is not None
            and self.version == HttpVersion10
            and hdrs.TRANSFER_ENCODING in self.headers
        ):
            if self.connection is not None:
                protocol.force_close()  # closed when released; its body can still be read
            else:
                protocol.close()  # already back in the pool, its body complete
        return self


def new_upstream_session(outbound: Outbound) -> aiohttp.ClientSession:
    """The one pooled session to the upstreams: TLS as `network` says (verified unless it
    says insecure), no cookie jar, bodies as sent.

    Each request carries its tenant's upstream timeouts and outbound proxy.
    """
    return aiohttp.ClientSession(
        # No pool limit: the proxy holds as many upstream connections as it has clients.
        connector=GuardedConnector(limit=0, ssl=outbound.upstream_tls),
        response_class=UpstreamResponse,
        # Nothing one caller receives may be replayed on another caller's request.
        cookie_jar=aiohttp.DummyCookieJar(),
        # Bodies pass through as received: a gzip body keeps its bytes and Content-Encoding.
        auto_decompress=False,
        requote_redirect_url=False,
        skip_auto_headers=_NO_AUTO_HEADERS,
    )


def logged_path(request: web.BaseRequest) -> str:
    """The path as the client sent it, without the query: still percent-encoded, so a
    `%0A` cannot forge a log line, and no query value reaches the logs. An absolute-form
    target (refused) loses the credentials it may carry (`http://user:password@host/`)."""
    path = request.raw_path.partition("?")[0]
    if path.startswith("/"):
        return path
    return _USERINFO.sub(lambda match: match.group(1) or "", path)


# The user:password@ of an absolute URL or an authority (RFC 3986 3.2.1).
_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)?[^/?#@]*@")


def check_request(request: web.BaseRequest) -> None:
    """Refuse what this proxy must not forward, before any token is spent on it.

    - Absolute-form, authority-form (CONNECT) and asterisk-form targets (RFC 9112 3.2) ask
      for a forward proxy; this one relays origin-form paths to its configured upstream.
      The router cannot match them, so this runs before its answer is used.
    - A `#` has no place in a request target; yarl would read it as a fragment and drop
      what follows, query included.
    - Transfer codings other than chunked are not undone by aiohttp, and HTTP/1.0 has none.
    - TRACE would reflect the bearer token back to the client; RFC 9110 9.3.8 forbids
      sending credentials in it.
    """
    if request.version not in (HttpVersion10, HttpVersion11):
        # HTTP/0.9 has no headers to carry a token; this server does not speak HTTP/2.
        raise BadRequest(
            f"The proxy speaks HTTP/1.1 and 1.0, not HTTP/{request.version.major}."
            f"{request.version.minor}."
        )
    target = request.raw_path
    if request.method == hdrs.METH_CONNECT or not target.startswith("/") or "#" in target:
        raise BadRequest(
            "The proxy forwards origin-form requests (a path such as /version, without a "
            f"fragment) to its configured upstream; it does not accept {request.method} "
            f"{logged_path(request)[:100]!r}."
        )
    if request.version == HttpVersion10 and hdrs.TRANSFER_ENCODING in request.headers:
        # RFC 9112 6.1: HTTP/1.0 has no transfer codings, so the framing is faulty; a peer
        # that reads it as HTTP/1.0 would take the chunks for a next request. As nginx.
        raise BadRequest("An HTTP/1.0 request cannot have a Transfer-Encoding.")
    if not only_chunked(request.headers):
        # RFC 9112 6.1: aiohttp undoes only chunked; forwarding the rest as plain chunked
        # would hand the upstream gzip bytes it was not told about.
        raise BadRequest(
            "The proxy accepts no transfer coding but chunked; send a Content-Encoding instead."
        )
    if request.method == hdrs.METH_TRACE:
        raise BadRequest(
            "The proxy does not forward TRACE: the upstream would echo the bearer token "
            "back (RFC 9110 9.3.8)."
        )


def only_chunked(headers: CIMultiDictProxy[str]) -> bool:
    """Whether Transfer-Encoding is absent or just `chunked`, the only coding aiohttp undoes."""
    codings = headers.getall(hdrs.TRANSFER_ENCODING, ())
    return not codings or [c.strip().lower() for v in codings for c in v.split(",")] == ["chunked"]


def _max_forwards(request: web.BaseRequest) -> int | None:
    """The Max-Forwards of an OPTIONS request (RFC 9110 7.6.2), or None when absent."""
    if request.method != hdrs.METH_OPTIONS or hdrs.MAX_FORWARDS not in request.headers:
        return None
    value = request.headers[hdrs.MAX_FORWARDS].strip()
    if not value.isascii() or not value.isdigit():
        raise BadRequest(f"Max-Forwards must be a number of hops, got {value[:20]!r}.")
    return int(value)


def expects_continue(request: web.BaseRequest) -> bool:
    """Whether the client waits for 100 Continue before it sends its body.

    RFC 9110 10.1.1: never send 100 to an HTTP/1.0 client.
    """
    return (
        request.version >= HttpVersion11
        and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue"
    )


class RequestBody:
    """The client's request body on its way upstream: absent, kept whole, or streamed.

    A body with a known length up to `keep_limit` is read before it is sent, as nginx
    buffers request bodies, so it can be sent again after an upstream 401. A larger one,
    or one of unknown length, streams through and cannot be replayed.

    aiohttp's server sets no limit on a client that stops sending mid-body (or sends a
    malformed chunk it then waits past), so each read waits at most `idle_timeout`. A read
    failure is kept so that it is blamed on the client, not on the upstream.
    """

    def __init__(self, request: web.BaseRequest, idle_timeout: float, keep_limit: int) -> None:
        self._content = request.content if request.body_exists else None
        self._length = request.content_length
        self._idle_timeout = idle_timeout
        self._keep_limit = keep_limit
        self.kept: bytes | None = None
        self.failure: BaseException | None = None
        self.received = 0

    @property
    def replayable(self) -> bool:
        return self._content is None or self.kept is not None

    @property
    def to_keep(self) -> bool:
        """Whether there is a body, of known length up to the limit, to read before sending."""
        length = self._length
        return self._content is not None and length is not None and length <= self._keep_limit

    async def keep(self) -> None:
        """Read the body whole (`to_keep` says whether to)."""
        self.kept = b"".join([chunk async for chunk in self._chunks()])

    def data(self) -> bytes | AsyncIterator[bytes] | None:
        """What to hand aiohttp's client as the body."""
        if self._content is None or self.kept is not None:
            return self.kept
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[bytes]:
        assert self._content is not None
        try:
            while True:
                async with asyncio.timeout(self._idle_timeout):
                    chunk = await self._content.readany()
                if not chunk:
                    return
                self.received += len(chunk)
                yield chunk
        except Exception as exc:
            self.failure = exc
            raise


@dataclass
class _TenantMetrics:
    hits: Any
    misses: Any
    replayed: Any
    passed: Any


@dataclass
class _Exchange:
    """One request on its way: where it goes, and what is sent there."""

    request: web.BaseRequest
    destination: Destination
    url: URL
    headers: CIMultiDict[str]
    body: RequestBody
    record: AccessRecord

    @property
    def upstream(self) -> UpstreamSettings:
        return self.destination.tenant.upstream

    @property
    def tenant(self) -> str:
        return self.destination.key.tenant


class Forwarder:
    """Forwards requests to their tenant's upstream with the token for their key attached."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        tokens: TokenKeeper,
        metrics: Metrics,
        *,
        replay_body_limit: int,
        outbound: Outbound,
    ) -> None:
        self._session = session
        self._outbound = outbound
        self._tokens = tokens
        self._metrics = metrics
        self.replay_body_limit = replay_body_limit
        """Largest body kept to replay after a 401; a reload may change it."""
        self._by_tenant: dict[str, _TenantMetrics] = {}

    async def forward(
        self, request: web.BaseRequest, destination: Destination, record: AccessRecord
    ) -> web.StreamResponse:
        """Forward `request` upstream and stream the answer back; note in `record` what
        the access line tells."""
        upstream = destination.tenant.upstream
        exchange = _Exchange(
            request,
            destination,
            # encoded=True: path and query reach the upstream exactly as the client sent them.
            URL(upstream.url + destination.path, encoded=True),
            self._upstream_headers(request),
            RequestBody(request, upstream.read_timeout, self.replay_body_limit),
            record,
        )
        if REQUEST_ID_HEADER not in exchange.headers:
            # The proxy's own id, or the client's where its Connection header kept it from
            # being forwarded: the upstream sees the id the access line shows.
            exchange.headers[REQUEST_ID_HEADER] = record.request_id
        try:
            return await self._exchange(exchange)
        finally:
            record.bytes_in = exchange.body.received

    async def _exchange(self, exchange: _Exchange) -> web.StreamResponse:
        request, record = exchange.request, exchange.record
        max_forwards = _max_forwards(request)
        if max_forwards == 0:
            # The proxy is the final recipient of this OPTIONS (RFC 9110 7.6.2).
            return web.Response(headers={hdrs.ALLOW: _ALLOWED_METHODS})
        if max_forwards is not None:
            exchange.headers[hdrs.MAX_FORWARDS] = str(max_forwards - 1)
        # A cached token is taken without an await or an asyncio lock; only the hit
        # counter's increment holds prometheus-client's threading lock.
        key, counters = exchange.destination.key, self._counters(exchange.tenant)
        token = self._tokens.cached(key)
        if token is None:
            counters.misses.inc()
            token = await self._fetch(request, key)
        else:
            counters.hits.inc()
        exchange.headers[hdrs.AUTHORIZATION] = token.authorization.get_secret_value()

        if expects_continue(request):
            await request.writer.write(_CONTINUE)
        if exchange.body.to_keep:
            await self._read_body(exchange)
        record.upstream_started = time.perf_counter()
        answer = await self._send(exchange)
        if answer.status == 401:
            answer = await self._after_unauthorized(exchange, token, answer)
        try:
            return await self._stream_back(exchange, answer)
        finally:
            answer.release()
            record.upstream_ended = time.perf_counter()

    def _counters(self, tenant: str) -> _TenantMetrics:
        counters = self._by_tenant.get(tenant)
        if counters is None:
            lookups, unauthorized = (
                self._metrics.token_cache_lookups,
                self._metrics.upstream_unauthorized,
            )
            counters = self._by_tenant[tenant] = _TenantMetrics(
                lookups.labels(tenant, "hit"),
                lookups.labels(tenant, "miss"),
                unauthorized.labels(tenant, "replayed"),
                unauthorized.labels(tenant, "passed"),
            )
        return counters

    async def _after_unauthorized(
        self, exchange: _Exchange, token: Token, first: aiohttp.ClientResponse
    ) -> aiohttp.ClientResponse:
        """A 401 means the token is no good: drop it and, when the body can be sent again,
        send the request once more with a new token. Otherwise the 401 goes to the client."""
        key, counters = exchange.destination.key, self._counters(exchange.tenant)
        self._tokens.drop(key, token)
        if not exchange.body.replayable:
            counters.passed.inc()
            return first
        try:
            fresh = self._tokens.cached(key) or await self._fetch(exchange.request, key)
        except TokenUnavailable as exc:
            logger.warning("No new token to replay a request the upstream refused: %s", exc)
            fresh = token
        if fresh is token:
            counters.passed.inc()
            return first

        first.release()
        exchange.headers[hdrs.AUTHORIZATION] = fresh.authorization.get_secret_value()
        counters.replayed.inc()
        return await self._send(exchange)

    def _upstream_headers(self, request: web.BaseRequest) -> CIMultiDict[str]:
        try:
            return forwardable_headers(request.raw_headers, _REQUEST_FIELDS_NOT_FORWARDED)
        except UnrelayableHeader as exc:
            raise BadRequest(
                f"The {exc.name} header holds bytes that are not UTF-8; the proxy cannot "
                "forward them unchanged."
            ) from None

    async def _fetch(self, request: web.BaseRequest, key: TokenKey) -> Token:
        """Wait for a token; when the stop cuts the wait short, `TokenUnavailable`.

        The stop cancels what is still in flight once `shutdown.timeout` has passed; the
        cancellation of a request whose client is still connected comes from nothing else.
        A request still waiting for its token has not reached the upstream, so it can be
        told the truth: no token could be had (503), rather than be cut off unanswered.
        """
        try:
            return await self._tokens.fetch(key)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if request.transport is None or task is None:
                raise  # the client went away
            task.uncancel()
        raise TokenUnavailable(
            "The proxy is stopping, and no token came for this request within shutdown.timeout."
        )

    async def _read_body(self, exchange: _Exchange) -> None:
        try:
            await exchange.body.keep()
        except (ConnectionError, TimeoutError, aiohttp.ClientError) as exc:
            raise self._client_failure(exchange) from exc

    async def _send(self, exchange: _Exchange) -> aiohttp.ClientResponse:
        request = exchange.request
        proxy = self._outbound.proxy_for(exchange.upstream.url)
        try:
            return await self._session.request(
                request.method,
                exchange.url,
                headers=exchange.headers,
                data=exchange.body.data(),
                allow_redirects=False,
                timeout=_timeout(exchange.upstream),
                proxy=proxy.url,
                proxy_headers=proxy.headers,
            )
        except (aiohttp.ClientError, TimeoutError) as exc:
            if request.transport is None or exchange.body.failure is not None:
                raise self._client_failure(exchange) from exc
            raise self._failure(exchange, exc) from exc

    def _client_failure(self, exchange: _Exchange) -> ProxyError:
        """The error for a request whose client hung up or stopped sending its body."""
        if exchange.request.transport is None:
            # The client hung up, maybe mid-upload: not the upstream's failure.
            return ClientGone("The client closed the connection before the answer.")
        failure = exchange.body.failure
        if isinstance(failure, TimeoutError):
            return BadRequest(
                "The request body stopped arriving, or was malformed: nothing usable came "
                f"for {exchange.upstream.read_timeout:g} s (upstream.read_timeout)."
            )
        return BadRequest(
            "The request body could not be read: "
            f"{describe_client_error(failure or ConnectionError())}."
        )

    def _failure(
        self, exchange: _Exchange, exc: BaseException
    ) -> UpstreamUnreachable | UpstreamTimeout:
        reason = upstream_error_reason(exc)
        self._metrics.upstream_errors.labels(exchange.tenant, reason).inc()
        upstream = exchange.upstream
        if reason == "timeout":
            limit = (
                f"connect_timeout ({upstream.connect_timeout:g} s)"
                if isinstance(exc, aiohttp.ConnectionTimeoutError)
                else f"read_timeout ({upstream.read_timeout:g} s)"
            )
            return UpstreamTimeout(f"The upstream {upstream.url} did not answer within {limit}.")
        return UpstreamUnreachable(
            f"The upstream {upstream.url} could not be reached ({reason}): "
            f"{describe_client_error(exc)}."
        )

    def _unrelayable(self, exchange: _Exchange, what: str) -> UpstreamUnreachable:
        self._metrics.upstream_errors.labels(exchange.tenant, "protocol").inc()
        return UpstreamUnreachable(
            f"The upstream {exchange.upstream.url} answered with {what}, which the proxy "
            "cannot relay intact."
        )

    async def _stream_back(
        self, exchange: _Exchange, answer: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        request = exchange.request
        if answer.status == 101:
            # The proxy forwards no Upgrade, so the upstream may not switch protocols
            # (RFC 9110 7.8); aiohttp passes other 1xx by.
            raise self._unrelayable(
                exchange, "a switch of protocols (101), which the proxy never asks for"
            )
        if not 100 <= answer.status <= 599:
            raise self._unrelayable(exchange, f"status {answer.status}")
        if answer.version == HttpVersion10 and hdrs.TRANSFER_ENCODING in answer.headers:
            # RFC 9112 6.1: HTTP/1.0 has no transfer codings, so the framing is faulty
            # (UpstreamResponse has closed the connection).
            raise self._unrelayable(exchange, "HTTP/1.0 with a Transfer-Encoding")
        if not only_chunked(answer.headers):
            raise self._unrelayable(exchange, "a transfer coding other than chunked")
        if is_small(request, answer):
            return await self._relay_whole(exchange, answer)

        response = self._relayed(exchange, lambda: ForwardedResponse(answer))
        if (
            request.version < HttpVersion11
            and response.content_length is None
            and has_body(request, answer)
        ):
            # An HTTP/1.0 client reads a body without Content-Length until the connection
            # closes (RFC 9112 6.3): aiohttp does not close a kept-alive one itself.
            response.force_close()
        sent = 0
        try:
            await response.prepare(request)
            request[SENT_STATUS] = response.status
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
                sent += len(chunk)
            await response.write_eof()
        except ConnectionError:
            logger.debug("The client went away while its answer was streamed.")
        except (aiohttp.ClientError, TimeoutError) as exc:
            reason = upstream_error_reason(exc)
            self._metrics.upstream_errors.labels(exchange.tenant, reason).inc()
            logger.error(
                "The upstream broke off its answer to %s %s (%s): %s",
                request.method,
                logged_path(request),
                reason,
                describe_client_error(exc),
            )
            # The status line is sent: closing without the final chunk (or short of
            # Content-Length) is the only way to tell the client the body is incomplete.
            if request.transport is not None:
                request.transport.close()
        finally:
            exchange.record.bytes_out = sent
        return response

    async def _relay_whole(
        self, exchange: _Exchange, answer: aiohttp.ClientResponse
    ) -> web.StreamResponse:
        """Read a small answer whole; aiohttp sends it once the handler has counted it.
        Nothing has reached the client yet, so an upstream that breaks off gets a 502.

        The access line is written before aiohttp sends the answer: it counts the bytes
        handed over, and its duration leaves out that last write.
        """
        try:
            body = await answer.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failure(exchange, exc) from exc
        response = self._relayed(exchange, lambda: WholeForwardedResponse(answer, body))
        exchange.record.bytes_out = len(body)
        return response

    def _relayed(self, exchange: _Exchange, make: Callable[[], Relayed]) -> Relayed:
        """The response `make` builds from the upstream's answer, with the request id the
        proxy made up; a 502 when an upstream header cannot be passed on intact."""
        try:
            response = make()
        except UnrelayableHeader as exc:
            raise self._unrelayable(
                exchange, f"a {exc.name} header holding bytes that are not UTF-8"
            ) from None
        if exchange.record.generated and REQUEST_ID_HEADER not in response.headers:
            response.headers[REQUEST_ID_HEADER] = exchange.record.request_id
        return response


def is_small(request: web.BaseRequest, answer: aiohttp.ClientResponse) -> bool:
    """Whether `answer` has a body of known length up to `WHOLE_ANSWER_LIMIT`.

    HEAD, 204 and 304 answers have a Content-Length but no body (RFC 9110 8.6): those stream
    as they are. (aiohttp's parser refuses an answer with both Content-Length and
    Transfer-Encoding, as RFC 9112 6.3 allows.)
    """
    length = answer.content_length
    return length is not None and length <= WHOLE_ANSWER_LIMIT and has_body(request, answer)


def has_body(request: web.BaseRequest, answer: aiohttp.ClientResponse) -> bool:
    """Whether `answer` may carry a body (RFC 9110 6.4.1: none to HEAD, in 204 or 304; 1xx
    answers are not relayed)."""
    return request.method != hdrs.METH_HEAD and answer.status not in (204, 304)


def _timeout(upstream: UpstreamSettings) -> aiohttp.ClientTimeout:
    """The client timeouts of `upstream`, made once per pair of values in the config."""
    limits = (upstream.connect_timeout, upstream.read_timeout)
    timeout = _TIMEOUTS.get(limits)
    if timeout is None:
        timeout = _TIMEOUTS[limits] = aiohttp.ClientTimeout(
            total=None, connect=upstream.connect_timeout, sock_read=upstream.read_timeout
        )
    return timeout


_TIMEOUTS: dict[tuple[float, float], aiohttp.ClientTimeout] = {}


def upstream_error_reason(exc: BaseException) -> str:
    """The `reason` label for an upstream failure."""
    if isinstance(exc, aiohttp.ClientProxyConnectionError | aiohttp.ClientHttpProxyError):
        return "proxy"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "tls"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
        return "reset"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "reset"
    return "protocol"
