"""The Prometheus metrics of the contract, in a registry of the proxy's own.

Labels hold only values the config bounds (tenant, scope set) or the protocol bounds
(method, status, error reason): never a path, a query, a token or a secret.
"""

from __future__ import annotations

import os
from collections.abc import Sized

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, multiprocess
from prometheus_client.exposition import choose_encoder

from proxy.tokens import Token, TokenKey

PREFIX = "skill_engine_proxy"
# prometheus-client's switch to multiprocess mode; `--workers` sets it for its workers.
MULTIPROCESS_DIRECTORY = "PROMETHEUS_MULTIPROC_DIR"

# RFC 9110 section 9 plus PATCH (RFC 5789); anything else is counted as "other".
STANDARD_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


def method_label(method: str) -> str:
    return method if method in STANDARD_METHODS else "other"


class Metrics:
    """Every metric the proxy exports, registered in `registry`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.token_fetches = Counter(
            f"{PREFIX}_token_fetches",
            "Token requests sent to the token endpoint, by outcome.",
            ["tenant", "outcome"],
            registry=registry,
        )
        self.token_fetch_duration = Histogram(
            f"{PREFIX}_token_fetch_duration_seconds",
            "Time a token request took, answered or failed.",
            ["tenant"],
            registry=registry,
        )
        self.token_cache_lookups = Counter(
            f"{PREFIX}_token_cache_lookups",
            "Token cache lookups made for proxied requests: hit, or miss and a wait for a fetch.",
            ["tenant", "result"],
            registry=registry,
        )
        self.token_expiry = Gauge(
            f"{PREFIX}_token_expiry_timestamp_seconds",
            "UNIX time at which the newest token for a tenant and scope set expires.",
            ["tenant", "scopes"],
            registry=registry,
            multiprocess_mode="max",
        )
        self.requests = Counter(
            f"{PREFIX}_requests",
            "Requests answered on the proxy listener, by the status sent to the client.",
            ["tenant", "method", "status"],
            registry=registry,
        )
        self.request_duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from receiving a request to the end of its response.",
            ["tenant", "method"],
            registry=registry,
        )
        self.upstream_errors = Counter(
            f"{PREFIX}_upstream_errors",
            "Upstream exchanges that failed: connect, tls, timeout, reset, protocol.",
            ["tenant", "reason"],
            registry=registry,
        )
        self.token_refreshes = Counter(
            f"{PREFIX}_token_refreshes",
            "Background renewals of a token (refreshes ahead of expiry, and their retries).",
            ["tenant", "outcome"],
            registry=registry,
        )
        self.token_fetch_retries = Counter(
            f"{PREFIX}_token_fetch_retries",
            "Token requests that retried a failed one, by the reason the last one failed.",
            ["tenant", "reason"],
            registry=registry,
        )
        self.token_stale_uses = Counter(
            f"{PREFIX}_token_stale_uses",
            "Requests served with a token while renewing it fails.",
            ["tenant"],
            registry=registry,
        )
        self.token_endpoint_ratelimit_remaining = Gauge(
            f"{PREFIX}_token_endpoint_ratelimit_remaining",
            "Token requests left in the token endpoint's rate-limit window, as it last said.",
            ["tenant"],
            registry=registry,
            multiprocess_mode="mostrecent",
        )
        self.upstream_unauthorized = Counter(
            f"{PREFIX}_upstream_unauthorized",
            "Upstream 401 answers: replayed with a new token, or passed to the client.",
            ["tenant", "outcome"],
            registry=registry,
        )
        self.token_store_errors = Counter(
            f"{PREFIX}_token_store_errors",
            "Failures of the shared token store; the proxy fetched on its own meanwhile.",
            ["backend"],
            registry=registry,
        )
        self.config_reloads = Counter(
            f"{PREFIX}_config_reloads",
            "Config reloads (SIGHUP, or a changed config or secret file), by outcome.",
            ["outcome"],
            registry=registry,
        )
        self.requests_in_flight = Gauge(
            f"{PREFIX}_requests_in_flight",
            "Requests being proxied now.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self._request_children: dict[tuple[str, str, int], tuple[Histogram, Counter]] = {}

    def count_request(self, tenant: str, method: str, status: int, seconds: float) -> None:
        """Count one answered request. `method` is a `method_label`.

        Each label set's children are looked up once: `labels()` takes a lock and builds a
        key on every call, which the hot path need not pay. The label sets are bounded by the
        config (tenant) and the protocol (method label, status).
        """
        children = self._request_children.get((tenant, method, status))
        if children is None:
            children = self._request_children[(tenant, method, status)] = (
                self.request_duration.labels(tenant, method),
                self.requests.labels(tenant, method, str(status)),
            )
        children[0].observe(seconds)
        children[1].inc()

    def watch_in_flight(self, requests: Sized) -> bool:
        """Have the in-flight gauge read `len(requests)` when it is scraped, so that the hot
        path pays for no gauge update (two of its five metric updates: about 14,000
        instructions a request, bench/). False under `--workers`, where prometheus-client's
        multiprocess mode reads each worker's gauge from its file: the caller then counts
        with `inc` and `dec` itself."""
        if os.environ.get(MULTIPROCESS_DIRECTORY):
            return False
        self.requests_in_flight.set_function(lambda: len(requests))
        return True

    def reloaded(self, succeeded: bool) -> None:
        self.config_reloads.labels("success" if succeeded else "error").inc()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The metrics in the format `accept` prefers (Prometheus text or OpenMetrics).

        Under `--workers` (PROMETHEUS_MULTIPROC_DIR set), the sum over all workers.
        """
        encoder, content_type = choose_encoder(accept or "")
        registry = self.registry
        if os.environ.get(MULTIPROCESS_DIRECTORY):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return encoder(registry), content_type


class TokenMetrics:
    """The token keeper's events (`tokens.TokenEvents`), counted, and the expiry gauge.

    The gauge shows the expiry of the token the keeper holds for each tenant and scope set,
    however the keeper came by it: fetched by this process, or read from a shared store
    that another process filled. Its labels are not the whole key: after a reload to
    another client_id, audience or token URL, the old key and the new one share a series
    until the old one is forgotten, and the series then shows the token still held.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        # Per label set, the expiry of each key's token, the most recently taken last.
        self._expiries: dict[tuple[str, str], dict[TokenKey, float]] = {}

    def took(self, key: TokenKey, token: Token) -> None:
        labels = (key.tenant, key.scopes_label)
        held = self._expiries.setdefault(labels, {})
        held.pop(key, None)
        held[key] = token.expires_at_wall
        self._metrics.token_expiry.labels(*labels).set(token.expires_at_wall)

    def forgot(self, key: TokenKey) -> None:
        labels = (key.tenant, key.scopes_label)
        held = self._expiries.get(labels, {})
        if held.pop(key, None) is None:
            return
        if held:
            self._metrics.token_expiry.labels(*labels).set(next(reversed(held.values())))
            return
        del self._expiries[labels]
        self._metrics.token_expiry.remove(*labels)

    def stale_use(self, key: TokenKey) -> None:
        self._metrics.token_stale_uses.labels(key.tenant).inc()

    def refreshed(self, key: TokenKey, succeeded: bool) -> None:
        outcome = "success" if succeeded else "error"
        self._metrics.token_refreshes.labels(key.tenant, outcome).inc()

    def retried(self, key: TokenKey, reason: str) -> None:
        self._metrics.token_fetch_retries.labels(key.tenant, reason).inc()
