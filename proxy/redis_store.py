"""The Redis token store: one token per key for a whole fleet of proxies.

The value under a key is the token encrypted with AES-GCM under a key derived from the
tenant's client secret, so whoever can read Redis but does not hold the secret cannot use
the token. Redis expires it with the token. A lock (SET NX with an expiry, redis-py's `Lock`)
lets one replica fetch while the others wait a bounded time and then read; if the fetcher
dies, its lock expires and another takes over.

Redis down, slow or answering nonsense never fails a request, and an outage costs only the
requests under way when it begins a socket timeout each: after a failure the store is left
alone (each process fetches on its own) while a probe in the background tries a write every
`RETRY_AFTER` seconds, and Redis is used again once one succeeds. Writes and lock releases
run after the request has its token, so a store that fails while writing holds up nobody.
`StoreHealth` logs one WARNING per outage and counts every failed operation.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

import redis.asyncio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from redis.asyncio.lock import Lock
from redis.exceptions import LockError, RedisError

from proxy.metrics import Metrics
from proxy.store import FetchFromEndpoint, StoreHealth, key_digest
from proxy.tokens import Clock, Freshness, Token, TokenKey, token_from_record, token_record

logger = logging.getLogger("skill_engine_proxy")

_PREFIX = "skill-engine-proxy:token:"
_PROBE_KEY = "skill-engine-proxy:probe"
_FORMAT = b"v1"
# The default of token_store.lock_timeout: longer than a token request may take (30 s), so
# that a live fetcher keeps its lock.
LOCK_TIMEOUT = 40.0
# Waiting for another replica's fetch lasts a little longer than its lock, so that the lock
# of a replica that died expires while the others still wait, and one of them takes it.
_LOCK_WAIT_BEYOND_TIMEOUT = 5.0
# Redis that does not answer within this is treated as down for this operation.
_SOCKET_TIMEOUT = 2.0
# After a failure, Redis is left alone this long before a probe tries it again.
RETRY_AFTER = 1.0
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
        lock_timeout: float = LOCK_TIMEOUT,
    ) -> None:
        self._client = redis.asyncio.Redis.from_url(
            url,
            socket_timeout=_SOCKET_TIMEOUT,
            socket_connect_timeout=_SOCKET_TIMEOUT,
        )
        self._clock = clock
        self._secret_of = secret_of
        self._lock_timeout = lock_timeout
        self._health = StoreHealth("redis", metrics)
        self._probe: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        # Key name -> digest of the secret its unreadable value was reported under.
        self._unreadable: dict[str, str] = {}

    @property
    def is_down(self) -> bool:
        """Redis failed and no probe has found it answering since: it is left alone."""
        return self._health.is_down

    async def obtain(self, key: TokenKey, is_fresh: Freshness, fetch: FetchFromEndpoint) -> Token:
        if self.is_down:
            return await fetch(key)
        name = _PREFIX + key_digest(key)
        lock = self._client.lock(
            f"{name}:lock",
            timeout=self._lock_timeout,
            blocking_timeout=self._lock_timeout + _LOCK_WAIT_BEYOND_TIMEOUT,
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
            self._failed("reading", exc)
            stored = None

        token: Token | None = None
        try:
            if stored is not None and is_fresh(stored):
                return stored
            token = await fetch(key)
            return token
        finally:
            if locked or (token is not None and not self.is_down):
                self._in_background(self._settle(name, key, token, lock if locked else None))

    async def close(self) -> None:
        if self._pending:
            # A write or release still under way gets its socket timeout to finish, so
            # that the other replicas need not wait for the lock to expire.
            _, unfinished = await asyncio.wait(self._pending, timeout=2 * _SOCKET_TIMEOUT)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
        # Last: a write that failed meanwhile may have started a probe.
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        await self._client.aclose()

    async def _read(self, name: str, key: TokenKey) -> Token | None:
        value = await self._client.get(name)
        if not isinstance(value, bytes):
            return None
        secret = self._secret_of(key)
        try:
            record = json.loads(_Cipher(secret, name).decrypt(value))
        except (InvalidTag, ValueError) as exc:
            self._report_unreadable(name, key, secret, exc)
            return None
        return token_from_record(record, now=self._clock.now(), wall_now=time.time())

    def _report_unreadable(self, name: str, key: TokenKey, secret: str, exc: Exception) -> None:
        """Once per key and secret: during a rotation, replicas with the old secret and the
        new one overwrite each other's token until all have the new one, and every read
        would say so again."""
        secret_digest = hashlib.sha256(secret.encode()).hexdigest()
        if self._unreadable.get(name) == secret_digest:
            logger.debug("The token stored in Redis for tenant %s is unreadable again.", key.tenant)
            return
        self._unreadable[name] = secret_digest
        logger.warning(
            "The token stored in Redis for tenant %s cannot be read with this proxy's client "
            "secret (%r): it was written with another secret, as during a rotation, or not by "
            "this proxy. This proxy fetches its own and stores it there instead.",
            key.tenant,
            exc,
        )

    async def _settle(
        self, name: str, key: TokenKey, token: Token | None, lock: Lock | None
    ) -> None:
        """Store the token just fetched (unless Redis is down), then release the lock:
        only then may the replicas waiting for it read the token."""
        if token is not None and not self.is_down:
            await self._write(name, key, token)
        if lock is not None:
            await self._release(lock)

    async def _write(self, name: str, key: TokenKey, token: Token) -> None:
        milliseconds = int((token.expires_at_wall - time.time()) * 1000)
        if milliseconds <= 0:
            return
        value = self._cipher(key, name).encrypt(json.dumps(token_record(token)).encode())
        try:
            await self._client.set(name, value, px=milliseconds)
        except _STORE_ERRORS as exc:
            self._failed("writing", exc)

    async def _release(self, lock: Lock) -> None:
        try:
            await lock.release()
        except LockError:
            pass  # it expired meanwhile: another replica may hold it now, rightly
        except _STORE_ERRORS as exc:
            self._failed("unlocking", exc)

    def _failed(self, what: str, exc: BaseException) -> None:
        self._health.failed(what, exc)
        if self._probe is None or self._probe.done():
            first_try = self._clock.now() + RETRY_AFTER
            self._probe = asyncio.create_task(self._probe_until_it_answers(first_try))

    async def _probe_until_it_answers(self, moment: float) -> None:
        """Try a write at `moment` and every `RETRY_AFTER` seconds after; once one succeeds,
        Redis is used again. A write, not a PING: a read-only replica or a Redis out of
        memory answers PING too."""
        while True:
            await self._clock.sleep_until(moment)
            try:
                await self._client.set(_PROBE_KEY, b"", px=60_000)
            except _STORE_ERRORS as exc:
                self._health.failed("probing", exc)
                moment = self._clock.now() + RETRY_AFTER
            else:
                self._health.worked()
                return

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name="redis:settle")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

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
