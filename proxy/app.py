"""The app factory: the one place where config, tokens, forwarding and metrics meet.

Two aiohttp applications: the proxy (a catch-all route on `listen`) and the admin app
(`/metrics`, `/healthz`, `/readyz` on `admin_listen`), kept apart so that no Skill Engine
path is ever shadowed by one of the proxy's own.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

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
    defer_continue,
    logged_path,
    new_upstream_session,
    strip_server_defaults,
)
from proxy.metrics import Metrics, TokenMetrics, method_label
from proxy.network import Outbound
from proxy.routes import Destination, Router
from proxy.store import open_store
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


SETTINGS = web.AppKey("settings", Settings)
METRICS = web.AppKey("metrics", Metrics)
LIFECYCLE = web.AppKey("lifecycle", Lifecycle)
CLOCK: web.AppKey[Clock] = web.AppKey("clock")
TOKENS = web.AppKey("tokens", TokenKeeper)
FORWARDER = web.AppKey("forwarder", Forwarder)
ROUTER = web.AppKey("router", Router)
DESTINATION = web.RequestKey("destination", Destination)
IN_FLIGHT: web.AppKey[set[asyncio.Task[object]]] = web.AppKey("in_flight")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_proxy_app(
    settings: Settings,
    metrics: Metrics,
    lifecycle: Lifecycle,
    *,
    clock: Clock | None = None,
) -> web.Application:
    """The forwarding application. Its clients and token keeper live in its cleanup context."""
    app = web.Application(middlewares=[_observe_and_answer_errors])
    app[SETTINGS] = settings
    app[METRICS] = metrics
    app[LIFECYCLE] = lifecycle
    app[CLOCK] = clock or SystemClock()
    app[IN_FLIGHT] = set()
    app[ROUTER] = Router(settings)
    app.cleanup_ctx.append(_clients)
    app.on_response_prepare.append(strip_server_defaults)
    # [\s\S]: a path may hold any character once percent-decoded, a newline included.
    app.router.add_route("*", r"/{path:[\s\S]*}", _forward, expect_handler=defer_continue)
    return app


async def _clients(app: web.Application) -> AsyncIterator[None]:
    settings, metrics, clock = app[SETTINGS], app[METRICS], app[CLOCK]
    router = app[ROUTER]
    secrets = {
        client_of(token_key(tenant.auth)): tenant.auth.secret for tenant in router.tenants.values()
    }
    store = open_store(
        settings.token_store,
        metrics,
        clock,
        lambda key: secrets[client_of(key)].get_secret_value(),
    )
    outbound = Outbound.for_settings(settings)
    token_session = new_token_session(outbound)
    upstream_session = new_upstream_session(outbound)
    endpoints, policies = {}, {}
    for tenant in router.tenants.values():
        auth = tenant.auth
        client = client_of(token_key(auth))
        endpoints[client] = TokenEndpoint(
            token_session, auth, metrics, clock=clock, outbound=outbound
        )
        policies[client] = RenewalPolicy(auth.refresh_margin, auth.refresh_at, auth.idle_after)

    async def fetch(key: TokenKey) -> Token:
        return await endpoints[client_of(key)].fetch(key)

    async def obtain(key: TokenKey, is_fresh: Freshness) -> Token:
        return await store.obtain(key, is_fresh, fetch)

    tokens = TokenKeeper(
        obtain,
        policy=lambda key: policies[client_of(key)],
        clock=clock,
        events=TokenMetrics(metrics),
    )
    app[TOKENS] = tokens
    app[FORWARDER] = Forwarder(
        upstream_session,
        tokens,
        metrics,
        replay_body_limit=settings.replay_body_limit,
        outbound=outbound,
    )
    keys = router.default_keys()
    prefetched = [key for key in keys if router.tenant_of(key).auth.prefetch]
    for key in keys:
        if key in prefetched:
            tokens.prefetch(key)
        else:
            tokens.keep(key)
    app[LIFECYCLE].token_problem = lambda: token_problem(tokens, keys, prefetched)
    yield
    await tokens.close()
    await store.close()
    await upstream_session.close()
    await token_session.close()


def token_problem(
    tokens: TokenKeeper, keys: list[TokenKey], prefetched: list[TokenKey]
) -> str | None:
    """Why requests cannot be served now, for `/readyz`; None when they can.

    No route's token may be failing with none to use instead; a route's token fetched at
    start must be in hand.
    """
    problems = []
    for key in keys:
        problem = tokens.problem(key)
        if problem is None or (key not in prefetched and tokens.failure(key) is None):
            continue
        label = f"tenant {key.tenant}" + (f" ({key.scopes_label})" if key.scopes else "")
        problems.append(problem if len(keys) == 1 else f"{label}: {problem}")
    return "; ".join(problems) or None


async def _forward(request: web.Request) -> web.StreamResponse:
    return await request.app[FORWARDER].forward(request, request[DESTINATION])


@web.middleware
async def _observe_and_answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count and time every request, and turn the proxy's own errors into their answers."""
    metrics = request.app[METRICS]
    in_flight = request.app[IN_FLIGHT]
    task = asyncio.current_task()
    assert task is not None
    started = time.perf_counter()
    metrics.requests_in_flight.inc()
    in_flight.add(task)
    try:
        response = await _answer(request, handler)
    except asyncio.CancelledError:
        if request.transport is None:
            # aiohttp cancels the handler of a client that hung up (handler_cancellation):
            # 499 if its answer had not begun, else the status it was sent.
            _count(request, started, request.get(SENT_STATUS, ClientGone.status))
        raise
    finally:
        in_flight.discard(task)
        metrics.requests_in_flight.dec()
    _count(request, started, response.status)
    return response


def _count(request: web.Request, started: float, status: int) -> None:
    metrics = request.app[METRICS]
    destination = request.get(DESTINATION)
    # A request that found no route has no tenant: "" keeps the label set bounded.
    tenant = "" if destination is None else destination.key.tenant
    method = method_label(request.method)
    metrics.request_duration.labels(tenant, method).observe(time.perf_counter() - started)
    metrics.requests.labels(tenant, method, str(status)).inc()


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        check_request(request)
        request[DESTINATION] = request.app[ROUTER].route(request)
        return await handler(request)
    except ProxyError as exc:
        # The client's own mistakes, and the waiters of a token fetch the token cache has
        # already logged once, are per-request detail.
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
        response = error_response(exc)
        if isinstance(exc, BadRequest) or (request.body_exists and not request.content.at_eof()):
            # What follows on this connection cannot be trusted (a CONNECT's tunnel bytes),
            # or an unread body is not wanted: close rather than read on.
            response.force_close()
        return response
    except Exception:
        logger.exception("%s %s failed inside the proxy", request.method, logged_path(request))
        return error_response(
            ProxyError("The proxy failed to handle this request; its log has the details.")
        )


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
