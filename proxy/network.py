"""The outbound side: through which proxy, if any, the proxy reaches each token endpoint and
upstream, and the TLS settings its connections are made with.

The environment's proxy variables are read with the standard library rather than by
aiohttp's `trust_env`, which would also read ~/.netrc and attach what it finds to requests.
Each destination's proxy is chosen once, the first time it is asked for (at start, for
every configured one), and the choice is reused for every request.
"""

from __future__ import annotations

import base64
import logging
import os
import ssl
import urllib.request
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from yarl import URL

from proxy.config import NetworkSettings, Settings, is_loopback, parse_proxy_url
from proxy.errors import ConfigError, ServerSpokeFirst

logger = logging.getLogger("skill_engine_proxy")

# NO_PROXY as urllib reads it: names, suffixes (`.example.com` or `example.com`), `*`.
# typeshed leaves it out; it is what `urllib.request.proxy_bypass` is on Linux.
_bypass_environment: Callable[[str, Mapping[str, str]], bool] = (
    urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
)


@dataclass(frozen=True)
class ProxyChoice:
    """How connections to one destination go: through the proxy at `url`, or directly
    when it is None. `headers` go to the proxy alone (on CONNECT); `reason` is for the log.
    """

    url: URL | None
    headers: Mapping[str, str] | None = field(default=None, repr=False)
    reason: str = ""

    def __str__(self) -> str:
        how = "directly" if self.url is None else f"through the proxy {self.url}"
        return f"{how} ({self.reason})" if self.reason else how


DIRECT = ProxyChoice(None)


def proxy_choice(value: str, source: str) -> ProxyChoice:
    """The choice of the proxy at `value`; a user:password in it becomes the
    Proxy-Authorization header (RFC 9110 11.7.1) and leaves the URL, so that the URL can be
    shown. Raises ValueError."""
    url = parse_proxy_url(value)
    if url.user is None and url.password is None:
        return ProxyChoice(url, None, source)
    # RFC 7617 section 2: Basic credentials are user-id ":" password, in base64.
    credentials = f"{url.user or ''}:{url.password or ''}".encode()
    authorization = "Basic " + base64.b64encode(credentials).decode("ascii")
    bare = url.with_user(None).with_password(None)
    return ProxyChoice(bare, {"Proxy-Authorization": authorization}, source)


class Outbound:
    """The proxy choice for each destination, and the TLS contexts of the two sessions.

    - `token_tls` always verifies: the client secret goes to no peer that is not proven to
      be the token endpoint. It trusts the system's CAs and `ca_file`.
    - `upstream_tls` trusts the same, presents `client_cert` when set, and verifies nothing
      with `insecure_skip_verify`.
    """

    def __init__(self, settings: NetworkSettings) -> None:
        self.settings = settings
        self.token_tls = tls_context(settings, for_upstream=False)
        # One context where the two would be alike: each holds the system's CAs (most of a MiB).
        self.upstream_tls = (
            tls_context(settings, for_upstream=True)
            if settings.client_cert is not None or settings.insecure_skip_verify
            else self.token_tls
        )
        # Read once: the proxy's environment does not change while it runs.
        self._environment = urllib.request.getproxies_environment() if settings.trust_env else {}
        self._variables = {
            scheme: _variable_holding(f"{scheme}_proxy", value)
            for scheme, value in self._environment.items()
        }
        self._configured = (
            None
            if settings.proxy is None
            else proxy_choice(settings.proxy.get_secret_value(), "network.proxy")
        )
        self._choices: dict[str, ProxyChoice] = {}

    @classmethod
    def for_settings(cls, settings: Settings) -> Outbound:
        """The outbound side of `settings`, with the choice for every configured destination
        made and logged: an unusable proxy variable is a config error at start."""
        outbound = cls(settings.network)
        destinations: dict[str, str] = {}
        for tenant in settings.all_tenants().values():
            destinations.setdefault(tenant.auth.resolved_token_url, "the token endpoint")
            destinations.setdefault(tenant.upstream.url, "the upstream")
        for url, what in destinations.items():
            logger.info("Connections to %s %s go %s.", what, url, outbound.proxy_for(url))
        outbound._log_tls()
        return outbound

    def proxy_for(self, url: str) -> ProxyChoice:
        """How to reach `url` (a token URL or an upstream URL as configured)."""
        choice = self._choices.get(url)
        if choice is None:
            choice = self._choices[url] = self._choose(URL(url))
        return choice

    def _choose(self, url: URL) -> ProxyChoice:
        if is_loopback(url.host):
            return ProxyChoice(None, reason="loopback")
        if self._environment and _bypass_environment(
            f"{url.raw_host}:{url.port}", self._environment
        ):
            return ProxyChoice(None, reason=self._variables["no"])
        if self._configured is not None:
            return self._configured

        value = self._environment.get(url.scheme)
        if not value:
            return DIRECT
        variable = self._variables[url.scheme]
        if "://" not in value:
            value = f"http://{value}"  # a bare host:port, as curl reads it
        try:
            return proxy_choice(value, variable)
        except ValueError as exc:
            raise ConfigError(
                "the environment",
                [(variable, f"{exc}; or set network.trust_env: false to ignore it")],
            ) from None

    def _log_tls(self) -> None:
        settings = self.settings
        if settings.ca_file is not None:
            logger.info(
                "Trusting the CA certificates in %s besides the system's.", settings.ca_file
            )
        if settings.client_cert is not None:
            logger.info("Presenting the client certificate %s to upstreams.", settings.client_cert)
        if settings.insecure_skip_verify:
            logger.warning(
                "network.insecure_skip_verify is on: the upstream's TLS certificate is not "
                "verified, so whoever sits on the path can read and change the traffic, "
                "bearer tokens included. The token endpoint is still verified."
            )


