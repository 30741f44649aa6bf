"""Reloading the config without a restart: on SIGHUP, and when the config file or a secret
file changes.

Files are watched by polling `os.stat` through their path once a second. Kubernetes
updates a mounted Secret or ConfigMap by pointing a `..data` symlink at a new directory,
which an inotify watch on the old file would never see; a stat through the path follows
the symlink and sees the new file, whatever its mtime says.

A new config that does not load is refused with one ERROR, and the running config keeps
serving. Settings that need new listeners or new connections to take effect (the listen
addresses, the token store, the unix socket mode, the network settings) are logged as
waiting for a restart, and the running ones are kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.config import Settings, load_settings
from proxy.errors import ConfigError

logger = logging.getLogger("skill_engine_proxy")

WATCH_INTERVAL = 1.0
# Top-level settings a running process cannot change: they are bound into its listeners,
# its token store, its sockets' permissions and its connection pools (proxies, TLS).
RESTART_ONLY = (
    "listen",
    "admin_listen",
    "token_store",
    "unix_socket_mode",
    "client_header_timeout",
    "network",
)

Apply = Callable[[Settings], Awaitable[None]]
Outcome = Callable[[bool], None]
Load = Callable[[str], Settings]


@dataclass(frozen=True)
class ConfigSource:
    """Where the running config came from: its file, and the settings as read from it
    (before `run --workers` fixed ports and the token store for its workers)."""

    path: str
    loaded: Settings


def file_signature(path: str | os.PathLike[str]) -> tuple[Any, ...] | None:
    """What changes when the file at `path` is replaced or rewritten; None if it is gone."""
    try:
        status = os.stat(path)  # follows symlinks, ..data included
    except OSError:
        return None
    return (
        os.path.realpath(path),
        status.st_dev,
        status.st_ino,
        status.st_mtime_ns,
        status.st_size,
    )


class Reloader:
    """Reads the config again when asked (SIGHUP) or when a watched file changed, and
    hands the result to `apply`; one reload at a time, a newer one replacing a reload
    still waiting for its tokens."""

    def __init__(
        self,
        source: ConfigSource,
        running: Settings,
        apply: Apply,
        *,
        outcome: Outcome = lambda _succeeded: None,
        interval: float = WATCH_INTERVAL,
        load: Load = load_settings,
    ) -> None:
        """`load` reads a config file (`load_settings`); it runs in a thread of its own."""
        self._path = source.path
        self._loaded = source.loaded
        # The config the listeners, token store and connection pools were made from: what
        # only a restart changes is compared with it, at every reload.
        self._started = source.loaded
        self._running = running
        self._apply = apply
        self._outcome = outcome
        self._interval = interval
        self._load = load
        # Route listeners as configured -> as bound (a worker's port 0 became a real one).
        self._listeners = {
            configured.listen: bound.listen
            for configured, bound in zip(source.loaded.routes, running.routes, strict=True)
            if configured.listen is not None
        }
        self._signatures = self._observe()
        self._requested = asyncio.Event()
        self._reasons: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._watch(), name="reload:watch"),
            asyncio.create_task(self._serve_requests(), name="reload:apply"),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def request(self, reason: str) -> None:
        """Reload soon, for `reason` (a signal's name, or the file that changed)."""
        self._reasons.append(reason)
        self._requested.set()

    def _watched(self) -> list[Path]:
        return [Path(self._path), *self._loaded.secret_files()]

    def _observe(self) -> dict[Path, tuple[Any, ...] | None]:
        return {path: file_signature(path) for path in self._watched()}

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            now = self._observe()
            changed = [
                path for path, signature in now.items() if self._signatures.get(path) != signature
            ]
            if changed:
                self._signatures = now
                self.request(f"{changed[0]} changed")

    async def _serve_requests(self) -> None:
        applying: asyncio.Task[None] | None = None
        try:
            while True:
                await self._requested.wait()
                self._requested.clear()
                reasons, self._reasons = self._reasons, []
                if applying is not None and not applying.done():
                    logger.info("A newer reload replaces the one still waiting for tokens.")
                    applying.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await applying
                applying = asyncio.create_task(self._reload(", ".join(reasons)))
        finally:
            if applying is not None:
                applying.cancel()

    async def _reload(self, reason: str) -> None:
        logger.info("Reloading the config from %s (%s).", self._path, reason)
        # The files as they are now: a refused config is not retried until it changes.
        self._signatures = self._observe()
        try:
            # Off the event loop: reading and validating a large config (or one an alias
            # bound just lets through) must not hold up the requests being served.
            settings = await asyncio.to_thread(self._load, self._path)
        except ConfigError as exc:
            logger.error("Reload refused, the running config keeps serving: %s", exc)
            self._outcome(False)
            return
        effective = self._keep_restart_only(settings)
        self._loaded = settings
        self._signatures = self._observe()  # the secret files the new config names
        try:
            await self._apply(effective)
        except Exception:
            logger.exception(
                "Applying the reloaded config failed; the proxy serves on with what it had."
            )
            self._outcome(False)
            return
        self._running = effective
        self._outcome(True)
        logger.info("Reloaded the config from %s.", self._path)

    def _keep_restart_only(self, settings: Settings) -> Settings:
        """`settings` with the running values of what only a restart can change."""
        update: dict[str, Any] = {}
        for name in RESTART_ONLY:
            if getattr(settings, name) != getattr(self._started, name):
                logger.warning(
                    "Reload: %s changed since the proxy started; that takes effect when it "
                    "restarts.",
                    name,
                )
            update[name] = getattr(self._running, name)

        routes = []
        for index, route in enumerate(settings.routes):
            if route.listen is not None and route.listen not in self._listeners:
                logger.warning(
                    "Reload: routes[%d] names the listener %s, which is not open; it takes "
                    "effect when the proxy restarts.",
                    index,
                    route.listen,
                )
            listen = self._listeners.get(route.listen) if route.listen else None
            routes.append(route.model_copy(update={"listen": listen or route.listen}))
        update["routes"] = tuple(routes)
        return settings.model_copy(update=update)
