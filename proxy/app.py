"""The one place where config, tokens, forwarding and metrics meet.

Two servers: the proxy (one handler for every request on `listen` and the routes' own
listeners) and the admin app (`/metrics`, `/healthz`, `/readyz` on `admin_listen`), kept
apart so that no Skill Engine path is ever shadowed by one of the proxy's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from proxy.config import Settings
from proxy.errors import (
    BadRequest,
    ClientGone,
    ProxyError,
    TokenUnavailable,
    error_response,
)
from proxy.forwarder import (
    SENT_STATUS,
    Forwarder,
    check_request,
    logged_path,
    new_upstream_session,
)
from proxy.logs import REQUEST_ID_HEADER, AccessRecord, access_log
from proxy.metrics import Metrics, TokenMetrics, method_label
from proxy.network import Outbound
from proxy.routes import Destination, Router
from proxy.store import TokenStore, open_store
from proxy.token_endpoint import TokenEndpoint, client_of, new_token_session, token_key
from proxy.tokens import (
    Clock,
    Freshness,
    RenewalPolicy,
    SystemClock,
    Token,
    TokenKeeper,
    TokenKey,
)

logger = logging.getLogger("skill_engine_proxy")


class Phase(enum.Enum):
    """Where the process is in its life; `/readyz` is 200 only while SERVING."""

    STARTING = "starting"
    SERVING = "serving"
    DRAINING = "draining"


@dataclass
class Lifecycle:
    """The process's phase, and what keeps it from being ready (None when nothing does)."""

    phase: Phase = Phase.STARTING
    token_problem: Callable[[], str | None] = lambda: None


METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
DESTINATION = web.RequestKey("destination", Destination)

Client = tuple[str, str, str, str]


class ProxyHandler:
    """The proxy listener's one request handler, which aiohttp's low-level server runs.

    Every request takes the same way (check, route, forward, count, log), so it goes
    through no router and no middleware chain: on a small proxied request those cost as
    much as the metrics and the access line together (bench/). The clients and the token
    keeper live from `start` to `close`.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        lifecycle: Lifecycle,
        *,
        clock: Clock | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._lifecycle = lifecycle
        self._clock = clock or SystemClock()
        self._resources = contextlib.AsyncExitStack()
        self.in_flight: dict[asyncio.Task[object], web.RequestHandler] = {}
        """The tasks of the requests being answered, for the drain to wait for, with the
        connection each came on: the others are idle when the stop begins."""
        self._counts_in_flight = not metrics.watch_in_flight(self.in_flight)
        self.closing = False
        """Set when the stop begins: every answer from then on closes its connection."""
        self.wiring = Wiring(settings, metrics, self._clock)

    async def start(self) -> None:
        """Open the token store and the clients, and start keeping tokens."""
        settings, wiring, resources = self._settings, self.wiring, self._resources
        store = open_store(
            settings.token_store,
            self._metrics,
            self._clock,
            lambda key: wiring.endpoints[client_of(key)].secret.get_secret_value(),
        )
        resources.push_async_callback(store.close)
        outbound = Outbound.for_settings(settings)
        token_session = new_token_session(outbound)
        resources.push_async_callback(token_session.close)
        upstream_session = new_upstream_session(outbound)
        resources.push_async_callback(upstream_session.close)
        wiring.start(token_session, upstream_session, store, outbound)
        resources.push_async_callback(wiring.close)
        self._lifecycle.token_problem = wiring.token_problem

    async def close(self) -> None:
        """Stop keeping tokens and close what `start` opened, in the reverse order (once;
        a second call, or one without `start`, does nothing)."""
        await self._resources.aclose()

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        """Count, time and log every request, and turn the proxy's own errors into answers."""
        metrics, in_flight = self._metrics, self.in_flight
        task = asyncio.current_task()
        assert task is not None
        record = AccessRecord.begin(request.headers.get(REQUEST_ID_HEADER))
        if self._counts_in_flight:
            metrics.requests_in_flight.inc()
        in_flight[task] = request.protocol
        try:
            response = await self._answer(request, record)
        except asyncio.CancelledError:
            # aiohttp cancels the handler of a client that hung up (handler_cancellation),
            # and the stop what is still in flight after shutdown.timeout. Either way the
            # answer ends here: 499 if it had not begun (nothing was sent), else the status
            # it was sent with.
            self._count(request, record, request.get(SENT_STATUS, ClientGone.status))
            raise
        finally:
            del in_flight[task]
            if self._counts_in_flight:
                metrics.requests_in_flight.dec()
        self._count(request, record, response.status)
        if self.closing:
            response.force_close()
        return response

    def _count(self, request: web.BaseRequest, record: AccessRecord, status: int) -> None:
        destination = request.get(DESTINATION)
        # A request that found no route has no tenant: "" keeps the label set bounded.
        tenant = "" if destination is None else destination.key.tenant
        self._metrics.count_request(
            tenant, method_label(request.method), status, time.perf_counter() - record.started
        )
        if access_log.enabled:
            access_log.write(
                record,
                method=request.method,
                path=logged_path(request),
                status=status,
                tenant=tenant,
            )

    async def _answer(self, request: web.BaseRequest, record: AccessRecord) -> web.StreamResponse:
        wiring = self.wiring
        try:
            check_request(request)
            destination = request[DESTINATION] = wiring.router.route(request)
            return await wiring.forwarder.forward(request, destination, record)
        except ProxyError as exc:
            # The client's own mistakes, and the waiters of a token fetch the token cache
            # has already logged once, are per-request detail.
            quiet = exc.status < 500 or isinstance(exc, TokenUnavailable)
            logger.log(
                logging.DEBUG if quiet else logging.ERROR,
                "%s %s answered %d %s: %s",
                request.method,
                logged_path(request),
                exc.status,
                exc.code,
                exc,
            )
            response = _error_answer(exc, record)
            if isinstance(exc, BadRequest) or (
                request.body_exists and not request.content.at_eof()
            ):
                # What follows on this connection cannot be trusted (a CONNECT's tunnel
                # bytes), or an unread body is not wanted: close rather than read on.
                response.force_close()
            return response
        except Exception:
            logger.exception("%s %s failed inside the proxy", request.method, logged_path(request))
            return _error_answer(
                ProxyError("The proxy failed to handle this request; its log has the details."),
                record,
            )


