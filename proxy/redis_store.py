"""The Redis token store: one token per key for a whole fleet of proxies.

The value under a key is the token encrypted with AES-GCM under a key derived from the
tenant's client secret, so whoever can read Redis but does not hold the secret cannot use
the token. Redis expires it with the token. A lock (SET NX with an expiry, redis-py's `Lock`)
lets one replica fetch while the others wait a bounded time and then read; if the fetcher
dies, its lock expires and another takes over.

Redis down, slow or answering nonsense never fails a request: the proxy fetches on its own
meanwhile (`StoreHealth` says so once per outage) and uses Redis again as soon as it answers.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable

import redis.asyncio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis.exceptions import LockError, RedisError

from proxy.metrics import Metrics
from proxy.store import LOCK_WAIT, FetchFromEndpoint, StoreHealth, key_digest
from proxy.tokens import Clock, Freshness, Token, TokenKey, token_from_record, token_record

logger = logging.getLogger("skill_engine_proxy")

_PREFIX = "skill-engine-proxy:token:"
_FORMAT = b"v1"
# Longer than a token request may take (30 s), so a live fetcher keeps its lock.
LOCK_TTL = 40.0
# Redis that does not answer within this is treated as down for this operation.
_SOCKET_TIMEOUT = 2.0
_STORE_ERRORS = (RedisError, OSError, TimeoutError)


class RedisStore:
    """Tokens shared through Redis, encrypted with a key derived from the client secret."""

    def __init__(
        self,
        url: str,
        metrics: Metrics,
        clock: Clock,
        secret_of: Callable[[TokenKey], str],
        *,
        lock_ttl: float = LOCK_TTL,
        lock_wait: float = LOCK_WAIT,
    ) -> None:
        self._client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=_SOCKET_TIMEOUT,
            socket_connect_timeout=_SOCKET_TIMEOUT,
        )
        self._clock = clock
        self._secret_of = secret_of
        self._lock_ttl = lock_ttl
        self._lock_wait = lock_wait
        self._health = StoreHealth("redis", metrics)

    async def obtain(self, key: TokenKey, is_fresh: Freshness, fetch: FetchFromEndpoint) -> Token:
        name = _PREFIX + key_digest(key)
        lock = self._client.lock(
            f"{name}:lock", timeout=self._lock_ttl, blocking_timeout=self._lock_wait
        )
        locked = False
        try:
            stored = await self._read(name, key)
            if stored is None or not is_fresh(stored):
                locked = await lock.acquire()
                # Whoever held the lock may have stored a token meanwhile; a fetcher that
                # died left none, and then this replica fetches.
                stored = await self._read(name, key)
        except _STORE_ERRORS as exc:
            self._health.failed("reading", exc)
            stored = None
        else:
            self._health.worked()
        try:
            if stored is not None and is_fresh(stored):
                return stored
            token = await fetch(key)
            await self._write(name, key, token)
            return token
        finally:
            if locked:
                await self._release(lock)

    async def close(self) -> None:
        await self._client.aclose()

    async def _read(self, name: str, key: TokenKey) -> Token | None:
        value = await self._client.get(name)
        if not isinstance(value, bytes):
            return None
        try:
            record = json.loads(self._cipher(key, name).decrypt(value))
        except (InvalidTag, ValueError) as exc:
            # Written with another secret (one being rotated) or not by this proxy at all:
            # fetch, and overwrite it.
            logger.warning(
                "The token stored in Redis for tenant %s is unreadable: %r", key.tenant, exc
            )
            return None
        return token_from_record(record, now=self._clock.now(), wall_now=time.time())

    async def _write(self, name: str, key: TokenKey, token: Token) -> None:
        milliseconds = int((token.expires_at_wall - time.time()) * 1000)
        if milliseconds <= 0:
            return
        value = self._cipher(key, name).encrypt(json.dumps(token_record(token)).encode())
        try:
            await self._client.set(name, value, px=milliseconds)
        except _STORE_ERRORS as exc:
            self._health.failed("writing", exc)

    async def _release(self, lock: redis.asyncio.lock.Lock) -> None:
        try:
            await lock.release()
        except LockError:
            pass  # it expired meanwhile: another replica may hold it now, rightly
        except _STORE_ERRORS as exc:
            self._health.failed("unlocking", exc)

    def _cipher(self, key: TokenKey, name: str) -> _Cipher:
        return _Cipher(self._secret_of(key), name)


class _Cipher:
    """AES-GCM under a key derived (HKDF-SHA256) from the client secret and the Redis key
    name, which is also the associated data: a value cannot be moved to another key."""

    def __init__(self, secret: str, name: str) -> None:
        derived = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=b"skill-engine-proxy token store",
            info=name.encode(),
        ).derive(secret.encode())
        self._aead = AESGCM(derived)
        self._name = name.encode()

    def encrypt(self, plaintext: bytes) -> bytes:
        nonce = os.urandom(12)
        return _FORMAT + nonce + self._aead.encrypt(nonce, plaintext, self._name)

    def decrypt(self, value: bytes) -> bytes:
        if not value.startswith(_FORMAT) or len(value) < len(_FORMAT) + 12 + 16:
            raise ValueError("not a value of this proxy")
        nonce = value[len(_FORMAT) : len(_FORMAT) + 12]
        return self._aead.decrypt(nonce, value[len(_FORMAT) + 12 :], self._name)
