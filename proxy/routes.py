"""Routing: the tenant and scope set a request is for, and the path it goes upstream with.

Routes are tried in the config's order; the first that matches wins, and a request no route
matches is refused (404 no_route), never sent with some other tenant's token. Everything a
route can lead to is bounded by the config: an unknown tenant or scope in a header makes no
token key and no metric series.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.config import ListenAddress, RouteSettings, Settings, Tenant
from proxy.errors import BadRequest, NoRoute, ScopeNotAllowed
from proxy.tokens import TokenKey

TENANT_HEADER = "X-Skill-Engine-Tenant"
SCOPES_HEADER = "X-Skill-Engine-Scopes"
# What a request may ask for when its route allows all of the tenant's scopes.
KNOWN_SCOPES = frozenset({"read", "read_reports", "write"})


@dataclass(frozen=True, slots=True)
class Destination:
    """Where a request goes: its tenant, the token key, and its path and query upstream."""

    tenant: Tenant
    key: TokenKey
    path: str


@dataclass(frozen=True)
class _Route:
    listen: ListenAddress | None
    prefix: str | None
    header: bool
    tenant: Tenant | None
    scopes: tuple[str, ...] | None


class Router:
    """Matches requests against the configured routes."""

    def __init__(self, settings: Settings) -> None:
        self.tenants = settings.all_tenants()
        self._routes = [self._route(route) for route in settings.all_routes()]
        self._by_listener = any(route.listen is not None for route in self._routes)
        # The listeners (None: the main one) where some route reads the tenant header.
        self._header_listeners = {route.listen for route in self._routes if route.header}
        self._sockets: dict[Any, ListenAddress] = {}
        self._keys: dict[tuple[str, tuple[str, ...] | None], TokenKey] = {}

    def tenant_of(self, key: TokenKey) -> Tenant:
        """The tenant whose credentials `key` is fetched with."""
        for tenant in self.tenants.values():
            auth = tenant.auth
            client = (auth.resolved_token_url, auth.client_id, auth.audience, auth.tenant)
            if client == (key.token_url, key.client_id, key.audience, key.tenant):
                return tenant
        raise KeyError(key)

    def bind(self, socket_name: Any, address: ListenAddress) -> None:
        """Tell requests arriving on `socket_name` (as the socket reports its own address)
        from the listener `address` of a route."""
        self._sockets[socket_name] = address

    def adopt_listeners(self, previous: Router) -> None:
        """Take over the sockets `previous` was told about: the listeners outlive a reload."""
        self._sockets.update(previous._sockets)

    def default_keys(self) -> list[TokenKey]:
        """The token key of each route with a fixed tenant, when no scopes are asked for."""
        keys = []
        for route in self._routes:
            if route.tenant is not None:
                key = self._key(route.tenant, self._allowed(route, route.tenant))
                if key not in keys:
                    keys.append(key)
        return keys

    def route(self, request: web.BaseRequest) -> Destination:
        """The destination of `request`; `NoRoute` or `ScopeNotAllowed` if it has none."""
        listener = self._listener(request) if self._by_listener else None
        # Read before any route is tried, so that several tenants in it are refused
        # whichever route the request would take.
        named = self._named_tenant(request) if listener in self._header_listeners else ""
        target = request.raw_path
        for route in self._routes:
            if route.listen != listener:
                continue
            path = _strip(target, route.prefix)
            if path is None:
                continue
            tenant = route.tenant
            if route.header:
                tenant = self.tenants.get(named)
                if tenant is None:
                    continue
            assert tenant is not None
            scopes = self._scopes(request, route, tenant)
            return Destination(tenant, self._key(tenant, scopes), path)
        raise NoRoute(
            "No route of this proxy matches the request: check its path prefix, the "
            f"{TENANT_HEADER} header or the port it was sent to."
        )

    def _route(self, route: RouteSettings) -> _Route:
        tenant = None if route.tenant is None else self.tenants[route.tenant]
        return _Route(route.listen, route.prefix, route.header, tenant, route.scopes)

    def _listener(self, request: web.BaseRequest) -> ListenAddress | None:
        transport = request.transport
        name = None if transport is None else transport.get_extra_info("sockname")
        if isinstance(name, tuple):
            name = name[:2]
        return self._sockets.get(name)

    def _named_tenant(self, request: web.BaseRequest) -> str:
        """The tenant the request's header names. Several (repeated header lines, or a
        list, which RFC 9110 5.3 makes the same thing) is a 400: picking one would let
        whichever came first decide whose token the request carries."""
        values = request.headers.getall(TENANT_HEADER, ())
        if len(values) > 1 or (values and "," in values[0] and values[0] not in self.tenants):
            raise BadRequest(f"The {TENANT_HEADER} header must name one tenant.")
        return values[0] if values else ""

    def _allowed(self, route: _Route, tenant: Tenant) -> tuple[str, ...] | None:
        return route.scopes if route.scopes is not None else tenant.auth.scopes

    def _scopes(
        self, request: web.BaseRequest, route: _Route, tenant: Tenant
    ) -> tuple[str, ...] | None:
        allowed = self._allowed(route, tenant)
        # Repeated lines are one list (RFC 9110 5.3): scopes are separated by spaces or
        # commas, within a line or across lines.
        asked = ",".join(request.headers.getall(SCOPES_HEADER, ())).replace(",", " ").split()
        if not asked:
            return allowed
        wanted = tuple(sorted(set(asked)))
        if not set(wanted) <= (KNOWN_SCOPES if allowed is None else set(allowed)):
            shown = (
                "any of " + " ".join(sorted(KNOWN_SCOPES)) if allowed is None else " ".join(allowed)
            )
            raise ScopeNotAllowed(
                f"The scopes asked for in {SCOPES_HEADER} are not all allowed on this route; "
                f"it allows {shown}."
            )
        return wanted

    def _key(self, tenant: Tenant, scopes: tuple[str, ...] | None) -> TokenKey:
        cached = self._keys.get((tenant.name, scopes))
        if cached is None:
            auth = tenant.auth
            cached = TokenKey(
                auth.resolved_token_url, auth.client_id, auth.audience, auth.tenant, scopes
            )
            self._keys[(tenant.name, scopes)] = cached
        return cached


def _strip(target: str, prefix: str | None) -> str | None:
    """`target` without `prefix`, still a path; None if it does not start with it."""
    if prefix is None:
        return target
    if not target.startswith(prefix):
        return None
    rest = target[len(prefix) :]
    if not rest:
        return "/"
    if rest[0] == "/":
        return rest
    if rest[0] == "?":
        return "/" + rest
    return None  # /acme-other is not under /acme