class Wiring:
    """What serves requests under the current config, and how a reload replaces it.

    The token keeper outlives reloads, so that a token fetched with credentials that did
    not change is kept; the router, the token endpoints (one per client credentials) and
    the renewal policies are replaced.
    """

    def __init__(self, settings: Settings, metrics: Metrics, clock: Clock) -> None:
        self.settings = settings
        self.router = Router(settings)
        self.endpoints: dict[Client, TokenEndpoint] = {}
        self._policies: dict[Client, RenewalPolicy] = {}
        self._metrics = metrics
        self._clock = clock
        self._keys: list[TokenKey] = []
        self._prefetched: list[TokenKey] = []

    def start(
        self,
        token_session: aiohttp.ClientSession,
        upstream_session: aiohttp.ClientSession,
        store: TokenStore,
        outbound: Outbound,
    ) -> None:
        self._token_session = token_session
        self._outbound = outbound
        self._set_endpoints(self.router)

        async def fetch(key: TokenKey) -> Token:
            return await self.endpoints[client_of(key)].fetch(key)

        async def obtain(key: TokenKey, is_fresh: Freshness) -> Token:
            return await store.obtain(key, is_fresh, fetch)

        self.tokens = TokenKeeper(
            obtain,
            policy=lambda key: self._policies[client_of(key)],
            clock=self._clock,
            events=TokenMetrics(self._metrics),
        )
        self.forwarder = Forwarder(
            upstream_session,
            self.tokens,
            self._metrics,
            replay_body_limit=self.settings.replay_body_limit,
            outbound=outbound,
        )
        self._watch(self.router)

    async def close(self) -> None:
        await self.tokens.close()

    def token_problem(self) -> str | None:
        """Why requests cannot be served now, for `/readyz`; None when they can.

        No route's token may be failing with none to use instead; a route's token fetched
        at start must be in hand.
        """
        problems = []
        for key in self._keys:
            problem = self.tokens.problem(key)
            if problem is None or (
                key not in self._prefetched and self.tokens.failure(key) is None
            ):
                continue
            label = f"tenant {key.tenant}" + (f" ({key.scopes_label})" if key.scopes else "")
            problems.append(problem if len(self._keys) == 1 else f"{label}: {problem}")
        return "; ".join(problems) or None

    async def reconfigure(self, settings: Settings) -> None:
        """Serve under `settings` from now on (the listeners stay as they are).

        Changed secrets of the same client apply at once to new tokens: its tokens are
        renewed, and the current ones serve until the renewal brings a new one. New
        credentials (another client_id, audience, tenant or token URL) are fetched for
        first; requests keep the running routes until every prefetched token of the new
        ones is in hand. Tokens nothing leads to any more are then dropped.
        """
        router = Router(settings)
        router.adopt_listeners(self.router)
        renewed = self._set_endpoints(router)
        self.tokens.reconsider_policies()
        for key in self.tokens.held_keys():
            if client_of(key) in renewed:
                self.tokens.renew(key)

        known = set(self.tokens.held_keys())
        arriving = [key for key in router.default_keys() if key not in known]
        awaited = [key for key in arriving if router.tenant_of(key).auth.prefetch]
        for key in arriving:
            self.tokens.keep(key)
        if awaited:
            for key in awaited:
                self.tokens.prefetch(key)
            logger.info(
                "Reload: fetching tokens with the new credentials of %s; the running "
                "config serves until they are in hand.",
                ", ".join(sorted({f"tenant {key.tenant}" for key in awaited})),
            )
            try:
                await self.tokens.wait_for_tokens(awaited)
            except asyncio.CancelledError:
                for key in arriving:  # a newer reload replaces this one
                    self.tokens.forget(key)
                raise

        self.settings = settings
        self.router = router
        self.forwarder.replay_body_limit = settings.replay_body_limit
        self._watch(router)
        self._drop_unreachable(router)

    def _set_endpoints(self, router: Router) -> set[Client]:
        """One token endpoint per client of `router`; the clients whose secrets changed."""
        renewed: set[Client] = set()
        endpoints = dict(self.endpoints)
        for tenant in router.tenants.values():
            auth = tenant.auth
            client = client_of(token_key(auth))
            previous = self.endpoints.get(client)
            if previous is None:
                endpoints[client] = TokenEndpoint(
                    self._token_session,
                    auth,
                    self._metrics,
                    clock=self._clock,
                    outbound=self._outbound,
                )
            else:
                endpoints[client] = previous.successor(auth)
                if not previous.has_credentials_of(endpoints[client]):
                    renewed.add(client)
            self._policies[client] = RenewalPolicy(
                auth.refresh_margin, auth.refresh_at, auth.idle_after
            )
        self.endpoints = endpoints
        return renewed

    def _watch(self, router: Router) -> None:
        """Fetch (or keep retrying) the token of every route with a fixed tenant."""
        previous = set(self._keys)
        self._keys = router.default_keys()
        self._prefetched = [key for key in self._keys if router.tenant_of(key).auth.prefetch]
        for key in self._keys:
            if key in self._prefetched:
                self.tokens.prefetch(key)
            else:
                self.tokens.keep(key)
        for key in previous - set(self._keys):
            self.tokens.keep(key, kept=False)

    def _drop_unreachable(self, router: Router) -> None:
        clients = {client_of(token_key(tenant.auth)) for tenant in router.tenants.values()}
        for key in self.tokens.held_keys():
            if client_of(key) not in clients:
                self.tokens.forget(key)
        for client in set(self.endpoints) - clients:
            del self.endpoints[client]
            del self._policies[client]


def _error_answer(error: ProxyError, record: AccessRecord) -> web.Response:
    """The proxy's own answer, with the request id it logs the request under."""
    response = error_response(error)
    response.headers[REQUEST_ID_HEADER] = record.request_id
    record.bytes_out = len(response.body) if isinstance(response.body, bytes) else 0
    return response


def create_admin_app(metrics: Metrics, lifecycle: Lifecycle) -> web.Application:
    """`/metrics`, `/healthz` and `/readyz`, on their own listener."""
    app = web.Application()
    app[METRICS] = metrics
    app[LIFECYCLE] = lifecycle
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


async def _metrics(request: web.Request) -> web.Response:
    body, content_type = request.app[METRICS].exposition(request.headers.get("Accept"))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _healthz(_request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    lifecycle = request.app[LIFECYCLE]
    if lifecycle.phase is not Phase.SERVING:
        return web.Response(status=503, text=f"not ready: {lifecycle.phase.value}\n")
    problem = lifecycle.token_problem()
    if problem is not None:
        return web.Response(status=503, text=f"not ready: {problem}\n")
    return web.Response(text="ready\n")
