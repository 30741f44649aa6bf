"""The metrics: what the token keeper's events make of the expiry gauge."""

from __future__ import annotations

from proxy.metrics import Metrics, TokenMetrics
from proxy.tokens import Token, TokenKey, parse_token_response
from tests.support import sample

EXPIRY = "skill_engine_proxy_token_expiry_timestamp_seconds"
OLD = TokenKey("https://token.example/oauth/token", "old-client", "aud", "acme", ("read",))
NEW = TokenKey("https://token.example/oauth/token", "new-client", "aud", "acme", ("read",))
OTHER = TokenKey("https://token.example/oauth/token", "new-client", "aud", "acme", ("write",))


def token(expires_at_wall: float) -> Token:
    return parse_token_response(
        {"access_token": "t", "expires_in": 3600},
        obtained_at=0.0,
        wall_time=expires_at_wall - 3600,
        endpoint="E",
    )


def gauge(metrics: Metrics, scopes: str = "read") -> float | None:
    text = metrics.exposition(None)[0].decode()
    if f'scopes="{scopes}"' not in text:
        return None
    return sample(text, EXPIRY, tenant="acme", scopes=scopes)


def test_keys_sharing_labels_show_the_token_still_held_when_one_is_forgotten() -> None:
    metrics = Metrics()
    events = TokenMetrics(metrics)
    events.took(OLD, token(1000.0))
    events.took(NEW, token(2000.0))  # a reload to another client_id fetched its token
    assert gauge(metrics) == 2000.0

    events.forgot(OLD)  # the old client's key is dropped: the new token's expiry stays
    assert gauge(metrics) == 2000.0
    events.took(NEW, token(3000.0))
    assert gauge(metrics) == 3000.0

    events.forgot(NEW)  # no key is left for these labels
    assert gauge(metrics) is None


def test_forgetting_the_latest_key_shows_the_token_of_the_one_left() -> None:
    metrics = Metrics()
    events = TokenMetrics(metrics)
    events.took(NEW, token(2000.0))
    events.took(OLD, token(1500.0))  # the older client renewed last: its token is newest
    events.forgot(OLD)
    assert gauge(metrics) == 2000.0


def test_other_scope_sets_keep_their_own_series() -> None:
    metrics = Metrics()
    events = TokenMetrics(metrics)
    events.took(NEW, token(2000.0))
    events.took(OTHER, token(2500.0))
    events.forgot(OTHER)
    events.forgot(OTHER)
    assert gauge(metrics, "write") is None
    assert gauge(metrics) == 2000.0
