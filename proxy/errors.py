"""The errors the proxy raises, and the JSON answers it makes of them.

    ProxyError                       root; an HTTP status and a contract error code
    ├── ConfigError                  the config file cannot be used (exit status 2)
    ├── ListenError                  a listener cannot be bound (exit status 1)
    ├── TokenStoreError              (in proxy.store) the token store is unsafe (exit status 1)
    ├── TokenUnavailable             503 token_unavailable: no valid token can be had now
    │   ├── CredentialsRejected      the token endpoint refused the client credentials
    │   ├── TokenEndpointUnreachable no answer, a timeout, a 5xx or a 429
    │   └── BadTokenResponse         an answer that carries no usable token
    ├── UpstreamUnreachable          502 upstream_unreachable
    ├── UpstreamTimeout              504 upstream_timeout
    ├── BadRequest                   400 bad_request
    ├── NoRoute                      404 no_route
    ├── ScopeNotAllowed              403 scope_not_allowed
    └── ClientGone                   the client hung up first; counted as 499, never sent

    ServerSpokeFirst                 not a ProxyError: an aiohttp ClientConnectionError for
                                     a server that answered on a new connection before it
                                     was asked; a 502, or a token endpoint failure
    UnrelayableHeader                not a ProxyError (in proxy.forwarder): a header value
                                     aiohttp would alter; the forwarder turns it into
                                     BadRequest or UpstreamUnreachable
    _Unexpandable                    not a ProxyError (in proxy.config): YAML whose aliases
                                     expand past a bound; the config loader turns it into
                                     ConfigError

Foreign exceptions (aiohttp's, the OS's) are translated into these once, where they happen;
the proxy's request handler (`app.ProxyHandler`) turns each into one answer with `error_response`.
"""

from __future__ import annotations

import json
import math
import re
from typing import ClassVar

import aiohttp
from aiohttp import web

ERROR_HEADER = "X-Skill-Engine-Proxy-Error"


class ProxyError(Exception):
    """Root of the proxy's own errors. The message is a sentence for an operator."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "internal_error"


class ConfigError(ProxyError):
    """The config file is missing, malformed or names a value the proxy cannot use.

    `problems` pairs a dotted key (None for the whole file) with what is wrong there.
    """

    def __init__(self, file: str, problems: list[tuple[str | None, str]]) -> None:
        self.file = file
        self.problems = problems
        described = "; ".join(f"{key}: {problem}" if key else problem for key, problem in problems)
        super().__init__(f"{file}: {described}")


class ListenError(ProxyError):
    """A listen address cannot be bound: in use, not permitted, or not on this host."""


class TokenUnavailable(ProxyError):
    """No valid token can be had now.

    `retry_after` is when the proxy tries again, in seconds; `reason` names the failure
    for metrics (connect, timeout, server_error, rate_limited, bad_response, rejected).
    """

    status = 503
    code = "token_unavailable"
    default_reason: ClassVar[str] = "unavailable"

    def __init__(
        self, message: str, *, retry_after: float | None = None, reason: str | None = None
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason or self.default_reason


class CredentialsRejected(TokenUnavailable):
    """The token endpoint answered that the client credentials are not accepted."""

    default_reason = "rejected"


class TokenEndpointUnreachable(TokenUnavailable):
    """The token endpoint could not be reached, timed out, failed or rate-limited us."""

    default_reason = "connect"


class BadTokenResponse(TokenUnavailable):
    """The token endpoint answered, but not with a token the proxy can use."""

    default_reason = "bad_response"


class UpstreamUnreachable(ProxyError):
    """The upstream connection failed or broke before a response began."""

    status = 502
    code = "upstream_unreachable"


class UpstreamTimeout(ProxyError):
    """The upstream did not connect or went silent for longer than the configured timeout."""

    status = 504
    code = "upstream_timeout"


class BadRequest(ProxyError):
    """A request the proxy will not forward."""

    status = 400
    code = "bad_request"


class NoRoute(ProxyError):
    """No configured route matches the request."""

    status = 404
    code = "no_route"


class ScopeNotAllowed(ProxyError):
    """The request asked for scopes its route does not allow."""

    status = 403
    code = "scope_not_allowed"


class ClientGone(ProxyError):
    """The client closed its connection before the answer began (nginx counts this as 499)."""

    status = 499
    code = "client_closed_request"


class ServerSpokeFirst(aiohttp.ClientConnectionError):
    """A server sent an answer on a new connection before any request was sent on it."""


def describe_client_error(exc: BaseException) -> str:
    """One line on an aiohttp client failure, for messages and logs.

    Never `str(exc)` of the request's own errors: aiohttp puts the URL in it, and a URL may
    carry a query the client did not mean for any log.
    """
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        problem = getattr(exc.certificate_error, "verify_message", None) or "not trusted"
        return (
            f"its TLS certificate was refused ({problem}); if your company's CA signs it, "
            "as a TLS-inspecting firewall's does, name that CA in network.ca_file"
        )
    if isinstance(exc, aiohttp.ClientProxyConnectionError):
        return f"cannot connect to the outbound proxy ({exc.os_error.strerror or exc.os_error})"
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return f"the outbound proxy refused the tunnel with HTTP {exc.status} {_words(exc.message)}"
    if isinstance(exc, aiohttp.ClientConnectorError) and exc.os_error is not None:
        return exc.os_error.strerror or str(exc.os_error)
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the body was cut short"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"not a valid HTTP answer ({_words(exc.message)})"
    if isinstance(exc, aiohttp.ClientOSError):
        return exc.strerror or "the connection failed"
    if isinstance(exc, ServerSpokeFirst):
        return "it sent an answer on a new connection before it was asked anything"
    return type(exc).__name__


def _words(message: object) -> str:
    """What went wrong, from an aiohttp message: parser messages quote the offending bytes
    after a colon (the C parser) or in quotes (the Python one), and a reason phrase is the
    peer's own text."""
    words = re.split(r"[:'\"]", str(message), maxsplit=1)[0].strip()
    return "".join(c if c.isprintable() else " " for c in words)[:100]


def error_response(error: ProxyError) -> web.Response:
    """The contract's JSON answer for `error`, marked so it never passes for the upstream's."""
    body = json.dumps({"error": error.code, "message": str(error)}).encode()
    headers = {ERROR_HEADER: error.code}
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        # RFC 9110 10.2.3: delay-seconds is a non-negative integer.
        headers["Retry-After"] = str(max(0, math.ceil(retry_after)))
    return web.Response(
        status=error.status, body=body, content_type="application/json", headers=headers
    )