def _variable_holding(name: str, value: str) -> str:
    """Which spelling of the variable `name` (lower case) `value` was read from, to name it
    in logs and errors: urllib takes the lower-case one over the others when it is set."""
    spellings = [
        variable
        for variable, held in os.environ.items()
        if variable.lower() == name and held == value
    ]
    if name in spellings or not spellings:
        return name
    return spellings[0]


def tls_context(settings: NetworkSettings, *, for_upstream: bool) -> ssl.SSLContext:
    """A client TLS context with the system's trust and `ca_file`; for the upstream, the
    client certificate and `insecure_skip_verify` too."""
    context = ssl.create_default_context()
    if settings.ca_file is not None:
        context.load_verify_locations(cafile=settings.ca_file)
    if for_upstream and settings.client_cert is not None:
        # password=b"": an encrypted key fails instead of OpenSSL asking on the terminal.
        context.load_cert_chain(settings.client_cert, settings.client_key, password=b"")
    if for_upstream and settings.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    # The proxy speaks HTTP/1.1 on both sides, as aiohttp's own contexts announce.
    context.set_alpn_protocols(["http/1.1"])
    return context


class GuardedConnector(aiohttp.TCPConnector):
    """aiohttp's connection pool, minus the connections a server has written to while they
    were idle in it. Both the upstreams' and the token endpoints' sessions use it.

    aiohttp keeps reading a pooled connection and queues whatever arrives there as the
    answer to the next request sent on it (aio-libs/aiohttp#13656, unfixed in 3.14.5): an
    upstream that sends one answer too many would have it delivered to another client,
    perhaps another tenant's, and every later answer on that connection one request late;
    a token endpoint's, as the token of the next token request, perhaps another tenant's.
    nginx and Go close such a connection; so does this, when it is taken from the pool,
    and takes the next one, down to a new connection if every pooled one is spoilt. A
    stray answer that arrives after the connection has been taken again cannot be told
    from the real one, in any HTTP/1.1 client; it ends at most that one exchange, as a
    502 or a wrong answer. Likewise a server that writes on a new connection before it is
    asked is refused only when its bytes are there by the time the connection is handed
    out, which is rare: later ones are read as the answer, on a connection nobody else used.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # The connections this has handed out before: any other is new, not pooled.
        self._handed_out: weakref.WeakSet[ResponseHandler] = weakref.WeakSet()

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> Connection:
        spoilt = 0
        try:
            while True:
                connection = await super().connect(req, traces, timeout)
                protocol = connection.protocol
                if protocol is None:
                    return connection
                # On a connection still open and carrying no request, should_close holds
                # when an answer, bytes of one, or a parse error is queued on it. (One
                # the server closed fails as before once the request is sent.) The pool
                # is finite and loses each spoilt connection: the loop ends.
                if not protocol.should_close or not protocol.is_connected():
                    self._handed_out.add(protocol)
                    return connection
                connection.close()
                if protocol not in self._handed_out:
                    raise ServerSpokeFirst()
                spoilt += 1
        finally:
            if spoilt:
                logger.warning(
                    "%s sent an answer to no request on %d idle kept-alive "
                    "connection(s); they were closed instead of reused.",
                    req.url.origin(),
                    spoilt,
                )
