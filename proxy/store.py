"""Token stores: where a token fetched by one process is found by the others.

`memory` keeps tokens in each process (the token keeper's own state is all there is).
`file` keeps one file per token key in a directory of this node, and a lock file beside
it, so that of all the processes on a node one fetches a token and the others read it.
`redis` (in `proxy.redis_store`) does the same for a fleet.

A store never decides on its own whether a token will do: the keeper passes a `Freshness`
predicate, and a stored token that fails it is replaced by a fetch.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import stat
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from proxy.config import TokenStoreSettings
from proxy.errors import ProxyError
from proxy.metrics import Metrics
from proxy.tokens import Clock, Freshness, Token, TokenKey, token_from_record, token_record

if TYPE_CHECKING:
    from proxy.redis_store import RedisStore

logger = logging.getLogger("skill_engine_proxy")

FetchFromEndpoint = Callable[[TokenKey], Awaitable[Token]]

# How long a process waits for another that is fetching the same token: longer than one
# token request may take, so that a live fetcher is always waited for.
LOCK_WAIT = 45.0
_LOCK_POLL = 0.02


class TokenStoreError(ProxyError):
    """The token store cannot be used safely (a directory others can write to, say)."""


class TokenStore(Protocol):
    async def obtain(self, key: TokenKey, is_fresh: Freshness, fetch: FetchFromEndpoint) -> Token:
        """A token for `key`: a fresh one from the store, else one fetched and stored."""
        ...

    async def close(self) -> None: ...


class MemoryStore:
    """No sharing: every process fetches its own tokens."""

    async def obtain(self, key: TokenKey, is_fresh: Freshness, fetch: FetchFromEndpoint) -> Token:
        return await fetch(key)

    async def close(self) -> None:
        pass


def key_digest(key: TokenKey) -> str:
    """A name for `key` in a store: derived from what the key is for, never the secret."""
    parts = (key.token_url, key.client_id, key.audience, key.tenant, key.scopes_label)
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:40]


class StoreHealth:
    """One WARNING per outage of a shared store, one INFO when it is back, and a count."""

    def __init__(self, backend: str, metrics: Metrics) -> None:
        self._backend = backend
        self._errors = metrics.token_store_errors.labels(backend)
        self._down = False

    def failed(self, what: str, exc: BaseException) -> None:
        self._errors.inc()
        if not self._down:
            self._down = True
            logger.warning(
                "The %s token store failed (%s: %s); tokens are fetched by this process "
                "alone until it works again.",
                self._backend,
                what,
                exc,
            )

    @property
    def is_down(self) -> bool:
        """The store failed, and has not worked since."""
        return self._down

    def worked(self) -> None:
        if self._down:
            self._down = False
            logger.info("The %s token store works again; tokens are shared again.", self._backend)


class FileStore:
    """One 0600 file per token key in a directory of this node, with an fcntl lock per key."""

    def __init__(self, directory: Path, metrics: Metrics, clock: Clock) -> None:
        self._directory = directory
        self._clock = clock
        self._health = StoreHealth("file", metrics)
        _prepare_directory(directory)

    async def obtain(self, key: TokenKey, is_fresh: Freshness, fetch: FetchFromEndpoint) -> Token:
        digest = key_digest(key)
        try:
            lock = await self._lock(digest)
        except OSError as exc:
            self._health.failed("locking", exc)
            return await fetch(key)
        try:
            stored = self._read(digest)
            if stored is not None and is_fresh(stored):
                return stored
            token = await fetch(key)
            self._write(digest, token)
            return token
        finally:
            os.close(lock)

    async def close(self) -> None:
        pass

    async def _lock(self, digest: str) -> int:
        """The lock file for `digest`, locked; waits at most `LOCK_WAIT` for another process
        (which then gets no say: a lock held that long belongs to a stuck process)."""
        path = self._directory / f"{digest}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        deadline = time.monotonic() + LOCK_WAIT
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        logger.warning(
                            "Another process has held the lock on a token for %.0f s; "
                            "fetching without it.",
                            LOCK_WAIT,
                        )
                        return fd
                    await asyncio.sleep(_LOCK_POLL)
        except BaseException:
            os.close(fd)
            raise

    def _read(self, digest: str) -> Token | None:
        path = self._directory / f"{digest}.json"
        try:
            with open(path, encoding="utf-8") as file:
                record = json.load(file)
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            self._health.failed("reading", exc)
            return None
        self._health.worked()
        return token_from_record(record, now=self._clock.now(), wall_now=time.time())

    def _write(self, digest: str, token: Token) -> None:
        try:
            fd, temporary = tempfile.mkstemp(dir=self._directory, prefix=".token-")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as file:
                    json.dump(token_record(token), file)
                os.replace(temporary, self._directory / f"{digest}.json")
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temporary)
                raise
        except OSError as exc:
            self._health.failed("writing", exc)
        else:
            self._health.worked()


def _prepare_directory(directory: Path) -> None:
    """Create the store's directory for this user alone, or check that it is so: tokens are
    in clear in it, and a directory others may write to could hand this proxy their token.

    A symbolic link is refused too, even to a good directory: in a shared directory such as
    /tmp it may be another user's, and they can point it elsewhere at any time.
    """
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError:
        pass  # something other than a directory is in the way: lstat below says what
    except OSError as exc:
        raise _unusable(directory, f"cannot be created: {exc.strerror}") from exc
    try:
        status = os.lstat(directory)
    except OSError as exc:
        raise _unusable(directory, f"cannot be read: {exc.strerror}") from exc

    if stat.S_ISLNK(status.st_mode):
        raise _unusable(directory, "is a symbolic link; name a directory, not a link to one")
    if not stat.S_ISDIR(status.st_mode):
        raise _unusable(directory, "is not a directory; name a directory, or a path to create")
    if status.st_uid != os.getuid():
        raise _unusable(
            directory,
            f"belongs to another user (uid {status.st_uid}); name a directory of this user "
            f"(uid {os.getuid()})",
        )
    if status.st_mode & 0o077:
        raise _unusable(
            directory,
            f"is open to other users (mode {stat.S_IMODE(status.st_mode):04o}); make it 0700",
        )


def _unusable(directory: Path, problem: str) -> TokenStoreError:
    """The error for a store directory the proxy will not use, naming the key that set it."""
    return TokenStoreError(f"token_store.path: the token store directory {directory} {problem}.")


def open_store(
    settings: TokenStoreSettings,
    metrics: Metrics,
    clock: Clock,
    secret_of: Callable[[TokenKey], str],
) -> TokenStore:
    """The token store the config asks for; `secret_of` gives the client secret a key's
    token is fetched with (the Redis store encrypts with a key derived from it)."""
    if settings.backend == "file":
        return FileStore(settings.path, metrics, clock)
    if settings.backend == "redis":
        return _redis_store_class()(
            settings.url, metrics, clock, secret_of, lock_timeout=settings.lock_timeout
        )
    return MemoryStore()


def check_store(settings: TokenStoreSettings) -> None:
    """Raise the `TokenStoreError` that `open_store` would, where it can be known before
    serving: a `--workers` supervisor checks once, rather than have every worker fail."""
    if settings.backend == "file":
        _prepare_directory(settings.path)
    elif settings.backend == "redis":
        _redis_store_class()


def _redis_store_class() -> type[RedisStore]:
    # Imported here: only a Redis store needs redis-py and cryptography loaded.
    try:
        from proxy.redis_store import RedisStore
    except ImportError as exc:
        raise TokenStoreError(
            f"token_store.backend redis needs {exc.name}: install skill-engine-proxy[redis]."
        ) from exc
    return RedisStore
